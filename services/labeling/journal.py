"""The labeling session's local journal: no judgement is lost to a dropped connection.

One JSON object per line, appended in order:

    {"op": "task", "task_id": ..., "project": ..., "lease_expires_at": 1.7e9, "task": "<base64 LabelingTask>"}
    {"op": "judgement", "feedback_id": ..., "task_id": ..., "kind": ..., "summary": ..., "record": "<base64 FeedbackRecord>"}
    {"op": "done", "task_id": ..., "how": "judged" | "skipped"}
    {"op": "ack", "feedback_id": ..., "status": "accepted" | "duplicate", "seq": N}
    {"op": "rejected", "feedback_id": ..., "field": ..., "reason": ...}

A judgement line is written and fsynced before the record is first sent, and
the record is kept as its serialized bytes, so every resend carries the same
feedback_id and byte-identical content (the server answers DUPLICATE for what
it already stored). A judgement without an "ack" or "rejected" line is unsent.
Pulled tasks are journaled too: a task that is neither judged nor skipped and
whose lease has not expired comes back on the next start.

Opening a journal takes an exclusive lock (`<journal>.lock`) and compacts the
file to what is still needed: the unsent judgements and the open tasks.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from hitl.feedback.v1 import feedback_pb2 as pb


class JournalLocked(RuntimeError):
    """Another labeling session uses this journal."""


def default_journal_path(annotator_id: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    safe = "".join(ch if ch.isalnum() or ch in "-_.@" else "_" for ch in annotator_id) or "anonymous"
    return base / "hitl" / f"label-journal-{safe}.jsonl"


def _b64(message) -> str:
    return base64.b64encode(message.SerializeToString(deterministic=True)).decode("ascii")


@dataclass
class OpenTask:
    task: pb.LabelingTask
    lease_expires_at: float


class Journal:
    """Append-only JSONL journal with an in-memory view of what is unsent and open."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._lockfile = open(self.path.with_name(self.path.name + ".lock"), "a")
        try:
            fcntl.flock(self._lockfile.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise JournalLocked(f"another labeling session uses {self.path}") from None
        self.unsent: OrderedDict[str, pb.FeedbackRecord] = OrderedDict()
        self.open_tasks: OrderedDict[str, OpenTask] = OrderedDict()
        self.skipped_lines = 0
        self._load()
        self._compact()
        self._file = open(self.path, "a", encoding="utf-8")

    # -- reading ------------------------------------------------------------

    def _load(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                    self._apply(entry)
                except (ValueError, KeyError, TypeError):
                    # a torn last line from a crash while writing: that record was never sent
                    self.skipped_lines += 1

    def _apply(self, entry: dict) -> None:
        op = entry["op"]
        if op == "task":
            task = pb.LabelingTask.FromString(base64.b64decode(entry["task"]))
            self.open_tasks[task.task_id] = OpenTask(task, float(entry["lease_expires_at"]))
        elif op == "judgement":
            record = pb.FeedbackRecord.FromString(base64.b64decode(entry["record"]))
            self.unsent[record.feedback_id] = record
        elif op == "done":
            self.open_tasks.pop(entry["task_id"], None)
        elif op in ("ack", "rejected"):
            self.unsent.pop(entry["feedback_id"], None)

    def _compact(self) -> None:
        now = time.time()
        for task_id in [t for t, o in self.open_tasks.items() if o.lease_expires_at <= now]:
            del self.open_tasks[task_id]
        lines = [self._task_line(o.task, o.lease_expires_at) for o in self.open_tasks.values()]
        lines += [self._judgement_line(r, "") for r in self.unsent.values()]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(line) + "\n" for line in lines)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    # -- writing ------------------------------------------------------------

    @staticmethod
    def _task_line(task: pb.LabelingTask, lease_expires_at: float) -> dict:
        return {"op": "task", "task_id": task.task_id, "project": task.project, "lease_expires_at": lease_expires_at, "task": _b64(task)}

    @staticmethod
    def _judgement_line(record: pb.FeedbackRecord, summary: str) -> dict:
        return {
            "op": "judgement",
            "feedback_id": record.feedback_id,
            "task_id": record.task_id,
            "kind": record.WhichOneof("judgement") or "",
            "summary": summary,
            "at": time.time(),
            "record": _b64(record),
        }

    def _append(self, entry: dict, sync: bool) -> None:
        if self._file.closed:
            raise ValueError(f"the journal {self.path} is closed")
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())

    def add_task(self, task: pb.LabelingTask, lease_expires_at: float) -> None:
        with self._lock:
            self.open_tasks[task.task_id] = OpenTask(task, lease_expires_at)
            self._append(self._task_line(task, lease_expires_at), sync=False)

    def add_judgement(self, record: pb.FeedbackRecord, summary: str = "") -> None:
        """Durably journal a judgement (fsync) before it is sent."""
        with self._lock:
            self._append(self._judgement_line(record, summary), sync=True)
            self.unsent[record.feedback_id] = record

    def task_done(self, task_id: str, how: str) -> None:
        with self._lock:
            self.open_tasks.pop(task_id, None)
            self._append({"op": "done", "task_id": task_id, "how": how}, sync=False)

    def acked(self, feedback_id: str, status: str, seq: int) -> None:
        # not fsynced: losing an ack only means one more (deduplicated) resend
        with self._lock:
            self.unsent.pop(feedback_id, None)
            self._append({"op": "ack", "feedback_id": feedback_id, "status": status, "seq": seq}, sync=False)

    def rejected(self, feedback_id: str, field: str, reason: str) -> None:
        with self._lock:
            self.unsent.pop(feedback_id, None)
            self._append({"op": "rejected", "feedback_id": feedback_id, "field": field, "reason": reason}, sync=True)

    def pending(self, limit: int = 100) -> list[pb.FeedbackRecord]:
        """The oldest unsent records, in the order they were made."""
        with self._lock:
            out = []
            for record in self.unsent.values():
                out.append(record)
                if len(out) >= limit:
                    break
            return out

    def unsent_count(self) -> int:
        with self._lock:
            return len(self.unsent)

    def close(self) -> None:
        with self._lock:
            self._file.close()
            fcntl.flock(self._lockfile.fileno(), fcntl.LOCK_UN)
            self._lockfile.close()
