"""Typed records at the store boundary and the validation of incoming judgements.

Validation is split in two pure steps:

* `check_record(record, limits)` needs nothing but the record: required ids,
  sizes, enum values, ranges, the shape of a ranking.
* `check_against_task(record, task)` needs the task the record judges: known
  candidate ids, a ranking that is a permutation of the task's candidates,
  ratings on the task's declared scales.

Both return `None` for a good record or a `Rejection` naming the offending
field; the store runs them inside its write transaction, so a bad record is
rejected alone and its batch neighbours are stored.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.records import GoldAnswer, StoredRecord, Task  # noqa: F401 - the plain types, re-exported

KINDS = ("preference", "ranking", "ratings", "correction", "flag")


@dataclass(frozen=True)
class Limits:
    """Size limits for one record (bytes of UTF-8 unless said otherwise)."""

    max_id_bytes: int = 128
    max_text_bytes: int = 65_536
    max_note_bytes: int = 4_096
    max_metadata_entries: int = 64
    max_metadata_key_bytes: int = 128
    max_metadata_value_bytes: int = 4_096
    max_candidates: int = 64
    max_ratings: int = 512


@dataclass(frozen=True)
class Rejection:
    """Why one record was not stored: the field's path and a reason."""

    field: str
    reason: str


def wire_records(data: bytes, field_number: int) -> list[memoryview] | None:
    """The serialised bytes of each record in a serialised request, in order, without copying.

    `data` is a serialised message whose records are the repeated message field
    `field_number` (2 in FeedbackBatch, 1 in SubmitFeedbackRequest). Every
    occurrence of that field is one element of the repeated field, whatever
    other fields lie between, so the slices are the records protobuf parsed
    from `data`, in the same order, and each parses to its record. Returns
    None when `data` holds something this does not walk (a group, a bad length):
    the caller serialises the records then.
    """
    try:
        return _wire_records(data, field_number)
    except IndexError:  # a truncated field: not a message protobuf would have parsed
        return None


def _wire_records(data: bytes, field_number: int) -> list[memoryview] | None:
    view = memoryview(data)
    out: list[memoryview] = []
    append = out.append
    wanted = (field_number << 3) | 2
    i, n = 0, len(data)
    while i < n:
        key = data[i]
        i += 1
        if key >= 0x80:
            key, i = _varint(data, i, key)
        wire_type = key & 7
        if wire_type == 2:
            size = data[i]
            i += 1
            if size >= 0x80:
                size, i = _varint(data, i, size)
            if key == wanted:
                append(view[i : i + size])
            i += size
        elif wire_type == 0:
            while data[i] >= 0x80:
                i += 1
            i += 1
        elif wire_type == 1:
            i += 8
        elif wire_type == 5:
            i += 4
        else:
            return None
    return out if i == n else None


def _varint(data: bytes, i: int, first: int) -> tuple[int, int]:
    """The varint whose first byte (>= 0x80) was `first`, read on from data[i]; (value, next index)."""
    value, shift = first & 0x7F, 7
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def kind_of(record: pb.FeedbackRecord) -> str:
    """The judgement kind ("preference", ...) or "" when none is set."""
    return record.WhichOneof("judgement") or ""


def content_hash(record: pb.FeedbackRecord) -> bytes:
    """A digest of the record's content, stable across resends of the same record."""
    return hashlib.sha256(record.SerializeToString(deterministic=True)).digest()


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def _over(text: str, limit: int) -> bool:
    """UTF-8 length above limit; a UTF-8 character takes at most 4 bytes, so short text needs no encoding."""
    return len(text) * 4 > limit and _nbytes(text) > limit


def _check_text(path: str, text: str, limit: int, required: bool) -> Rejection | None:
    if required and (not text or text.isspace()):
        return Rejection(path, "must not be empty")
    if _over(text, limit):
        return Rejection(path, f"is {_nbytes(text)} bytes; the limit is {limit}")
    return None


def _check_id(path: str, value: str, limits: Limits, required: bool = True) -> Rejection | None:
    if "\x00" in value:
        # ids are stored in TEXT columns, and PostgreSQL's TEXT cannot hold NUL
        return Rejection(path, "must not contain NUL (U+0000) characters")
    return _check_text(path, value, limits.max_id_bytes, required)


def _first(checks: Iterable[Rejection | None]) -> Rejection | None:
    for rejection in checks:
        if rejection is not None:
            return rejection
    return None


