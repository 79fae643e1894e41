"""JSONL in and out: records and tasks as proto3 JSON (other formats: formats.py).

A record line is a `FeedbackRecord` in the proto3 JSON mapping (field names
as in the .proto, e.g. `{"feedback_id": "...", "preference": {...}}`); a task
line is a `LabelingTask` plus an optional `annotations_wanted` and an optional
`gold`: the known answer of a pair, `{"better": "<candidate_id>"}` or
`{"tie": true}` (stored apart from the task; never sent to annotators).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, TextIO

from google.protobuf import json_format

from hitl.feedback.v1 import feedback_pb2 as pb

from services.feedback.records import GoldAnswer, StoredRecord, Task


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
        gold = parse_gold(value.pop("gold", None), f"{path}:{number}")
        try:
            msg = json_format.ParseDict(value, pb.LabelingTask())
        except json_format.ParseError as err:
            raise JsonlError(f"{path}:{number}: {err}") from None
        yield Task.from_proto(msg, annotations_wanted=wanted, gold=gold)


def parse_gold(value: object, where: str) -> GoldAnswer | None:
    """A task line's `gold` field: absent/null, `{"better": "<candidate_id>"}` or `{"tie": true}`."""
    if value is None:
        return None
    if isinstance(value, dict) and set(value) == {"better"} and isinstance(value["better"], str) and value["better"]:
        return GoldAnswer(better=value["better"])
    if isinstance(value, dict) and set(value) == {"tie"} and value["tie"] is True:
        return GoldAnswer(better=None)
    raise JsonlError(f'{where}: gold must be {{"better": "<candidate_id>"}} or {{"tie": true}}, got {json.dumps(value)}')


def gold_to_json(gold: GoldAnswer) -> dict:
    """The inverse of `parse_gold`."""
    return {"tie": True} if gold.is_tie else {"better": gold.better}


def _sorted_metadata(body: dict) -> dict:
    # map fields come out of protobuf in no particular order; sorted, a line is reproducible
    if "metadata" in body:
        body["metadata"] = dict(sorted(body["metadata"].items()))
    return body


def record_to_json(stored: StoredRecord) -> str:
    body = _sorted_metadata(json_format.MessageToDict(stored.record, preserving_proto_field_name=True))
    return json.dumps({"seq": stored.seq, "received_at": stored.received_at, "record": body}, ensure_ascii=False)


def task_to_json(task: Task) -> str:
    """A task line as `read_tasks` reads it (and `hitl feedback tasks load` loads it)."""
    body = _sorted_metadata(json_format.MessageToDict(task.to_proto(), preserving_proto_field_name=True))
    body["annotations_wanted"] = task.annotations_wanted
    if task.gold is not None:
        body["gold"] = gold_to_json(task.gold)
    return json.dumps(body, ensure_ascii=False)


def write_lines(lines: Iterable[str], out: TextIO) -> int:
    n = 0
    for line in lines:
        out.write(line + "\n")
        n += 1
    return n


def load_gold_tasks(path: Path) -> list[Task]:
    """The gold pairs of a JSONL file of tasks (see `rlhf.quality.gold.check_gold_pool`)."""
    from rlhf.quality.gold import GoldFileError, check_gold_pool

    try:
        tasks = list(read_tasks(Path(path)))
    except (JsonlError, OSError) as err:
        raise GoldFileError(f"gold tasks file: {err}") from None
    return check_gold_pool(tasks, str(path))
