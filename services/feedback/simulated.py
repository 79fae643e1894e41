"""Simulated annotators: they pull labeling tasks and submit preferences over real gRPC.

Each judges by a rule (`rlhf.judges`) with its own noise rate, so an unattended
run has people-like feedback whose quality is known: with noise p, a judgement
agrees with the rule with probability 1 - p/2.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.judges import Judge, JudgeConfig
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
    seed: int = 0
    """Seed of the annotator's own random choices."""
    batch: int = Field(16, ge=1, le=1000)
    """Tasks pulled per PullTasks call."""
    lease_seconds: int = Field(120, ge=1)
    """How long a pulled task is reserved for this annotator."""


@dataclass
class AnnotatorStats:
    judged: int = 0
    accepted: int = 0
    rejected: int = 0


class SimulatedAnnotator:
    def __init__(self, cfg: AnnotatorConfig, client: FeedbackClient, project: str):
        self.cfg = cfg
        self.client = client
        self.project = project
        self.judge = Judge(cfg.judge)
        self.rng = random.Random(cfg.seed)
        self.stats = AnnotatorStats()

    def judge_task(self, task: pb.LabelingTask) -> pb.FeedbackRecord:
        """One judgement: a preference between the task's first two candidates."""
        a, b = task.candidates[0], task.candidates[1]
        started = time.time()
        verdict = self.judge.noisy_compare(task.prompt, a.text, b.text, self.cfg.noise, self.rng)
        return pb.FeedbackRecord(
            feedback_id=f"{self.cfg.annotator_id}:{task.task_id}:{uuid.uuid5(uuid.NAMESPACE_URL, task.task_id).hex[:8]}",
            project=self.project,
            task_id=task.task_id,
            prompt_id=task.prompt_id,
            annotator_id=self.cfg.annotator_id,
            confidence=1.0 - self.cfg.noise / 2,
            lead_time_seconds=time.time() - started,
            preference=pb.Preference(candidate_a_id=a.candidate_id, candidate_b_id=b.candidate_id, choice=_CHOICE[verdict]),
            metadata={"simulated": "true", "rule": self.cfg.judge.rule},
        )

    def run_once(self) -> int:
        """Pull a batch of tasks, judge them, submit; returns how many were judged."""
        tasks = list(self.client.pull_tasks(self.project, self.cfg.annotator_id, max_tasks=self.cfg.batch, lease_seconds=self.cfg.lease_seconds))
        if not tasks:
            return 0
        results = self.client.submit([self.judge_task(t) for t in tasks])
        self.stats.judged += len(tasks)
        self.stats.accepted += sum(r.status != pb.RecordResult.STATUS_REJECTED for r in results)
        self.stats.rejected += sum(r.status == pb.RecordResult.STATUS_REJECTED for r in results)
        return len(tasks)

    def run(self, stop: threading.Event, idle_sleep_s: float = 0.2) -> AnnotatorStats:
        """Label until `stop` is set."""
        while not stop.is_set():
            if self.run_once() == 0:
                stop.wait(idle_sleep_s)
        return self.stats
