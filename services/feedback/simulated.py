"""Simulated annotators: they pull labeling tasks and submit preferences over real gRPC.

Each judges by a rule (`rlhf.quality.judges`) with its own noise rate, so an unattended
run has people-like feedback whose quality is known: with noise p, a judgement
agrees with the rule with probability 1 - p/2. With `correction_rate` > 0 an
annotator also corrects some tasks: the answer it preferred, edited by the rule
(`Judge.edit`), sent as a correction record beside the preference.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.quality.judges import Judge, JudgeConfig
from services.feedback.client import FeedbackClient

_CHOICE = {"a": pb.Preference.CHOICE_A, "b": pb.Preference.CHOICE_B, "tie": pb.Preference.CHOICE_TIE}


class AnnotatorConfig(BaseModel):
    """One simulated annotator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    annotator_id: str = Field(min_length=1, max_length=128)
    """Who the records say judged."""
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    """The rule this annotator follows."""
    noise: float = Field(0.1, ge=0.0, le=1.0)
    """Probability of answering by coin flip instead of by the rule."""
    correction_rate: float = Field(0.0, ge=0.0, le=1.0)
    """Probability of also correcting a task: the preferred answer edited by the rule, sent
    as a correction (skipped where the edit changes nothing)."""
    seed: int = 0
    """Seed of the annotator's own random choices."""
    batch: int = Field(16, ge=1, le=1000)
    """Tasks pulled per PullTasks call."""
    lease_seconds: int = Field(120, ge=1)
    """How long a pulled task is reserved for this annotator."""
    think_time_s: float = Field(0.0, ge=0.0, le=60.0)
    """Seconds spent reading each task before judging it (part of the lead time). Without it
    annotators label as fast as the CPU lets them, and one that writes no corrections can take
    most of a round's tasks; a pace like people's spreads them."""


@dataclass
class AnnotatorStats:
    judged: int = 0  # tasks judged
    corrected: int = 0  # of which also corrected
    accepted: int = 0  # records stored (preferences and corrections)
    rejected: int = 0
    idle_s: float = 0.0  # time with no task to take (pulls that found none), up to the last pull
    active_s: float = 0.0  # time from the first pull to the last


