"""The webhook bodies of the labeling tools, as typed models.

Only the fields the adapters read are declared; others are allowed and ignored (the tools add
fields between releases). Types are strict: a number where text is expected, or a boolean
where a number is, fails with the field's JSON path (`PayloadError.field`), as the tool's
documentation names it.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

from services.adapters.common import PayloadError

Number = StrictInt | StrictFloat
M = TypeVar("M", bound=BaseModel)


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def parse(model: type[M], value: Any, prefix: str = "") -> M:
    """`value` as `model`; a `PayloadError` naming the first wrong field (its JSON path under
    `prefix`) otherwise."""
    try:
        return model.model_validate(value)
    except ValidationError as err:
        first = err.errors()[0]
        raise PayloadError(json_path(prefix, first["loc"]) or "body", _reason(first)) from None


def parse_value(kind: Any, value: Any, where: str) -> Any:
    """`value` as the type `kind` (e.g. `Ranking`); a `PayloadError` under `where` otherwise."""
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError as err:
        first = err.errors()[0]
        raise PayloadError(json_path(where, first["loc"]), _reason(first)) from None


def json_path(prefix: str, loc: tuple) -> str:
    """('data', 'values', 0, 'rank') under 'x' -> 'x.data.values[0].rank'."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not (isinstance(part, str) and part.startswith(("function-", "union[", "int", "float", "str"))):
            path = f"{path}.{part}" if path else str(part)
    return path


def _reason(error: dict) -> str:
    kind = error["type"]
    if kind == "missing":
        return "is required"
    if kind in ("model_type", "dict_type"):
        return "must be an object"
    if kind == "list_type":
        return "must be a list"
    if kind == "string_type":
        return "must be a string"
    if kind == "int_type":
        return "must be an integer"
    if kind == "float_type":
        return "must be a number"
    if kind == "too_short":
        return "must not be empty"
    return error["msg"]


# --------------------------------------------------------------------------- Argilla


class ArgillaRecordMetadata(_Payload):
    candidate_ids: list[StrictStr] = Field(default_factory=list)
    project: StrictStr | None = None
    rated_candidate_id: StrictStr = ""


class ArgillaRecord(_Payload):
    id: StrictStr | StrictInt | None = None
    external_id: StrictStr
    metadata: ArgillaRecordMetadata = Field(default_factory=ArgillaRecordMetadata)


class ArgillaUser(_Payload):
    id: StrictStr | None = None
    username: StrictStr | None = None

    @property
    def name(self) -> str | None:
        return self.username or self.id


class ArgillaAnswer(_Payload):
    value: Any


class ArgillaStatus(_Payload):
    status: StrictStr


class ArgillaResponse(_Payload):
    """`data` of a `response.*` event: one user's submitted answers to one record's questions."""

    id: StrictStr
    status: StrictStr
    updated_at: StrictStr
    values: dict[str, ArgillaAnswer]
    record: ArgillaRecord
    user: ArgillaUser


class ArgillaEvent(_Payload):
    """A Standard Webhooks body: `{"type", "version", "timestamp", "data"}`."""

    type: StrictStr
    data: Any = None


class RankItem(_Payload):
    value: StrictStr
    rank: StrictInt


Preference = StrictStr
Ranking = Annotated[list[RankItem], Field(min_length=1)]
Rating = Number
Text = StrictStr


# --------------------------------------------------------------------------- Label Studio


class LabelStudioUser(_Payload):
    id: StrictInt | StrictStr | None = None
    email: StrictStr | None = None


class ChoicesValue(_Payload):
    choices: Annotated[list[StrictStr], Field(min_length=1, max_length=1)]


class RatingValue(_Payload):
    rating: Number


class TextValue(_Payload):
    text: list[StrictStr]


class LabelStudioResult(_Payload):
    from_name: StrictStr
    type: StrictStr | None = None
    value: dict[str, Any]


class LabelStudioAnnotation(_Payload):
    id: StrictInt | StrictStr
    updated_at: StrictStr
    was_cancelled: bool = False
    completed_by: StrictInt | StrictStr | LabelStudioUser
    lead_time: Number | None = None
    result: list[LabelStudioResult]


class LabelStudioTaskData(_Payload):
    task_id: StrictStr
    candidate_ids: list[StrictStr | StrictInt] = Field(default_factory=list)
    project: StrictStr | None = None
    rated_candidate_id: StrictStr = ""


class LabelStudioTask(_Payload):
    id: StrictInt | StrictStr | None = None
    data: LabelStudioTaskData


class LabelStudioEvent(_Payload):
    """`{"action", "annotation", "task", "project"}`; only annotation events carry the rest."""

    action: StrictStr


class LabelStudioAnnotationEvent(_Payload):
    action: StrictStr
    annotation: LabelStudioAnnotation
    task: LabelStudioTask
