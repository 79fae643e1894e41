"""Typed records of an evaluation: the items judged and the judges' verdicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Outcome = Literal["a", "b", "tie"]
"""A verdict on one item: answer A is better, answer B is better, or neither."""

OUTCOMES: tuple[Outcome, ...] = ("a", "b", "tie")


@dataclass(frozen=True)
class EvalItem:
    """One prompt and the two answers compared on it (A: the policy evaluated, B: its baseline)."""

    prompt: str
    answer_a: str
    answer_b: str
    category: str | None = None
    """The prompt's slice (from the prompt file's `category`); results are also given per slice."""


@dataclass(frozen=True)
class JudgeVerdicts:
    """One judge's verdicts, one per item in the items' order; None where the judge gave none
    (a human judgement that did not arrive before the timeout)."""

    judge: str
    verdicts: tuple[Outcome | None, ...]
    scores_a: tuple[float, ...] | None = None  # reward-model judge: each item's reward of answer A
    scores_b: tuple[float, ...] | None = None
    details: dict[str, Any] = field(default_factory=dict)  # judge-specific facts for the report (template version, ...)
    item_details: tuple[dict[str, Any], ...] | None = None  # per item (the llm judge's raw replies, human votes)

    def __post_init__(self) -> None:
        for v in self.verdicts:
            if v is not None and v not in OUTCOMES:
                raise ValueError(f"{self.judge}: verdict {v!r} is not one of {OUTCOMES}")