def check_record(record: pb.FeedbackRecord, limits: Limits) -> Rejection | None:
    """Checks that need nothing but the record itself."""
    if plain_fields(record, limits, record.ByteSize()) is not None:
        return None
    return _check_record_exactly(record, limits)


def plain_fields(
    record: pb.FeedbackRecord, limits: Limits, size: int
) -> tuple[str, str, str, str, str, str, tuple[str, ...]] | None:
    """(project, feedback_id, kind, task_id, annotator_id, prompt_id, refs) of a record that
    passes every check of `check_record`, or None; `refs` are the candidate ids the record
    names (a correction's candidate; a preference's two), for the checks against its task.

    `size` is the record's serialised size in bytes (`ByteSize()`, or the length
    of its serialisation at hand): no string field holds more bytes than the
    whole record, so a small record needs no length check of its text fields.

    This runs once per ingested record, so it is written for the common case, a
    valid correction or preference, with few calls and no intermediate objects.
    None does not mean invalid (a ranking, say, always answers None): the
    exact checks then decide, and they alone name the rejected field. So this
    makes validation faster but never changes its result.
    """
    if len(UnknownFieldSet(record)) or (record.HasField("client_time") and len(UnknownFieldSet(record.client_time))):
        return None  # the exact checks name the unknown field
    id_limit = limits.max_id_bytes
    feedback_id, project, task_id, annotator_id = record.feedback_id, record.project, record.task_id, record.annotator_id
    prompt_id, guidelines = record.prompt_id, record.guidelines_version
    if "\x00" in "".join((feedback_id, project, task_id, annotator_id, prompt_id, guidelines)):
        return None
    if size > id_limit and max(map(len, (feedback_id, project, task_id, annotator_id, prompt_id, guidelines))) * 4 > id_limit:
        for value in (feedback_id, project, task_id, annotator_id, prompt_id, guidelines):
            if len(value) * 4 > id_limit and _nbytes(value) > id_limit:
                return None
    if not (feedback_id and project and task_id and annotator_id):
        return None
    if feedback_id.isspace() or project.isspace() or task_id.isspace() or annotator_id.isspace():
        return None
    # optional fields read as 0.0 when unset, a valid value of both: no HasField needed
    c = record.confidence
    if not 0.0 <= c <= 1.0:  # False for NaN as well; an infinity lies outside the range
        return None
    t = record.lead_time_seconds
    if not (t >= 0.0 and t != math.inf):  # False for NaN
        return None
    metadata = record.metadata
    if metadata:
        if len(metadata) > limits.max_metadata_entries:
            return None
        key_limit, value_limit = limits.max_metadata_key_bytes, limits.max_metadata_value_bytes
        if len("".join(metadata)) * 4 > key_limit:  # else every key is short enough
            for key in metadata:
                if len(key) * 4 > key_limit and _nbytes(key) > key_limit:
                    return None
        if size > value_limit:
            for key in metadata:
                value = metadata[key]
                if len(value) * 4 > value_limit and _nbytes(value) > value_limit:
                    return None
    kind = record.WhichOneof("judgement")
    if kind == "correction":
        c = record.correction
        if len(UnknownFieldSet(c)):
            return None
        candidate, text = c.candidate_id, c.corrected_text
        if not candidate or "\x00" in candidate or candidate.isspace() or not text or text.isspace():
            return None
        if size > id_limit and len(candidate) * 4 > id_limit and _nbytes(candidate) > id_limit:
            return None
        if size > limits.max_text_bytes and len(text) * 4 > limits.max_text_bytes and _nbytes(text) > limits.max_text_bytes:
            return None
        if size > limits.max_note_bytes:
            note = c.note
            if len(note) * 4 > limits.max_note_bytes and _nbytes(note) > limits.max_note_bytes:
                return None
        refs: tuple[str, ...] = (candidate,)
    elif kind == "preference":
        p = record.preference
        if len(UnknownFieldSet(p)):
            return None
        a, b = p.candidate_a_id, p.candidate_b_id
        if not a or not b or a == b or "\x00" in a or "\x00" in b or a.isspace() or b.isspace():
            return None
        if size > id_limit and ((len(a) * 4 > id_limit and _nbytes(a) > id_limit) or (len(b) * 4 > id_limit and _nbytes(b) > id_limit)):
            return None
        if p.choice not in _PLAIN_CHOICES or p.HasField("strength"):
            return None
        refs = (a, b)
    else:
        return None
    return project, feedback_id, kind, task_id, annotator_id, prompt_id, refs


