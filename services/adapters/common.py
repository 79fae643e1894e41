"""What the tool adapters share: payload errors, the judgement a tool's
annotation expresses, the scope that gives it a project and an annotator, and
its translation into feedback records.

Who and where come from configuration, not from the payload: a payload only
*names* a project (checked against the route's `projects`) and a tool user
(looked up in the route's `users`). A webhook sender holds a credential for one
route, so it can write no project and claim no annotator its route was not
given.

Idempotency: a record's `feedback_id` is derived from the tool's own
annotation id and the annotation's update time (plus the judgement kind, as
one annotation can give several records). A redelivered event therefore gives
the same ids and the same content, which the service answers DUPLICATE; an
edited annotation has a new update time, hence new ids: a new record.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal, Mapping

from hitl.feedback.v1 import feedback_pb2 as pb

CHOICES = {
    "a": pb.Preference.CHOICE_A,
    "b": pb.Preference.CHOICE_B,
    "tie": pb.Preference.CHOICE_TIE,
    "both-bad": pb.Preference.CHOICE_BOTH_BAD,
}
MAX_RECORD_BYTES = 1 << 20  # a record above this could never be forwarded in one gRPC message
_CHOICE_ALIASES = {"response-a": "a", "candidate-a": "a", "response-b": "b", "candidate-b": "b", "neither": "both-bad", "bothbad": "both-bad"}


class PayloadError(ValueError):
    """A webhook body that cannot be turned into records; `field` is its JSON path.
    `status` is the HTTP answer: the sender's input is wrong, so the tool should not retry."""

    status = 400

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ScopeError(PayloadError):
    """A well-formed payload the route may not write: another project, an unmapped user."""

    status = 403


class RecordTooLarge(PayloadError):
    """A record too large to forward: it would block the outbox behind it."""

    status = 413


def choice_of(label: str, where: str) -> int:
    key = label.strip().lower().replace("_", "-").replace(" ", "-")
    key = _CHOICE_ALIASES.get(key, key)
    if key not in CHOICES:
        raise PayloadError(where, f"{label!r} is not one of A, B, tie, both-bad")
    return CHOICES[key]


@dataclass
class Judgement:
    """What one annotation of a tool says, in the service's terms."""

    tool: str  # "argilla" | "label-studio"
    annotation_id: str  # the tool's response / annotation id
    updated_at: str  # the tool's update time of that annotation, as sent
    task_id: str
    project: str = ""  # set by Scope.apply (the payload's choice is in named_project)
    annotator_id: str = ""  # set by Scope.apply from user_keys
    named_project: str | None = None  # the project the payload names, if any
    project_path: str = "project"  # where the payload names it, for error messages
    user_keys: tuple[str, ...] = ()  # the tool's ids of its user (preferred first: username, email)
    user_path: str = "user"  # where the payload names the user, for error messages
    candidate_ids: list[str] = field(default_factory=list)
    rated_candidate_id: str = ""  # the candidate ratings and corrections are about
    preference: int | None = None
    ranking: list[tuple[str, int]] = field(default_factory=list)
    ratings: list[tuple[str, float]] = field(default_factory=list)  # (aspect, value)
    correction: str | None = None
    note: str = ""
    lead_time_seconds: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    candidates_path: str = "candidate_ids"  # where candidate ids come from, for error messages


UnknownUsers = Literal["refuse", "prefix"]


