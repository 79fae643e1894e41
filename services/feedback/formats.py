"""Data in and out: import and export of the store in the formats people use.

Formats (the same names for `hitl feedback import` and `hitl feedback export`):

* `hh-rlhf`: Anthropic's HH-RLHF lines, `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
  "rejected": ...}`. Import: each line becomes a task (prompt: the dialogue up
  to the last "Assistant:" turn; candidates `c0` = chosen, `c1` = rejected)
  and a preference record (`c0` over `c1`). Export: one line per strict
  preference (rankings expand into pairs).
* `ultrafeedback`: UltraFeedback rows, `{"instruction": ..., "completions":
  [{"model", "response", "annotations": {aspect: {"Rating": "4", "Rationale":
  ...}}, ...}]}`. Import: a task with one candidate per completion and a 1..5
  rating scale per aspect, plus one `ratings` record per aspect (the aspect's
  ratings of every completion, as UltraFeedback annotated them); "N/A" ratings
  are not ratings and are kept in metadata only. Export: one row per (task,
  annotator) with ratings.
* `jsonl`: the raw record stream (`{"seq", "received_at", "record"}` per line,
  the record in proto3 JSON). Import writes the records through the store's
  write path (the same validation as gRPC); `seq` and `received_at` are the new
  store's.
* `tasks-jsonl`: the published tasks (a LabelingTask in proto3 JSON plus
  `annotations_wanted`), in publication order; the format
  `hitl feedback tasks load` reads.

Nothing of an imported line is lost: what the store's own fields cannot hold
(HH-RLHF dialogue prefixes, UltraFeedback's other fields, rationales) is kept
in task or record metadata, so that import -> export gives the same JSON
objects back (the same bytes for lines written as `json.dumps(...,
ensure_ascii=False)`). Ids are derived from the content (and the project, and
the line's occurrence number among identical lines of the file), so
importing a file twice stores it once.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from hitl.feedback.v1 import feedback_pb2 as pb

from services.feedback.jsonl import JsonlError, _lines, read_tasks, record_to_json, task_to_json
from services.feedback.records import Task
from services.feedback.store import SqlStore, Status

IMPORT_FORMATS = ("hh-rlhf", "ultrafeedback", "jsonl", "tasks-jsonl")
EXPORT_FORMATS = ("hh-rlhf", "ultrafeedback", "jsonl", "tasks-jsonl")

HUMAN = "\n\nHuman: "
ASSISTANT = "\n\nAssistant:"
UF_SCALE = (1.0, 5.0)

# task metadata keys
FORMAT_KEY = "format"
HH_DIALOGUE = "hh_rlhf.dialogue"  # "1": the prompt is a raw dialogue (starts with "\n\nHuman: ")
HH_PROMPT = "hh_rlhf.prompt."  # + candidate id: that candidate's own dialogue, when it differs
HH_SEP = "hh_rlhf.sep."  # + candidate id: the text between "Assistant:" and the answer, when not " "
HH_EXTRA = "hh_rlhf.extra"  # JSON object of the line's other keys
UF_ROW = "ultrafeedback.row"  # the row with instruction, responses and annotations taken out
UF_UNRATED = "ultrafeedback.unrated."  # + aspect: annotations of an aspect no completion has a number for
# record metadata keys (ultrafeedback)
UF_ASPECT = "aspect"
UF_RATIONALE = "rationale."  # + candidate id
UF_ANNOTATION = "annotation."  # + candidate id: the whole annotation, when it is more than Rating + Rationale

_CHUNK = 4096  # bytes of one metadata value (records.Limits.max_metadata_value_bytes)


class FormatError(ValueError):
    """A line cannot be imported; the message names the file and line."""


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def put_long(meta: dict[str, str], key: str, value: str) -> None:
    """Store a value of any length under key, key#1, key#2, ... (4096 bytes each)."""
    data = value.encode("utf-8")
    if len(data) <= _CHUNK:
        meta[key] = value
        return
    chunks: list[str] = []
    start = 0
    while start < len(data):
        end = min(start + _CHUNK, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:  # do not split a UTF-8 sequence
            end -= 1
        chunks.append(data[start:end].decode("utf-8"))
        start = end
    for i, chunk in enumerate(chunks):
        meta[key if i == 0 else f"{key}#{i}"] = chunk


def get_long(meta: dict[str, str] | Any, key: str) -> str | None:
    if key not in meta:
        return None
    parts = [meta[key]]
    i = 1
    while f"{key}#{i}" in meta:
        parts.append(meta[f"{key}#{i}"])
        i += 1
    return "".join(parts)


def _number(value: Any) -> float | None:
    """A rating's number, or None for "N/A" and anything else that is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def rating_text(value: float) -> str:
    """UltraFeedback writes ratings as strings: "4", or "3.5"."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass
class ImportReport:
    """What an import did."""

    lines: int = 0
    tasks_created: int = 0
    tasks_existing: int = 0
    records_accepted: int = 0
    records_duplicate: int = 0
    errors: list[str] = field(default_factory=list)  # "FILE:LINE: field: reason"

    def summary(self) -> dict[str, int]:
        return {
            "lines": self.lines,
            "tasks_created": self.tasks_created,
            "tasks_existing": self.tasks_existing,
            "records_accepted": self.records_accepted,
            "records_duplicate": self.records_duplicate,
            "errors": len(self.errors),
        }


@dataclass
class _Item:
    """One imported line: a task (or None) and its records."""

    line: int
    task: Task | None
    records: list[pb.FeedbackRecord]


# ---------------------------------------------------------------------------
# HH-RLHF
# ---------------------------------------------------------------------------


def _split_dialogue(text: Any, where: str) -> tuple[str, str, str]:
    """(dialogue before the last Assistant turn, separator, answer)."""
    if not isinstance(text, str):
        raise FormatError(f"{where}: must be a string")
    at = text.rfind(ASSISTANT)
    if at < 0:
        raise FormatError(f"{where}: has no '\\n\\nAssistant:' turn")
    tail = text[at + len(ASSISTANT) :]
    sep = " " if tail.startswith(" ") else ""
    return text[:at], sep, tail[len(sep) :]


def hh_rlhf_items(path: Path, project: str, annotator_id: str) -> Iterator[_Item]:
    seen: Counter[str] = Counter()
    for number, row in _lines(path):
        where = f"{path}:{number}"
        if "chosen" not in row or "rejected" not in row:
            raise FormatError(f"{where}: needs 'chosen' and 'rejected'")
        prompt, sep_c, chosen = _split_dialogue(row["chosen"], f"{where}: chosen")
        prompt_r, sep_r, rejected = _split_dialogue(row["rejected"], f"{where}: rejected")
        extra = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
        key = _dumps([row["chosen"], row["rejected"], extra])
        occurrence = seen[key]
        seen[key] += 1
        task_id = "hh-" + _digest(project, key, str(occurrence))[:32]
        # the prompt is kept verbatim ("\n\nHuman: ..." and any earlier turns); the
        # dialogue mark tells the export not to wrap it in a Human turn again
        meta = {FORMAT_KEY: "hh-rlhf", HH_DIALOGUE: "1"}
        stored_prompt = prompt
        if prompt_r != prompt:
            meta[HH_PROMPT + "c1"] = prompt_r
        if sep_c != " ":
            meta[HH_SEP + "c0"] = sep_c
        if sep_r != " ":
            meta[HH_SEP + "c1"] = sep_r
        if extra:
            meta[HH_EXTRA] = _dumps(extra)
        task = Task(
            task_id=task_id,
            project=project,
            prompt_id="p-" + _digest(stored_prompt)[:24],
            prompt=stored_prompt,
            candidates=(pb.Candidate(candidate_id="c0", text=chosen), pb.Candidate(candidate_id="c1", text=rejected)),
            metadata=meta,
        )
        record = pb.FeedbackRecord(
            feedback_id="hh-" + _digest(task_id, annotator_id)[:32],
            project=project,
            task_id=task_id,
            prompt_id=task.prompt_id,
            annotator_id=annotator_id,
            preference=pb.Preference(candidate_a_id="c0", candidate_b_id="c1", choice=pb.Preference.CHOICE_A),
        )
        yield _Item(number, task, [record])


@dataclass(frozen=True)
class Pair:
    """A chosen/rejected pair of one task, from a preference or a ranking."""

    task: Task
    chosen_id: str
    rejected_id: str
    feedback_id: str
    annotator_id: str

    def _text(self, cid: str) -> str:
        return next(c.text for c in self.task.candidates if c.candidate_id == cid)

    @property
    def prompt(self) -> str:
        return self.task.prompt

    @property
    def chosen(self) -> str:
        return self._text(self.chosen_id)

    @property
    def rejected(self) -> str:
        return self._text(self.rejected_id)


def pairs_of(record: pb.FeedbackRecord, task: Task) -> list[Pair]:
    """Strict preferences as pairs; ties and both-bad give none; rankings expand."""
    kind = record.WhichOneof("judgement")
    out: list[Pair] = []
    if kind == "preference":
        p = record.preference
        if p.choice == pb.Preference.CHOICE_A:
            out.append(Pair(task, p.candidate_a_id, p.candidate_b_id, record.feedback_id, record.annotator_id))
        elif p.choice == pb.Preference.CHOICE_B:
            out.append(Pair(task, p.candidate_b_id, p.candidate_a_id, record.feedback_id, record.annotator_id))
    elif kind == "ranking":
        entries = sorted(record.ranking.entries, key=lambda e: e.rank)
        for i, better in enumerate(entries):
            for worse in entries[i + 1 :]:
                if better.rank < worse.rank:
                    out.append(Pair(task, better.candidate_id, worse.candidate_id, record.feedback_id, record.annotator_id))
    return out


def _hh_dialogue(task: Task, cid: str) -> str:
    meta = task.metadata
    if meta.get(HH_DIALOGUE) == "1":
        head = meta.get(HH_PROMPT + cid, task.prompt)
    else:
        head = HUMAN + task.prompt
    text = next(c.text for c in task.candidates if c.candidate_id == cid)
    return head + ASSISTANT + meta.get(HH_SEP + cid, " ") + text


def hh_rlhf_line(pair: Pair) -> str:
    """The Anthropic HH-RLHF layout: whole dialogues under `chosen` and `rejected`."""
    row: dict[str, Any] = {"chosen": _hh_dialogue(pair.task, pair.chosen_id), "rejected": _hh_dialogue(pair.task, pair.rejected_id)}
    extra = pair.task.metadata.get(HH_EXTRA)
    if extra:
        row.update(json.loads(extra))
    return _dumps(row)


# ---------------------------------------------------------------------------
# UltraFeedback
# ---------------------------------------------------------------------------


def ultrafeedback_items(path: Path, project: str, annotator_id: str) -> Iterator[_Item]:
    seen: Counter[str] = Counter()
    for number, row in _lines(path):
        where = f"{path}:{number}"
        instruction = row.get("instruction")
        completions = row.get("completions")
        if not isinstance(instruction, str):
            raise FormatError(f"{where}: instruction: must be a string")
        if not isinstance(completions, list) or not all(isinstance(c, dict) for c in completions):
            raise FormatError(f"{where}: completions: must be a list of objects")
        key = _dumps(row)
        occurrence = seen[key]
        seen[key] += 1
        task_id = "uf-" + _digest(project, key, str(occurrence))[:32]

        skeleton = dict(row)
        skeleton["instruction"] = None
        skeleton_completions = []
        aspects: list[str] = []
        for i, completion in enumerate(completions):
            if not isinstance(completion.get("response"), str):
                raise FormatError(f"{where}: completions[{i}].response: must be a string")
            annotations = completion.get("annotations", None)
            if annotations is not None and not (isinstance(annotations, dict) and all(isinstance(a, dict) for a in annotations.values())):
                raise FormatError(f"{where}: completions[{i}].annotations: must map aspects to objects")
            shell = dict(completion)
            shell["response"] = None
            if annotations is not None:
                shell["annotations"] = {aspect: None for aspect in annotations}
                aspects.extend(a for a in annotations if a not in aspects)
            skeleton_completions.append(shell)
        skeleton["completions"] = skeleton_completions

        task_meta = {FORMAT_KEY: "ultrafeedback"}
        put_long(task_meta, UF_ROW, _dumps(skeleton))
        records: list[pb.FeedbackRecord] = []
        for aspect in aspects:
            entries: list[pb.Ratings.Entry] = []
            meta: dict[str, str] = {UF_ASPECT: aspect}
            unrated: dict[str, Any] = {}
            for i, completion in enumerate(completions):
                annotation = (completion.get("annotations") or {}).get(aspect)
                if annotation is None:
                    continue
                cid = f"c{i}"
                unrated[cid] = annotation
                value = _number(annotation.get("Rating"))
                if value is not None:
                    entries.append(pb.Ratings.Entry(candidate_id=cid, aspect=aspect, value=value))
                rationale = annotation.get("Rationale")
                simple = list(annotation) == ["Rating", "Rationale"] and isinstance(rationale, str) and value is not None and annotation["Rating"] == rating_text(value)
                if isinstance(rationale, str):
                    put_long(meta, UF_RATIONALE + cid, rationale)
                if not simple:
                    put_long(meta, UF_ANNOTATION + cid, _dumps(annotation))
            if not entries:  # nothing to rate on: keep the annotations with the task
                put_long(task_meta, UF_UNRATED + aspect, _dumps(unrated))
                continue
            records.append(
                pb.FeedbackRecord(
                    feedback_id="uf-" + _digest(task_id, aspect, annotator_id)[:32],
                    project=project,
                    task_id=task_id,
                    annotator_id=annotator_id,
                    metadata=meta,
                    ratings=pb.Ratings(entries=entries),
                )
            )
        task = Task(
            task_id=task_id,
            project=project,
            prompt_id="p-" + _digest(instruction)[:24],
            prompt=instruction,
            candidates=tuple(pb.Candidate(candidate_id=f"c{i}", text=c["response"]) for i, c in enumerate(completions)),
            rating_scales=tuple(pb.RatingScale(aspect=a, min=UF_SCALE[0], max=UF_SCALE[1]) for a in aspects),
            metadata=task_meta,
        )
        for r in records:
            r.prompt_id = task.prompt_id
        yield _Item(number, task, records)


def ultrafeedback_row(task: Task, records: Sequence[pb.FeedbackRecord]) -> dict[str, Any]:
    """One UltraFeedback row from a task and one annotator's ratings records of it."""
    annotations: dict[str, dict[str, Any]] = {c.candidate_id: {} for c in task.candidates}  # cid -> aspect -> annotation
    for record in records:
        meta = record.metadata
        for entry in record.ratings.entries:
            annotations[entry.candidate_id][entry.aspect] = {
                "Rating": rating_text(entry.value),
                "Rationale": get_long(meta, UF_RATIONALE + entry.candidate_id) or "",
            }
        aspect = meta.get(UF_ASPECT)
        if aspect:  # whole annotations (N/A ratings, other fields) replace the plain ones
            for c in task.candidates:
                full = get_long(meta, UF_ANNOTATION + c.candidate_id)
                if full is not None:
                    annotations[c.candidate_id][aspect] = json.loads(full)
    for key in task.metadata:
        if key.startswith(UF_UNRATED) and "#" not in key:
            aspect = key[len(UF_UNRATED) :]
            for cid, annotation in json.loads(get_long(task.metadata, key) or "{}").items():
                annotations.setdefault(cid, {})[aspect] = annotation

    skeleton_text = get_long(task.metadata, UF_ROW)
    if skeleton_text is None:  # a task of this service: a plain row
        return {
            "instruction": task.prompt,
            "completions": [
                {"model": f"policy-v{c.policy_version}", "response": c.text, "annotations": annotations[c.candidate_id]}
                for c in task.candidates
            ],
        }
    row = json.loads(skeleton_text)
    row["instruction"] = task.prompt
    for c, shell in zip(task.candidates, row["completions"]):
        shell["response"] = c.text
        if isinstance(shell.get("annotations"), dict):
            shell["annotations"] = {aspect: annotations[c.candidate_id].get(aspect) for aspect in shell["annotations"]}
    return row


# ---------------------------------------------------------------------------
# raw records and tasks
# ---------------------------------------------------------------------------


def jsonl_items(path: Path, projects: set[str] | None) -> Iterator[_Item]:
    from google.protobuf import json_format

    for number, value in _lines(path):
        body = value["record"] if isinstance(value.get("record"), dict) else value
        try:
            record = json_format.ParseDict(body, pb.FeedbackRecord())
        except json_format.ParseError as err:
            raise FormatError(f"{path}:{number}: {err}") from None
        if projects is None or record.project in projects:
            yield _Item(number, None, [record])


def tasks_items(path: Path, projects: set[str] | None) -> Iterator[_Item]:
    for number, task in enumerate(read_tasks(path), start=1):
        if projects is None or task.project in projects:
            yield _Item(number, task, [])


# ---------------------------------------------------------------------------
# import and export
# ---------------------------------------------------------------------------


def _batches(items: Iterable[_Item], size: int) -> Iterator[list[_Item]]:
    batch: list[_Item] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def import_file(
    store: SqlStore,
    fmt: str,
    path: Path,
    project: str = "default",
    annotator_id: str | None = None,
    only_projects: Iterable[str] | None = None,
    batch_lines: int = 500,
) -> ImportReport:
    """Import a file into the store: tasks through `add_tasks`, records through
    `write_batch` (the validation gRPC submissions get). Raises FormatError
    for a line that cannot be read at all; records and tasks the store rejects
    are counted and reported in `errors`, the rest is imported."""
    path = Path(path)
    wanted = set(only_projects) if only_projects else None
    if fmt == "hh-rlhf":
        items = hh_rlhf_items(path, project, annotator_id or "hh-rlhf")
    elif fmt == "ultrafeedback":
        items = ultrafeedback_items(path, project, annotator_id or "ultrafeedback")
    elif fmt == "jsonl":
        items = jsonl_items(path, wanted)
    elif fmt == "tasks-jsonl":
        items = tasks_items(path, wanted)
    else:
        raise ValueError(f"format: expected one of {', '.join(IMPORT_FORMATS)}, got {fmt!r}")
    report = ImportReport()
    try:
        for batch in _batches(items, batch_lines):
            report.lines += len(batch)
            tasks = [item for item in batch if item.task is not None]
            bad_lines: set[int] = set()
            if tasks:
                for item, outcome in zip(tasks, store.add_tasks([item.task for item in tasks])):
                    if outcome.rejection is not None:
                        bad_lines.add(item.line)
                        report.errors.append(f"{path}:{item.line}: task {outcome.rejection.field}: {outcome.rejection.reason}")
                    elif outcome.created:
                        report.tasks_created += 1
                    else:
                        report.tasks_existing += 1
            pending = [(item.line, r) for item in batch if item.line not in bad_lines for r in item.records]
            if not pending:
                continue
            for (line, record), outcome in zip(pending, store.write_batch([r for _, r in pending])):
                if outcome.status == Status.ACCEPTED:
                    report.records_accepted += 1
                elif outcome.status == Status.DUPLICATE:
                    report.records_duplicate += 1
                else:
                    rejection = outcome.rejection
                    report.errors.append(f"{path}:{line}: record {record.feedback_id!r}: {rejection.field}: {rejection.reason}")
    except JsonlError as err:
        raise FormatError(str(err)) from None
    return report


def export_lines(store: SqlStore, fmt: str, projects: list[str] | None, after: int = 0) -> Iterator[str]:
    """Lines of the export, read page by page."""
    if fmt == "jsonl":
        for stored in store.iter_after(after, projects):
            yield record_to_json(stored)
        return
    if fmt == "tasks-jsonl":
        for task in store.iter_tasks(projects):
            yield task_to_json(task)
        return
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format: expected one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    tasks: dict[str, Task | None] = {}

    def task_of(task_id: str) -> Task | None:
        if task_id not in tasks:
            tasks[task_id] = store.get_task(task_id)
        return tasks[task_id]

    if fmt == "hh-rlhf":
        for stored in store.iter_after(after, projects):
            task = task_of(stored.record.task_id)
            if task is None:
                continue
            for pair in pairs_of(stored.record, task):
                yield hh_rlhf_line(pair)
        return
    # ultrafeedback: one row per (task, annotator), in the order of their first ratings record
    groups: dict[tuple[str, str], list[pb.FeedbackRecord]] = {}
    for stored in store.iter_after(after, projects):
        record = stored.record
        if record.WhichOneof("judgement") == "ratings":
            groups.setdefault((record.task_id, record.annotator_id), []).append(record)
    for (task_id, _), records in groups.items():
        task = task_of(task_id)
        if task is not None:
            yield _dumps(ultrafeedback_row(task, records))