def _check_record_exactly(record: pb.FeedbackRecord, limits: Limits) -> Rejection | None:
    """Every check of `check_record`, in order: the first failing one names the field."""
    head = _first(
        (
            _check_unknown_fields(record),
            _check_id("feedback_id", record.feedback_id, limits),
            _check_id("project", record.project, limits),
            _check_id("task_id", record.task_id, limits),
            _check_id("annotator_id", record.annotator_id, limits),
            _check_id("prompt_id", record.prompt_id, limits, required=False),
            _check_id("guidelines_version", record.guidelines_version, limits, required=False),
            _check_confidence(record),
            _check_lead_time(record),
            _check_metadata(record, limits),
        )
    )
    if head is not None:
        return head
    kind = kind_of(record)
    if not kind:
        return Rejection("judgement", f"exactly one of {', '.join(KINDS)} must be set")
    return _KIND_CHECKS[kind](getattr(record, kind), limits)


def _check_unknown_fields(message: Message, path: str = "") -> Rejection | None:
    """Fields this schema does not define are refused, at any depth.

    A parsed record keeps the bytes of fields it does not know, and the store
    keeps records as sent: unchecked, an unknown field would be stored whole,
    past every size limit (none of them can name it). So a record carrying one
    is rejected, naming where it sits and its field numbers; a client built
    against a newer schema needs a service at least as new.
    """
    unknown = UnknownFieldSet(message)
    if len(unknown):
        numbers = sorted({field.field_number for field in unknown})
        shown = ", ".join(map(str, numbers[:8])) + (", ..." if len(numbers) > 8 else "")
        return Rejection(f"{path}unknown_fields", f"field number(s) {shown} are not in the hitl.feedback.v1 schema of this service")
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None or descriptor.message_type.GetOptions().map_entry:
            continue
        repeated = descriptor.is_repeated
        for i, item in enumerate(value if repeated else (value,)):
            where = f"{path}{descriptor.name}[{i}]." if repeated else f"{path}{descriptor.name}."
            rejection = _check_unknown_fields(item, where)
            if rejection is not None:
                return rejection
    return None


def _check_confidence(record: pb.FeedbackRecord) -> Rejection | None:
    if record.HasField("confidence"):
        c = record.confidence
        if not (math.isfinite(c) and 0.0 <= c <= 1.0):
            return Rejection("confidence", f"must lie in [0, 1], got {c}")
    return None


def _check_lead_time(record: pb.FeedbackRecord) -> Rejection | None:
    if record.HasField("lead_time_seconds"):
        t = record.lead_time_seconds
        if not (math.isfinite(t) and t >= 0.0):
            return Rejection("lead_time_seconds", f"must be a finite number >= 0, got {t}")
    return None


def _check_metadata(record: pb.FeedbackRecord, limits: Limits) -> Rejection | None:
    if len(record.metadata) > limits.max_metadata_entries:
        return Rejection(
            "metadata",
            f"has {len(record.metadata)} entries; the limit is {limits.max_metadata_entries}",
        )
    for key, value in record.metadata.items():
        if _over(key, limits.max_metadata_key_bytes):
            return Rejection("metadata", f"key {key[:32]!r}... is longer than {limits.max_metadata_key_bytes} bytes")
        if _over(value, limits.max_metadata_value_bytes):
            return Rejection(f"metadata[{key}]", f"is longer than {limits.max_metadata_value_bytes} bytes")
    return None


def _check_preference(p: pb.Preference, limits: Limits) -> Rejection | None:
    found = _first(
        (
            _check_id("preference.candidate_a_id", p.candidate_a_id, limits),
            _check_id("preference.candidate_b_id", p.candidate_b_id, limits),
        )
    )
    if found:
        return found
    if p.candidate_a_id == p.candidate_b_id:
        return Rejection("preference.candidate_b_id", "must differ from candidate_a_id")
    if p.choice not in (pb.Preference.CHOICE_A, pb.Preference.CHOICE_B, pb.Preference.CHOICE_TIE, pb.Preference.CHOICE_BOTH_BAD):
        return Rejection("preference.choice", "must be CHOICE_A, CHOICE_B, CHOICE_TIE or CHOICE_BOTH_BAD")
    if p.HasField("strength"):
        if not (math.isfinite(p.strength) and 0.0 < p.strength <= 1.0):
            return Rejection("preference.strength", f"must lie in (0, 1], got {p.strength}")
        if p.choice not in (pb.Preference.CHOICE_A, pb.Preference.CHOICE_B):
            return Rejection("preference.strength", "is only meaningful with CHOICE_A or CHOICE_B")
    return None