@dataclass(frozen=True)
class Scope:
    """What one route may write: its projects (the first is the project of payloads naming
    none) and who its tool users are as annotators.

    `map_unknown_users="prefix"` turns an unmapped tool user into `<tool>:<user>` (the tool's
    first id for the user: Argilla's username, Label Studio's user id or email); "refuse"
    answers 403, so nobody labels under an id that was not given to them."""

    tool: str
    projects: tuple[str, ...]
    users: Mapping[str, str] = field(default_factory=dict)
    map_unknown_users: UnknownUsers = "refuse"
    config_path: str = "routes"  # the configuration's name of this route, for messages

    def __post_init__(self) -> None:
        if not self.projects:
            raise ValueError(f"{self.config_path}.projects: must name at least one project")

    def apply(self, j: Judgement) -> Judgement:
        """`j` with its project and annotator set; ScopeError (403) when the route may not."""
        j.project = self.project_of(j)
        j.annotator_id = self.annotator_of(j)
        return j

    def project_of(self, j: Judgement) -> str:
        if j.named_project is None or j.named_project == "":
            return self.projects[0]
        if j.named_project not in self.projects:
            raise ScopeError(j.project_path, f"project {j.named_project!r} is not one this route may write")
        return j.named_project

    def annotator_of(self, j: Judgement) -> str:
        if not j.user_keys:
            raise PayloadError(j.user_path, "must name the user")
        for key in j.user_keys:
            if key in self.users:
                return self.users[key]
        if self.map_unknown_users == "prefix":
            return f"{j.tool}:{j.user_keys[0]}"
        raise ScopeError(j.user_path, f"user {j.user_keys[0]!r} is not mapped to an annotator ({self.config_path}.users)")


def feedback_id(tool: str, annotation_id: str, updated_at: str, kind: str) -> str:
    fid = f"{tool}:{annotation_id}:{updated_at}:{kind}"
    if len(fid.encode("utf-8")) <= 128:
        return fid
    return f"{tool}:" + hashlib.sha256(fid.encode("utf-8")).hexdigest()


def _timestamp(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment


def to_records(j: Judgement) -> list[pb.FeedbackRecord]:
    """The feedback records a judgement gives (several kinds can come from one annotation).
    The judgement must have been scoped (`Scope.apply`): no record leaves without a project
    and an annotator that configuration gave it."""
    if not j.project or not j.annotator_id:
        raise ValueError("to_records: the judgement has no project or annotator (Scope.apply it first)")

    def needs_candidates(n: int = 2) -> list[str]:
        if len(j.candidate_ids) < n or not all(isinstance(c, str) and c for c in j.candidate_ids):
            raise PayloadError(j.candidates_path, f"must list the task's candidate ids (at least {n})")
        return j.candidate_ids

    def rated() -> str:
        return j.rated_candidate_id or needs_candidates(1)[0]

    judgements: list[tuple[str, dict]] = []
    if j.preference is not None:
        a, b = needs_candidates()[:2]
        judgements.append(("preference", {"preference": pb.Preference(candidate_a_id=a, candidate_b_id=b, choice=j.preference)}))
    if j.ranking:
        judgements.append(("ranking", {"ranking": pb.Ranking(entries=[pb.Ranking.Entry(candidate_id=c, rank=r) for c, r in j.ranking])}))
    if j.ratings:
        cid = rated()
        judgements.append(("ratings", {"ratings": pb.Ratings(entries=[pb.Ratings.Entry(candidate_id=cid, aspect=a, value=v) for a, v in j.ratings])}))
    if j.correction is not None and j.correction.strip():
        judgements.append(("correction", {"correction": pb.Correction(candidate_id=rated(), corrected_text=j.correction, note=j.note)}))
    meta = {"source": j.tool, f"{j.tool}.annotation_id": j.annotation_id, f"{j.tool}.updated_at": j.updated_at, **j.metadata}
    if j.note and j.correction is None:
        meta["note"] = j.note
    records = []
    for kind, body in judgements:
        record = pb.FeedbackRecord(
            feedback_id=feedback_id(j.tool, j.annotation_id, j.updated_at, kind),
            project=j.project,
            task_id=j.task_id,
            annotator_id=j.annotator_id,
            metadata=meta,
            **body,
        )
        if j.lead_time_seconds is not None:
            record.lead_time_seconds = j.lead_time_seconds
        moment = _timestamp(j.updated_at)
        if moment is not None:
            if moment.tzinfo is None:  # Argilla sends naive UTC times
                moment = moment.replace(tzinfo=timezone.utc)
            record.client_time.FromDatetime(moment)
        records.append(record)
    return records


def check_record_sizes(records: list[pb.FeedbackRecord], limit: int = MAX_RECORD_BYTES) -> None:
    """RecordTooLarge (413) for a record above `limit` bytes: checked before it is queued, as
    a record the service refuses for its size would hold up every record behind it."""
    for record in records:
        size = record.ByteSize()
        if size > limit:
            raise RecordTooLarge("body", f"record {record.feedback_id} is {size} bytes, more than {limit}")
