"""Exports of the store: raw records as JSONL, preference pairs as HH-RLHF."""

from __future__ import annotations

from typing import Iterator

from services.feedback.jsonl import hh_rlhf_line, pairs_of, record_to_json
from services.feedback.records import Task
from services.feedback.store import SqlStore


def export_lines(store: SqlStore, fmt: str, projects: list[str] | None, after: int = 0) -> Iterator[str]:
    """Lines of the export, read page by page (memory stays bounded)."""
    if fmt == "jsonl":
        for stored in store.iter_after(after, projects):
            yield record_to_json(stored)
        return
    if fmt != "hh-rlhf":
        raise ValueError(f"format: expected 'hh-rlhf' or 'jsonl', got {fmt!r}")
    tasks: dict[str, Task | None] = {}
    for stored in store.iter_after(after, projects):
        record = stored.record
        if record.task_id not in tasks:
            tasks[record.task_id] = store.get_task(record.task_id)
        task = tasks[record.task_id]
        if task is None:
            continue
        for pair in pairs_of(record, task):
            yield hh_rlhf_line(pair)

