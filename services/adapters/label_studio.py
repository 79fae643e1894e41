"""Label Studio webhooks -> feedback records.

Label Studio posts `{"action": "ANNOTATION_CREATED" | "ANNOTATION_UPDATED",
"annotation": {...}, "task": {...}, "project": {...}}` and does not retry a
failed delivery. Idempotency rests on the annotation's `id` and `updated_at`.

Mapping (the payload's fields are typed in services/adapters/payloads.py):

* The hitl task: `task.data.task_id` is the task id, `task.data.candidate_ids`
  the task's candidate ids (the order the labeling config shows them in),
  `task.data.project` overrides the receiver's default project,
  `task.data.rated_candidate_id` the candidate that ratings and corrections
  are about (default: the first).
* Results (by the control tag's `from_name`): `Choices name="preference"`
  (A, B, tie, both-bad) -> preference of the first two candidates;
  `Rating name="rating"` (aspect "overall") or `name="rating_<aspect>"` ->
  ratings; `TextArea name="correction"` -> correction; `TextArea name="note"`
  -> the correction's note, else record metadata. Other results are ignored.
* `annotation.was_cancelled` (a skipped task) gives nothing;
  `annotation.lead_time` -> lead_time_seconds; the annotator is
  `label-studio:<completed_by>` (the user id, or its email when Label Studio
  sends the user as an object).
"""

from __future__ import annotations

from typing import Any

from hitl.feedback.v1 import feedback_pb2 as pb
from services.adapters.common import Judgement, PayloadError, choice_of, to_records
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


def judgement_of(payload: Any, default_project: str) -> Judgement | None:
    if not isinstance(payload, dict):
        raise PayloadError("body", "must be a JSON object")
    if parse(LabelStudioEvent, payload).action not in ANNOTATION_EVENTS:
        return None
    event = parse(LabelStudioAnnotationEvent, payload)
    annotation, data = event.annotation, event.task.data
    if annotation.was_cancelled:  # a skipped task
        return None
    who = annotation.completed_by
    if isinstance(who, LabelStudioUser):
        who = who.email or who.id
        if who is None:
            raise PayloadError("annotation.completed_by", "must name the user (id or email)")
    j = Judgement(
        tool="label-studio",
        annotation_id=str(annotation.id),
        updated_at=annotation.updated_at,
        project=data.project or default_project,
        task_id=data.task_id,
        annotator_id=f"label-studio:{who}",
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


def records_of(payload: Any, default_project: str) -> list[pb.FeedbackRecord]:
    j = judgement_of(payload, default_project)
    return [] if j is None else to_records(j)