def overlap(spans: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of `spans` (non-overlapping (from, to) pairs) that fall in [start, end]."""
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans)


class SimulatedAnnotator:
    def __init__(self, cfg: AnnotatorConfig, client: FeedbackClient, project: str):
        self.cfg = cfg
        self.client = client
        self.project = project
        self.judge = Judge(cfg.judge)
        self.rng = random.Random(cfg.seed)
        self.stats = AnnotatorStats()
        self.idle_spans: list[tuple[float, float]] = []  # (from, to): no task to take, wall-clock seconds
        self.first_pull_at: float | None = None
        self.first_task_at: float | None = None  # the first pull that found a task: labeling began
        self._idle_since: float | None = None

    def judge_task(self, task: pb.LabelingTask, started: float | None = None) -> pb.FeedbackRecord:
        """One judgement: a preference between the task's first two candidates (`started`:
        when the annotator began on the task, for the lead time; default now)."""
        a, b = task.candidates[0], task.candidates[1]
        started = time.time() if started is None else started
        verdict = self.judge.noisy_compare(task.prompt, a.text, b.text, self.cfg.noise, self.rng)
        return self._record(task, started, preference=pb.Preference(candidate_a_id=a.candidate_id, candidate_b_id=b.candidate_id,
                                                                     choice=_CHOICE[verdict]))

    def correct_task(self, task: pb.LabelingTask, preference: pb.Preference) -> pb.FeedbackRecord | None:
        """A correction of the preferred candidate (the first on a tie or both-bad), drawn with
        probability `correction_rate`; None when not drawn or when the edit changes nothing."""
        if self.cfg.correction_rate == 0.0 or self.rng.random() >= self.cfg.correction_rate:
            return None
        chosen = preference.candidate_b_id if preference.choice == pb.Preference.CHOICE_B else preference.candidate_a_id
        original = next(c.text for c in task.candidates if c.candidate_id == chosen)
        started = time.time()
        edited = self.judge.edit(task.prompt, original)
        if not edited.strip() or edited.strip() == original.strip():
            return None
        return self._record(task, started, suffix="correction",
                            correction=pb.Correction(candidate_id=chosen, corrected_text=edited, note=f"edited by the {self.cfg.judge.rule} rule"))

    def _record(self, task: pb.LabelingTask, started: float, suffix: str = "", **judgement) -> pb.FeedbackRecord:
        key = uuid.uuid5(uuid.NAMESPACE_URL, task.task_id).hex[:8]
        return pb.FeedbackRecord(
            feedback_id=f"{self.cfg.annotator_id}:{task.task_id}:{key}" + (f":{suffix}" if suffix else ""),
            project=self.project,
            task_id=task.task_id,
            prompt_id=task.prompt_id,
            annotator_id=self.cfg.annotator_id,
            confidence=1.0 - self.cfg.noise / 2,
            lead_time_seconds=time.time() - started,
            metadata={"simulated": "true", "rule": self.cfg.judge.rule},
            **judgement,
        )

    def run_once(self, stop: threading.Event | None = None) -> int:
        """Pull a batch of tasks, judge them (`think_time_s` each), submit; returns how many
        were judged. When `stop` is set while thinking, what is judged is submitted and the
        rest is left to its lease."""
        tasks = list(self.client.pull_tasks(self.project, self.cfg.annotator_id, max_tasks=self.cfg.batch, lease_seconds=self.cfg.lease_seconds))
        if not tasks:
            return 0
        records = []
        judged = 0
        for t in tasks:
            started = time.time()
            if self.cfg.think_time_s and (stop.wait(self.cfg.think_time_s) if stop else time.sleep(self.cfg.think_time_s)):
                break  # stopped while reading this task
            records.append(self.judge_task(t, started))
            judged += 1
            correction = self.correct_task(t, records[-1].preference)
            if correction is not None:
                records.append(correction)
                self.stats.corrected += 1
        if not records:
            return 0
        results = self.client.submit(records)
        self.stats.judged += judged
        self.stats.accepted += sum(r.status != pb.RecordResult.STATUS_REJECTED for r in results)
        self.stats.rejected += sum(r.status == pb.RecordResult.STATUS_REJECTED for r in results)
        return judged

    def run(self, stop: threading.Event, idle_sleep_s: float = 0.2) -> AnnotatorStats:
        """Label until `stop` is set; the time between a pull that found no task and the
        next that found one is idle (`idle_spans`)."""
        while not stop.is_set():
            pulled_at = time.time()
            if self.first_pull_at is None:
                self.first_pull_at = pulled_at
            if self.run_once(stop) == 0:
                if self._idle_since is None:
                    self._idle_since = pulled_at
                stop.wait(idle_sleep_s)
            else:
                if self.first_task_at is None:
                    self.first_task_at = pulled_at
                if self._idle_since is not None:
                    self.idle_spans.append((self._idle_since, pulled_at))
                    self._idle_since = None
            self._tally(time.time())
        return self.stats

    def spans_until(self, now: float) -> list[tuple[float, float]]:
        """The idle spans, the one still open (if any) closed at `now`."""
        return self.idle_spans + ([(self._idle_since, now)] if self._idle_since is not None else [])

    def idle_fraction(self, start: float, end: float) -> float | None:
        """Share of [start, end] with no task to take, counted from the first task this
        annotator found (before it, the run was starting up: nobody had anything to do)."""
        start = max(start, self.first_task_at or end)
        if end <= start:
            return None
        return overlap(self.spans_until(end), start, end) / (end - start)

    def _tally(self, now: float) -> None:
        if self.first_pull_at is not None:
            self.stats.active_s = round(now - self.first_pull_at, 3)
            self.stats.idle_s = round(overlap(self.spans_until(now), self.first_pull_at, now), 3)
