"""Label Studio webhooks -> feedback records.

Label Studio posts `{"action": "ANNOTATION_CREATED" | "ANNOTATION_UPDATED",
"annotation": {...}, "task": {...}, "project": {...}}` and does not retry a
failed delivery. Idempotency rests on the annotation's `id` and `updated_at`.

Mapping (the payload's fields are typed in services/adapters/payloads.py):

* The hitl task: `task.data.task_id` is the task id, `task.data.candidate_ids`
  the task's candidate ids (the order the labeling config shows them in),
  `task.data.project` names the project (one of the route's `projects`, else
  403; none: the route's first),
  `task.data.rated_candidate_id` the candidate that ratings and corrections
  are about (default: the first).
* Results (by the control tag's `from_name`): `Choices name="preference"`
  (A, B, tie, both-bad) -> preference of the first two candidates;
  `Rating name="rating"` (aspect "overall") or `name="rating_<aspect>"` ->
  ratings; `TextArea name="correction"` -> correction; `TextArea name="note"`
  -> the correction's note, else record metadata. Other results are ignored.
* `annotation.was_cancelled` (a skipped task) gives nothing;
  `annotation.lead_time` -> lead_time_seconds.
* The annotator: the route's `users` entry for `annotation.completed_by` (the
  user id; its email or id when Label Studio sends the user as an object),
  403 when not mapped; or `label-studio:<completed_by>` (the email first)
  under `map_unknown_users: prefix` (the simple command line).
"""

from __future__ import annotations

from typing import Any

from hitl.feedback.v1 import feedback_pb2 as pb
from services.adapters.common import Judgement, PayloadError, Scope, choice_of, to_records
from services.adapters.payloads import (
    ChoicesValue,
    LabelStudioAnnotationEvent,
    LabelStudioEvent,
    LabelStudioUser,
    RatingValue,
    TextValue,
    parse,
)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")


def user_keys_of(who: int | str | LabelStudioUser) -> tuple[str, ...]:
    """The ids a `users` mapping may list for `completed_by`: its email first, then its id."""
    if isinstance(who, LabelStudioUser):
        keys = tuple(str(k) for k in (who.email, who.id) if k is not None and k != "")
        if not keys:
            raise PayloadError("annotation.completed_by", "must name the user (id or email)")
        return keys
    return (str(who),)


def judgement_of(payload: Any) -> Judgement | None:
    """The judgement of an annotation event, or None for events that carry none; not yet
    scoped (its project and annotator are `Scope.apply`'s to set)."""
    if not isinstance(payload, dict):
        raise PayloadError("body", "must be a JSON object")
    if parse(LabelStudioEvent, payload).action not in ANNOTATION_EVENTS:
        return None
    event = parse(LabelStudioAnnotationEvent, payload)
    annotation, data = event.annotation, event.task.data
    if annotation.was_cancelled:  # a skipped task
        return None
    j = Judgement(
        tool="label-studio",
        annotation_id=str(annotation.id),
        updated_at=annotation.updated_at,
        task_id=data.task_id,
        named_project=data.project,
        project_path="task.data.project",
        user_keys=user_keys_of(annotation.completed_by),
        user_path="annotation.completed_by",
        candidate_ids=[str(c) for c in data.candidate_ids],
        rated_candidate_id=data.rated_candidate_id,
        lead_time_seconds=None if annotation.lead_time is None else float(annotation.lead_time),
        metadata={"label-studio.task_id": "" if event.task.id is None else str(event.task.id)},
        candidates_path="task.data.candidate_ids",
    )
    for i, item in enumerate(annotation.result):
        where = f"annotation.result[{i}].value"
        name, kind = item.from_name, item.type
        if name == "preference" and kind == "choices":
            j.preference = choice_of(parse(ChoicesValue, item.value, where).choices[0], f"{where}.choices")
        elif (name == "rating" or name.startswith("rating_")) and kind == "rating":
            rating = parse(RatingValue, item.value, where).rating
            j.ratings.append((name[len("rating_") :] if name != "rating" else "overall", float(rating)))
        elif name in ("correction", "note") and kind == "textarea":
            text = "\n".join(parse(TextValue, item.value, where).text)
            if name == "correction":
                j.correction = text
            else:
                j.note = text
    return j


def records_of(payload: Any, scope: Scope) -> list[pb.FeedbackRecord]:
    """The records of a payload, in `scope`'s project and annotator terms (403 when outside it)."""
    j = judgement_of(payload)
    return [] if j is None else to_records(scope.apply(j))
