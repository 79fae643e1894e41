"""The JSON body of a judgement posted by the page, and the FeedbackRecord made of it.

    POST /api/judgements
    {"feedback_id": "5f0c…", "task_id": "t1", "prompt_id": "p-t1",
     "display_order": ["c1", "c0"], "lead_time_seconds": 3.2,
     "client_time": "2025-01-01T12:00:00.000Z", "guidelines_version": "g-7",
     "confidence": 0.8,
     "preference": {"candidate_a_id": "c1", "candidate_b_id": "c0", "choice": "A", "strength": 0.5}}

Exactly one of `preference`, `ranking`, `ratings`, `correction`, `flag`
(shaped like the .proto's messages, enums by short name). Unknown keys are
errors. The record is a pure function of the body, the project and the
annotator: a resent body becomes a byte-identical record, which the service
answers DUPLICATE instead of storing it again. Every problem is a
`BadJudgement` naming the field's path (`ranking.entries[1].rank`).
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from hitl.feedback.v1 import feedback_pb2 as pb
from services.feedback.records import KINDS, Limits, check_record

CLIENT_NAME = "hitl-label-web"
FINISHING_KINDS = ("preference", "ranking", "ratings")
"""Judgements that finish a task (as in the terminal); corrections and flags add to it."""

_LIMITS = Limits()


class BadJudgement(ValueError):
    """A judgement the page sent cannot be stored: which field, and why."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class _FieldError(ValueError):
    """Raised by a validator about one of its model's fields (a path relative to the model)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _an_id(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if "\x00" in value or len(value.encode("utf-8")) > _LIMITS.max_id_bytes:
        raise ValueError(f"at most {_LIMITS.max_id_bytes} bytes of UTF-8, without NUL characters")
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Id = Annotated[str, AfterValidator(_an_id)]
Finite = Annotated[float, AfterValidator(_finite)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class PreferenceIn(_Strict):
    candidate_a_id: Id
    candidate_b_id: Id
    choice: Literal["A", "B", "tie", "both_bad"]
    strength: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> "PreferenceIn":
        if self.candidate_a_id == self.candidate_b_id:
            raise _FieldError("candidate_b_id", "must differ from candidate_a_id")
        if self.strength is not None and self.choice not in ("A", "B"):
            raise _FieldError("strength", "only with choice A or B")
        return self


class RankEntryIn(_Strict):
    candidate_id: Id
    rank: int = Field(ge=1)


class RankingIn(_Strict):
    entries: list[RankEntryIn] = Field(min_length=2)

    @model_validator(mode="after")
    def _a_ranking(self) -> "RankingIn":
        seen: set[str] = set()
        for i, entry in enumerate(self.entries):
            if entry.candidate_id in seen:
                raise _FieldError(f"entries[{i}].candidate_id", f"{entry.candidate_id!r} appears twice")
            seen.add(entry.candidate_id)
            if entry.rank > len(self.entries):
                raise _FieldError(f"entries[{i}].rank", f"{entry.rank} is outside 1..{len(self.entries)}")
        return self


class RatingEntryIn(_Strict):
    candidate_id: Id
    aspect: Id
    value: Finite


class RatingsIn(_Strict):
    entries: list[RatingEntryIn] = Field(min_length=1)

    @model_validator(mode="after")
    def _once_each(self) -> "RatingsIn":
        seen: set[tuple[str, str]] = set()
        for i, entry in enumerate(self.entries):
            key = (entry.candidate_id, entry.aspect)
            if key in seen:
                raise _FieldError(f"entries[{i}]", f"{entry.candidate_id!r} is rated on {entry.aspect!r} twice")
            seen.add(key)
        return self


class CorrectionIn(_Strict):
    candidate_id: Id
    corrected_text: str = Field(min_length=1)
    note: str = ""


class FlagIn(_Strict):
    candidate_id: str = ""  # empty: the prompt
    kind: Literal["harmful", "pii", "spam", "other"]
    note: str = ""

    @model_validator(mode="after")
    def _other_has_a_note(self) -> "FlagIn":
        if self.kind == "other" and not self.note.strip():
            raise _FieldError("note", "a flag of kind 'other' needs a note")
        return self


class JudgementIn(_Strict):
    """One judgement as the page posts it."""

    feedback_id: Id
    task_id: Id
    prompt_id: str = ""
    display_order: list[Id] = Field(min_length=2, max_length=_LIMITS.max_candidates)
    lead_time_seconds: Finite | None = Field(None, ge=0)
    client_time: AwareDatetime | None = None
    guidelines_version: str
    confidence: float | None = Field(None, ge=0, le=1)
    preference: PreferenceIn | None = None
    ranking: RankingIn | None = None
    ratings: RatingsIn | None = None
    correction: CorrectionIn | None = None
    flag: FlagIn | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "JudgementIn":
        given = [kind for kind in KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise _FieldError("judgement", f"give exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})")
        if len(set(self.display_order)) != len(self.display_order):
            raise _FieldError("display_order", "a candidate appears twice")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if getattr(self, kind) is not None)

    @property
    def finishes(self) -> bool:
        return self.kind in FINISHING_KINDS


def _path(loc: tuple) -> str:
    """A pydantic error location as a field path: `ranking.entries[1].rank`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _join(base: str, field: str) -> str:
    if not base:
        return field
    return base + field if field.startswith("[") else f"{base}.{field}"


