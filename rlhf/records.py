"""The plain record types the Ray-free core reads: a labeling task as the store keeps it, its
gold answer, and a committed feedback record in the store's total order.

They hold protobuf messages of the wire contract (`hitl.feedback.v1`) but nothing of gRPC;
validation of incoming records lives with the service (services/feedback/records.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from hitl.feedback.v1 import feedback_pb2 as pb


@dataclass(frozen=True)
class GoldAnswer:
    """The known answer of a gold task (a pair): which candidate is better, or a tie.

    Gold answers grade annotators (see `rlhf.quality`); the store keeps them apart
    from the task message, which is what annotators are sent, so they never leave
    the store through `PullTasks`.
    """

    better: str | None  # candidate id of the better answer; None: the two are equally good

    @property
    def is_tie(self) -> bool:
        return self.better is None


@dataclass(frozen=True)
class Task:
    """A labeling task as the store keeps it."""

    task_id: str
    project: str
    prompt_id: str
    prompt: str
    candidates: tuple[pb.Candidate, ...]
    rating_scales: tuple[pb.RatingScale, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    annotations_wanted: int = 1
    gold: GoldAnswer | None = None  # known answer; never part of `to_proto()`

    @functools.cached_property
    def candidate_ids(self) -> frozenset[str]:
        return frozenset(c.candidate_id for c in self.candidates)

    @functools.cached_property
    def record_prompt_ids(self) -> frozenset[str]:
        """The prompt_id values a record judging this task may carry: the task's own, or none ("")."""
        return frozenset(("", self.prompt_id))

    def to_proto(self) -> pb.LabelingTask:
        """The task as annotators receive it: without its gold answer."""
        return pb.LabelingTask(
            task_id=self.task_id,
            project=self.project,
            prompt_id=self.prompt_id,
            prompt=self.prompt,
            candidates=list(self.candidates),
            rating_scales=list(self.rating_scales),
            metadata=self.metadata,
        )

    @classmethod
    def from_proto(cls, msg: pb.LabelingTask, annotations_wanted: int = 1, gold: GoldAnswer | None = None) -> "Task":
        return cls(
            task_id=msg.task_id,
            project=msg.project,
            prompt_id=msg.prompt_id,
            prompt=msg.prompt,
            candidates=tuple(msg.candidates),
            rating_scales=tuple(msg.rating_scales),
            metadata=dict(msg.metadata),
            annotations_wanted=annotations_wanted,
            gold=gold,
        )


@dataclass(frozen=True)
class StoredRecord:
    """One committed record, in the store's total order."""

    seq: int  # position in the store's total order (the watermark counts these)
    record: pb.FeedbackRecord
    received_at: float  # server clock, seconds since the epoch