def _check_ranking(r: pb.Ranking, limits: Limits) -> Rejection | None:
    n = len(r.entries)
    if n < 2:
        return Rejection("ranking.entries", f"must rank at least 2 candidates, got {n}")
    if n > limits.max_candidates:
        return Rejection("ranking.entries", f"has {n} entries; the limit is {limits.max_candidates}")
    seen: set[str] = set()
    for i, entry in enumerate(r.entries):
        found = _check_id(f"ranking.entries[{i}].candidate_id", entry.candidate_id, limits)
        if found:
            return found
        if entry.candidate_id in seen:
            return Rejection(f"ranking.entries[{i}].candidate_id", f"{entry.candidate_id!r} is ranked twice: not a permutation")
        seen.add(entry.candidate_id)
        if not 1 <= entry.rank <= n:
            return Rejection(f"ranking.entries[{i}].rank", f"must lie in [1, {n}], got {entry.rank}")
    return None


def _check_ratings(r: pb.Ratings, limits: Limits) -> Rejection | None:
    if not r.entries:
        return Rejection("ratings.entries", "must hold at least one rating")
    if len(r.entries) > limits.max_ratings:
        return Rejection("ratings.entries", f"has {len(r.entries)} entries; the limit is {limits.max_ratings}")
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(r.entries):
        found = _first(
            (
                _check_id(f"ratings.entries[{i}].candidate_id", entry.candidate_id, limits),
                _check_id(f"ratings.entries[{i}].aspect", entry.aspect, limits),
            )
        )
        if found:
            return found
        if not math.isfinite(entry.value):
            return Rejection(f"ratings.entries[{i}].value", f"must be finite, got {entry.value}")
        key = (entry.candidate_id, entry.aspect)
        if key in seen:
            return Rejection(f"ratings.entries[{i}]", f"rates {key[0]!r} on {key[1]!r} twice")
        seen.add(key)
    return None


def _check_correction(c: pb.Correction, limits: Limits) -> Rejection | None:
    return _first(
        (
            _check_id("correction.candidate_id", c.candidate_id, limits),
            _check_text("correction.corrected_text", c.corrected_text, limits.max_text_bytes, required=True),
            _check_text("correction.note", c.note, limits.max_note_bytes, required=False),
        )
    )


def _check_flag(f: pb.Flag, limits: Limits) -> Rejection | None:
    found = _first(
        (
            _check_id("flag.candidate_id", f.candidate_id, limits, required=False),
            _check_text("flag.note", f.note, limits.max_note_bytes, required=False),
        )
    )
    if found:
        return found
    if f.kind not in (pb.Flag.KIND_HARMFUL, pb.Flag.KIND_PII, pb.Flag.KIND_SPAM, pb.Flag.KIND_OTHER):
        return Rejection("flag.kind", "must be KIND_HARMFUL, KIND_PII, KIND_SPAM or KIND_OTHER")
    if f.kind == pb.Flag.KIND_OTHER and not f.note.strip():
        return Rejection("flag.note", "is required with KIND_OTHER")
    return None


_PLAIN_CHOICES = frozenset((pb.Preference.CHOICE_A, pb.Preference.CHOICE_B, pb.Preference.CHOICE_TIE, pb.Preference.CHOICE_BOTH_BAD))

_KIND_CHECKS = {
    "preference": _check_preference,
    "ranking": _check_ranking,
    "ratings": _check_ratings,
    "correction": _check_correction,
    "flag": _check_flag,
}


