"""JSONL in and out: records and tasks as proto3 JSON, and HH-RLHF pairs.

A record line is a `FeedbackRecord` in the proto3 JSON mapping (field names
as in the .proto, e.g. `{"feedback_id": "...", "preference": {...}}`); a task
line is a `LabelingTask` plus an optional `annotations_wanted`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, TextIO

from google.protobuf import json_format

from hitl.feedback.v1 import feedback_pb2 as pb

from services.feedback.records import StoredRecord, Task


class JsonlError(ValueError):
    """A line of a JSONL file cannot be read; the message names the line."""


def _lines(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise JsonlError(f"{path}:{number}: not JSON ({err.msg})") from None
            if not isinstance(value, dict):
                raise JsonlError(f"{path}:{number}: expected a JSON object")
            yield number, value


def read_records(path: Path) -> Iterator[pb.FeedbackRecord]:
    for number, value in _lines(path):
        try:
            yield json_format.ParseDict(value, pb.FeedbackRecord())
        except json_format.ParseError as err:
            raise JsonlError(f"{path}:{number}: {err}") from None


def read_tasks(path: Path) -> Iterator[Task]:
    for number, value in _lines(path):
        wanted = value.pop("annotations_wanted", 1)
        if not isinstance(wanted, int) or isinstance(wanted, bool):
            raise JsonlError(f"{path}:{number}: annotations_wanted must be an integer")
        try:
            msg = json_format.ParseDict(value, pb.LabelingTask())
        except json_format.ParseError as err:
            raise JsonlError(f"{path}:{number}: {err}") from None
        yield Task.from_proto(msg, annotations_wanted=wanted)


def record_to_json(stored: StoredRecord) -> str:
    body = json_format.MessageToDict(stored.record, preserving_proto_field_name=True)
    return json.dumps({"seq": stored.seq, "received_at": stored.received_at, "record": body}, ensure_ascii=False)


@dataclass(frozen=True)
class Pair:
    """A chosen/rejected pair of one prompt, from a preference or a ranking."""

    prompt: str
    chosen: str
    rejected: str
    feedback_id: str
    annotator_id: str


def pairs_of(record: pb.FeedbackRecord, task: Task) -> list[Pair]:
    """Strict preferences as pairs; ties and both-bad give none; rankings expand."""
    text = {c.candidate_id: c.text for c in task.candidates}
    kind = record.WhichOneof("judgement")
    out: list[Pair] = []
    if kind == "preference":
        p = record.preference
        if p.choice == pb.Preference.CHOICE_A:
            out.append(Pair(task.prompt, text[p.candidate_a_id], text[p.candidate_b_id], record.feedback_id, record.annotator_id))
        elif p.choice == pb.Preference.CHOICE_B:
            out.append(Pair(task.prompt, text[p.candidate_b_id], text[p.candidate_a_id], record.feedback_id, record.annotator_id))
    elif kind == "ranking":
        entries = sorted(record.ranking.entries, key=lambda e: e.rank)
        for i, better in enumerate(entries):
            for worse in entries[i + 1 :]:
                if better.rank < worse.rank:
                    out.append(Pair(task.prompt, text[better.candidate_id], text[worse.candidate_id], record.feedback_id, record.annotator_id))
    return out


def hh_rlhf_line(pair: Pair) -> str:
    """The Anthropic HH-RLHF layout: whole dialogues under `chosen` and `rejected`."""
    head = f"\n\nHuman: {pair.prompt}\n\nAssistant: "
    return json.dumps({"chosen": head + pair.chosen, "rejected": head + pair.rejected}, ensure_ascii=False)


def write_lines(lines: Iterable[str], out: TextIO) -> int:
    n = 0
    for line in lines:
        out.write(line + "\n")
        n += 1
    return n
