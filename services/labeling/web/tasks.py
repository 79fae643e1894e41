"""The tasks leased to each annotator of the web page, and what they did with them.

PullTasks never hands a task to the same annotator twice, so a task pulled for
an annotator must be kept until they judge or skip it (a page reload shows it
again), or until its lease runs out. The book also remembers the feedback_id
that finished each task: a resend of that judgement is let through (the
service answers DUPLICATE), while a second, different finishing judgement of
the same task (a second browser tab) is refused instead of being counted twice.

The book lives in memory: after a restart of `hitl label-web` the held tasks'
leases run out and free them for others, as with any lease that is not answered.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from hitl.feedback.v1 import feedback_pb2 as pb


@dataclass
class HeldTask:
    """One task leased to one annotator, with the order its candidates are shown in."""

    task: pb.LabelingTask
    lease_expires_at: float  # seconds since the epoch
    order: list[int]  # display position -> index into task.candidates

    def labels(self) -> list[str]:
        """The candidates' names on the page (as in the terminal): A/B for two, 1..K for more."""
        k = len(self.task.candidates)
        return ["A", "B"] if k == 2 else [str(i + 1) for i in range(k)]

    def to_json(self) -> dict[str, object]:
        """What the page needs to show and judge the task."""
        t = self.task
        return {
            "task_id": t.task_id,
            "prompt_id": t.prompt_id,
            "prompt": t.prompt,
            "candidates": [
                {"candidate_id": t.candidates[i].candidate_id, "text": t.candidates[i].text,
                 "policy_version": t.candidates[i].policy_version, "label": label}
                for label, i in zip(self.labels(), self.order)
            ],
            "rating_scales": [{"aspect": s.aspect, "min": s.min, "max": s.max} for s in t.rating_scales],
            "lease_expires_at": self.lease_expires_at,
            "metadata": dict(t.metadata),
        }


@dataclass
class Tally:
    """One annotator's counts through this server since it started."""

    pulled: int = 0
    judged: int = 0
    skipped: int = 0
    records: int = 0  # records the service accepted (duplicates not counted)


@dataclass
class _Desk:
    held: OrderedDict[str, HeldTask] = field(default_factory=OrderedDict)
    finished_by: OrderedDict[str, str] = field(default_factory=OrderedDict)  # task_id -> feedback_id ("" a skip)
    tally: Tally = field(default_factory=Tally)


class TaskBook:
    """Per annotator: held tasks in pull order, finished tasks, counts. Thread-safe, and bounded.

    Nothing here grows without limit, whatever the requests: at most `max_annotators` desks
    (the least recently used one is dropped: its held tasks' leases run out and free them,
    its tally starts again), at most `max_tasks` held and `max_tasks` finished task ids per
    desk (the oldest finished id is forgotten first: a very old task judged again from a
    forgotten tab is then counted twice here, and the service still stores each
    feedback_id once). Reading (current, held_count, tally, ...) never makes a desk."""

    def __init__(self, shuffle: bool = True, rng: random.Random | None = None,
                 max_annotators: int = 1000, max_tasks: int = 1000):
        self._shuffle = shuffle
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._max_annotators = max_annotators
        self._max_tasks = max_tasks
        self._desks: OrderedDict[str, _Desk] = OrderedDict()

    def _desk(self, annotator: str) -> _Desk:
        """The annotator's desk, made if need be and marked most recently used; call with the lock held."""
        desk = self._desks.get(annotator)
        if desk is None:
            desk = self._desks[annotator] = _Desk()
            while len(self._desks) > self._max_annotators:
                self._desks.popitem(last=False)
        else:
            self._desks.move_to_end(annotator)
        return desk

    def current(self, annotator: str, now: float | None = None) -> HeldTask | None:
        """The oldest held task whose lease has not run out (expired ones are dropped)."""
        now = time.time() if now is None else now
        with self._lock:
            desk = self._desks.get(annotator)
            if desk is None:
                return None
            held = desk.held
            for task_id in [tid for tid, h in held.items() if h.lease_expires_at <= now]:
                del held[task_id]
            return next(iter(held.values()), None)

    def held_count(self, annotator: str) -> int:
        with self._lock:
            desk = self._desks.get(annotator)
            return len(desk.held) if desk is not None else 0

    def add(self, annotator: str, task: pb.LabelingTask) -> bool:
        """Hold a newly pulled task; False if it is held or finished already, or the desk is full."""
        lease = task.lease_expires_at.seconds + task.lease_expires_at.nanos / 1e9
        with self._lock:
            desk = self._desk(annotator)
            if task.task_id in desk.held or task.task_id in desk.finished_by or len(desk.held) >= self._max_tasks:
                return False
            order = list(range(len(task.candidates)))
            if self._shuffle:
                self._rng.shuffle(order)
            desk.held[task.task_id] = HeldTask(task, lease, order)
            desk.tally.pulled += 1
            return True

    def conflicting_judgement(self, annotator: str, task_id: str, feedback_id: str) -> str | None:
        """The feedback_id of another judgement that already finished this task, if any."""
        with self._lock:
            desk = self._desks.get(annotator)
            done = desk.finished_by.get(task_id) if desk is not None else None
        return done if done and done != feedback_id else None

    def finish(self, annotator: str, task_id: str, feedback_id: str = "") -> bool:
        """Mark a task judged (by `feedback_id`, after the service stored it) or skipped (no id);
        False if it was finished before. A skip counts only for a task this annotator holds: a
        skip names any string, and what is not held is not remembered."""
        with self._lock:
            known = self._desks.get(annotator)
            if not feedback_id and (known is None or task_id not in known.held):
                return False
            desk = self._desk(annotator)
            desk.held.pop(task_id, None)
            if task_id in desk.finished_by:
                return False
            desk.finished_by[task_id] = feedback_id
            while len(desk.finished_by) > self._max_tasks:
                desk.finished_by.popitem(last=False)
            if feedback_id:
                desk.tally.judged += 1
            else:
                desk.tally.skipped += 1
            return True

    def count_accepted(self, annotator: str, n: int = 1) -> None:
        with self._lock:
            self._desk(annotator).tally.records += n

    def tally(self, annotator: str) -> Tally:
        with self._lock:
            desk = self._desks.get(annotator)
            if desk is None:
                return Tally()
            t = desk.tally
            return Tally(t.pulled, t.judged, t.skipped, t.records)

    def sizes(self) -> dict[str, int]:
        """How much the book holds: desks, and the most held / finished task ids on one desk."""
        with self._lock:
            desks = list(self._desks.values())
            return {"annotators": len(desks), "held": max((len(d.held) for d in desks), default=0),
                    "finished": max((len(d.finished_by) for d in desks), default=0)}