def check_against_task(record: pb.FeedbackRecord, task: Task | None, kind: str | None = None) -> Rejection | None:
    """Checks that need the judged task (None when the store does not know it).

    `kind` is `kind_of(record)` when the caller knows it already.
    """
    if task is None:
        return Rejection("task_id", f"unknown task {record.task_id!r}")
    if task.project != record.project:
        return Rejection("project", f"task {task.task_id!r} belongs to another project")
    if record.prompt_id and record.prompt_id != task.prompt_id:
        return Rejection("prompt_id", f"task {task.task_id!r} has prompt_id {task.prompt_id!r}, not {record.prompt_id!r}")
    ids = task.candidate_ids
    if kind is None:
        kind = kind_of(record)
    if kind == "correction":
        if record.correction.candidate_id not in ids:
            return Rejection("correction.candidate_id", f"unknown candidate {record.correction.candidate_id!r} for task {task.task_id!r}")
    elif kind == "preference":
        p = record.preference
        a, b = p.candidate_a_id, p.candidate_b_id
        if a not in ids:
            return Rejection("preference.candidate_a_id", f"unknown candidate {a!r} for task {task.task_id!r}")
        if b not in ids:
            return Rejection("preference.candidate_b_id", f"unknown candidate {b!r} for task {task.task_id!r}")
    elif kind == "ranking":
        ranked = [e.candidate_id for e in record.ranking.entries]
        for i, cid in enumerate(ranked):
            if cid not in ids:
                return Rejection(f"ranking.entries[{i}].candidate_id", f"unknown candidate {cid!r} for task {task.task_id!r}")
        if len(ranked) != len(ids):
            return Rejection("ranking.entries", f"ranks {len(ranked)} of the task's {len(ids)} candidates: not a permutation")
    elif kind == "ratings":
        scales = {s.aspect: s for s in task.rating_scales}
        for i, entry in enumerate(record.ratings.entries):
            if entry.candidate_id not in ids:
                return Rejection(f"ratings.entries[{i}].candidate_id", f"unknown candidate {entry.candidate_id!r} for task {task.task_id!r}")
            scale = scales.get(entry.aspect)
            if scale is None:
                declared = ", ".join(sorted(scales)) or "none"
                return Rejection(f"ratings.entries[{i}].aspect", f"{entry.aspect!r} is not declared by the task (declared: {declared})")
            if not scale.min <= entry.value <= scale.max:
                return Rejection(f"ratings.entries[{i}].value", f"{entry.value} is outside the scale [{scale.min}, {scale.max}] of {entry.aspect!r}")
    elif kind == "flag":
        cid = record.flag.candidate_id
        if cid and cid not in ids:
            return Rejection("flag.candidate_id", f"unknown candidate {cid!r} for task {task.task_id!r}")
    return None


def check_task(task: Task, limits: Limits) -> Rejection | None:
    """Validates a task before it is published."""
    found = _first(
        (
            _check_id("task_id", task.task_id, limits),
            _check_id("project", task.project, limits),
            _check_id("prompt_id", task.prompt_id, limits),
            _check_text("prompt", task.prompt, limits.max_text_bytes, required=True),
        )
    )
    if found:
        return found
    if not 2 <= len(task.candidates) <= limits.max_candidates:
        return Rejection("candidates", f"a task needs 2..{limits.max_candidates} candidates, got {len(task.candidates)}")
    seen: set[str] = set()
    for i, c in enumerate(task.candidates):
        found = _first(
            (
                _check_id(f"candidates[{i}].candidate_id", c.candidate_id, limits),
                _check_text(f"candidates[{i}].text", c.text, limits.max_text_bytes, required=True),
            )
        )
        if found:
            return found
        if c.candidate_id in seen:
            return Rejection(f"candidates[{i}].candidate_id", f"{c.candidate_id!r} appears twice")
        seen.add(c.candidate_id)
    for i, s in enumerate(task.rating_scales):
        if not s.aspect or not (math.isfinite(s.min) and math.isfinite(s.max) and s.min < s.max):
            return Rejection(f"rating_scales[{i}]", "needs an aspect name and finite min < max")
    if task.annotations_wanted < 1:
        return Rejection("annotations_wanted", f"must be >= 1, got {task.annotations_wanted}")
    return _check_gold(task) if task.gold is not None else None


def _check_gold(task: Task) -> Rejection | None:
    """A gold answer belongs to a pair, names one of its candidates (or a tie), and no
    metadata key of the task may point annotators at it."""
    if len(task.candidates) != 2:
        return Rejection("gold", f"a gold answer needs a task of exactly 2 candidates, got {len(task.candidates)}")
    better = task.gold.better  # type: ignore[union-attr]
    if better is not None and better not in task.candidate_ids:
        return Rejection("gold.better", f"unknown candidate {better!r} for task {task.task_id!r}")
    for key in task.metadata:
        if "gold" in key.lower():
            return Rejection(f"metadata[{key}]", "a gold task's metadata must not name its gold answer (annotators see metadata)")
    return None
