"""Argilla webhooks -> feedback records.

Argilla (>= 2.4) sends webhooks as Standard Webhooks: a JSON body
`{"type": "response.created", "version": 1, "timestamp": ..., "data": {...}}`
with the headers `webhook-id`, `webhook-timestamp` (Unix seconds) and
`webhook-signature` (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed
with the base64 part of the `whsec_...` secret). Argilla retries a failed
delivery up to 3 times, each time with a new message id, so idempotency rests
on the response's own id and `updated_at`, never on `webhook-id`.

Mapping (the payload's fields are typed in services/adapters/payloads.py):

* Events: `response.created` and `response.updated` with `data.status ==
  "submitted"` give records; drafts, discarded responses and every other event
  are acknowledged and ignored (`response.deleted` too: stored records are
  never deleted).
* The hitl task: `data.record.external_id` is the task id;
  `data.record.metadata.candidate_ids` lists the task's candidate ids (in the
  order of the record's response fields); `data.record.metadata.project`
  names the project (it must be one of the route's `projects`, else 403; none:
  the route's first); `data.record.metadata.rated_candidate_id` names the
  candidate that ratings and corrections are about (default: the first).
* Questions (by name): `preference` (label selection: A, B, tie, both-bad) ->
  preference of the first two candidates; `ranking` (ranking over candidate
  ids) -> ranking; `rating` (aspect "overall") and `rating_<aspect>` ->
  ratings; `correction` (text) -> correction; `note` or `comments` (text) ->
  the correction's note, else record metadata. Other questions are ignored.
* The annotator: the route's `users` entry for `data.user.username` or
  `data.user.id` (403 when neither is mapped), or `argilla:<username or id>`
  under `map_unknown_users: prefix` (the simple command line).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from typing import Any, Mapping

from hitl.feedback.v1 import feedback_pb2 as pb
from services.adapters.common import Judgement, PayloadError, Scope, choice_of, to_records
from services.adapters.payloads import (
    ArgillaEvent,
    ArgillaResponse,
    ArgillaStatus,
    Preference,
    Ranking,
    Rating,
    Text,
    parse,
    parse_value,
)

RESPONSE_EVENTS = ("response.created", "response.updated")
TOLERANCE_S = 300  # Standard Webhooks' suggested window for webhook-timestamp


class SignatureError(ValueError):
    """The delivery is not signed by the holder of the secret (or is stale)."""


def _secret_key(secret: str) -> bytes:
    raw = secret[len("whsec_") :] if secret.startswith("whsec_") else secret
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"webhook secret: not base64 after 'whsec_' ({err})") from None


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value Argilla would send."""
    mac = hmac.new(_secret_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None, tolerance_s: float = TOLERANCE_S) -> None:
    """Raises SignatureError unless the headers carry a valid, fresh signature of body."""
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not msg_id or not stamp or not signatures:
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        ts = int(stamp)
    except ValueError:
        raise SignatureError("webhook-timestamp is not an integer") from None
    now = time.time() if now is None else now
    if abs(now - ts) > tolerance_s:
        raise SignatureError(f"webhook-timestamp is {int(now - ts)} s away from now (tolerance {int(tolerance_s)} s)")
    expected = sign(secret, msg_id, ts, body).split(",", 1)[1]
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected.encode()):
            return
    raise SignatureError("no valid v1 signature")


def judgement_of(event: Any) -> Judgement | None:
    """The judgement of a response event, or None for events that carry none; not yet scoped
    (its project and annotator are `Scope.apply`'s to set)."""
    if not isinstance(event, dict):
        raise PayloadError("body", "must be a JSON object")
    header = parse(ArgillaEvent, event)
    if header.type not in RESPONSE_EVENTS:
        return None
    if not isinstance(event.get("data"), dict):
        raise PayloadError("data", "is required" if event.get("data") is None else "must be an object")
    if event["data"].get("status") != "submitted":  # drafts and discarded responses carry no judgement
        parse(ArgillaStatus, event["data"], "data")
        return None
    response = parse(ArgillaResponse, event["data"], "data")
    user_keys = tuple(k for k in (response.user.username, response.user.id) if k)
    if not user_keys:
        raise PayloadError("data.user.username", "is required")
    meta = response.record.metadata
    j = Judgement(
        tool="argilla",
        annotation_id=response.id,
        updated_at=response.updated_at,
        task_id=response.record.external_id,
        named_project=meta.project,
        project_path="data.record.metadata.project",
        user_keys=user_keys,
        user_path="data.user.username",
        candidate_ids=list(meta.candidate_ids),
        rated_candidate_id=meta.rated_candidate_id,
        metadata={"argilla.record_id": "" if response.record.id is None else str(response.record.id)},
        candidates_path="data.record.metadata.candidate_ids",
    )
    for name, answer in response.values.items():
        where = f"data.values.{name}.value"
        if name == "preference":
            j.preference = choice_of(parse_value(Preference, answer.value, where), where)
        elif name == "ranking":
            j.ranking.extend((item.value, item.rank) for item in parse_value(Ranking, answer.value, where))
        elif name == "rating" or name.startswith("rating_"):
            j.ratings.append((name[len("rating_") :] if name != "rating" else "overall", float(parse_value(Rating, answer.value, where))))
        elif name == "correction":
            j.correction = parse_value(Text, answer.value, where)
        elif name in ("note", "comments"):
            j.note = parse_value(Text, answer.value, where)
    return j


def records_of(event: Any, scope: Scope) -> list[pb.FeedbackRecord]:
    """The records of an event, in `scope`'s project and annotator terms (403 when outside it)."""
    j = judgement_of(event)
    return [] if j is None else to_records(scope.apply(j))