def parse_judgement(body: bytes | str) -> JudgementIn:
    """Validate a posted body; BadJudgement names the first wrong field."""
    try:
        return JudgementIn.model_validate_json(body)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        base = _path(tuple(first["loc"]))
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, _FieldError):
            raise BadJudgement(_join(base, cause.field), cause.reason) from None
        if first["type"] == "json_invalid":
            raise BadJudgement("body", f"not JSON ({first['msg']})") from None
        reason = {"missing": "required", "extra_forbidden": "unknown key"}.get(first["type"], first["msg"].removeprefix("Value error, "))
        raise BadJudgement(base or "body", reason) from None


_CHOICES = {
    "A": pb.Preference.CHOICE_A,
    "B": pb.Preference.CHOICE_B,
    "tie": pb.Preference.CHOICE_TIE,
    "both_bad": pb.Preference.CHOICE_BOTH_BAD,
}
_FLAG_KINDS = {"harmful": pb.Flag.KIND_HARMFUL, "pii": pb.Flag.KIND_PII, "spam": pb.Flag.KIND_SPAM, "other": pb.Flag.KIND_OTHER}


def _judgement_message(j: JudgementIn) -> dict[str, object]:
    """The record's oneof field, as a keyword argument of FeedbackRecord."""
    if j.preference is not None:
        p = j.preference
        msg = pb.Preference(candidate_a_id=p.candidate_a_id, candidate_b_id=p.candidate_b_id, choice=_CHOICES[p.choice])
        if p.strength is not None:
            msg.strength = p.strength
        return {"preference": msg}
    if j.ranking is not None:
        return {"ranking": pb.Ranking(entries=[pb.Ranking.Entry(candidate_id=e.candidate_id, rank=e.rank) for e in j.ranking.entries])}
    if j.ratings is not None:
        entries = [pb.Ratings.Entry(candidate_id=e.candidate_id, aspect=e.aspect, value=e.value) for e in j.ratings.entries]
        return {"ratings": pb.Ratings(entries=entries)}
    if j.correction is not None:
        c = j.correction
        return {"correction": pb.Correction(candidate_id=c.candidate_id, corrected_text=c.corrected_text, note=c.note)}
    f = j.flag
    assert f is not None
    return {"flag": pb.Flag(candidate_id=f.candidate_id, kind=_FLAG_KINDS[f.kind], note=f.note)}


def to_record(j: JudgementIn, *, project: str, annotator_id: str) -> pb.FeedbackRecord:
    """The FeedbackRecord of a judgement (deterministic); BadJudgement if the service would refuse its shape."""
    record = pb.FeedbackRecord(
        feedback_id=j.feedback_id,
        project=project,
        task_id=j.task_id,
        prompt_id=j.prompt_id,
        annotator_id=annotator_id,
        guidelines_version=j.guidelines_version,
        metadata={"client": CLIENT_NAME, "display_order": ",".join(j.display_order)},
        **_judgement_message(j),
    )
    if j.confidence is not None:
        record.confidence = j.confidence
    if j.lead_time_seconds is not None:
        record.lead_time_seconds = j.lead_time_seconds
    if j.client_time is not None:
        record.client_time.FromDatetime(_utc(j.client_time))
    rejection = check_record(record, _LIMITS)
    if rejection is not None:
        raise BadJudgement(rejection.field, rejection.reason)
    return record


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc)
