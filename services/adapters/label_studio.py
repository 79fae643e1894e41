"""Label Studio webhooks -> feedback records.

Label Studio posts `{"action": "ANNOTATION_CREATED" | "ANNOTATION_UPDATED",
"annotation": {...}, "task": {...}, "project": {...}}` and does not retry a
failed delivery. Idempotency rests on the annotation's `id` and `updated_at`.

Mapping (documented in docs/ARCHITECTURE.md, "Data in and out"):

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

from services.adapters.common import Judgement, PayloadError, choice_of, get, to_records

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")


def judgement_of(payload: Any, default_project: str) -> Judgement | None:
    if not isinstance(payload, dict):
        raise PayloadError("body", "must be a JSON object")
    action = get(payload, "action", str)
    if action not in ANNOTATION_EVENTS:
        return None
    annotation = get(payload, "annotation", dict)
    get(payload, "task", dict)
    annotation_id = get(payload, "annotation.id", (int, str))
    updated_at = get(payload, "annotation.updated_at", str)
    if annotation.get("was_cancelled") is True:
        return None
    data = get(payload, "task.data", dict)
    task_id = get(payload, "task.data.task_id", str)
    completed_by = get(payload, "annotation.completed_by", (int, str, dict))
    if isinstance(completed_by, dict):
        who = completed_by.get("email") or completed_by.get("id")
        if who is None:
            raise PayloadError("annotation.completed_by", "must name the user (id or email)")
    else:
        who = completed_by
    candidates = data.get("candidate_ids") or []
    if not isinstance(candidates, list):
        raise PayloadError("task.data.candidate_ids", "must be a list of candidate ids")
    project = data.get("project") or default_project
    rated = data.get("rated_candidate_id") or ""
    if not isinstance(project, str) or not isinstance(rated, str):
        raise PayloadError("task.data", "project and rated_candidate_id must be strings")
    lead = annotation.get("lead_time")
    if lead is not None and (isinstance(lead, bool) or not isinstance(lead, (int, float))):
        raise PayloadError("annotation.lead_time", "must be a number of seconds")
    j = Judgement(
        tool="label-studio",
        annotation_id=str(annotation_id),
        updated_at=updated_at,
        project=project,
        task_id=task_id,
        annotator_id=f"label-studio:{who}",
        candidate_ids=[str(c) for c in candidates],
        rated_candidate_id=rated,
        lead_time_seconds=float(lead) if lead is not None else None,
        metadata={"label-studio.task_id": str(payload["task"].get("id", ""))},
        candidates_path="task.data.candidate_ids",
    )
    results = get(payload, "annotation.result", list)
    for i, item in enumerate(results):
        where = f"annotation.result[{i}]"
        if not isinstance(item, dict):
            raise PayloadError(where, "must be an object")
        name = item.get("from_name")
        if not isinstance(name, str):
            raise PayloadError(f"{where}.from_name", "must be the control tag's name")
        kind = item.get("type")
        value = item.get("value")
        if not isinstance(value, dict):
            raise PayloadError(f"{where}.value", "must be an object")
        if name == "preference" and kind == "choices":
            choices = value.get("choices")
            if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], str):
                raise PayloadError(f"{where}.value.choices", "must hold exactly one choice")
            j.preference = choice_of(choices[0], f"{where}.value.choices")
        elif (name == "rating" or name.startswith("rating_")) and kind == "rating":
            rating = value.get("rating")
            if isinstance(rating, bool) or not isinstance(rating, (int, float)):
                raise PayloadError(f"{where}.value.rating", "must be a number")
            j.ratings.append((name[len("rating_") :] if name != "rating" else "overall", float(rating)))
        elif name in ("correction", "note") and kind == "textarea":
            text = value.get("text")
            if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
                raise PayloadError(f"{where}.value.text", "must be a list of strings")
            if name == "correction":
                j.correction = "\n".join(text)
            else:
                j.note = "\n".join(text)
    return j


def records_of(payload: Any, default_project: str) -> list[pb.FeedbackRecord]:
    j = judgement_of(payload, default_project)
    return [] if j is None else to_records(j)
