"""Which two answers of a prompt people are asked to compare: the task-selection policy.

``random`` compares two samples of the policy, as every run did before. ``margin`` samples
`candidates` answers, scores them with the reward model and asks about the pair it is least
sure of: the smallest score margin, where Bradley–Terry puts P(A > B) nearest 1/2
(uncertainty sampling). Two kinds of task stay random under ``margin``, so that what the
reward model is validated on is drawn as under ``random``:

- every prompt the reward model holds out for validation (the same hash of the prompt id,
  seed and fraction that `rlhf.reward.data.split_by_prompt` uses), and
- a `random_share` of the other prompts, so the training data keeps some of the policy's
  ordinary pairs as well.

Identical answers are never offered as a pair when two different ones exist: a margin of 0
between the same text is no uncertainty worth a judgement.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from rlhf.splits import bucket


class SelectionConfig(BaseModel):
    """`coordinator.selection`: how the loop picks the pairs it publishes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["random", "margin"] = "random"
    """``random``: two samples per prompt. ``margin``: the pair of `candidates` samples whose
    reward-model scores are closest."""
    candidates: int = Field(4, ge=2, le=16)
    """``margin`` only: answers sampled per prompt to choose the pair from."""
    random_share: float = Field(0.25, ge=0.0, le=1.0)
    """``margin`` only: share of the training prompts whose pair is drawn at random anyway
    (the reward model's held-out prompts always are)."""
    score_timeout_s: float = Field(10.0, gt=0.0)
    """``margin`` only: how long publishing waits for the reward model's scores (it may be
    training) before it falls back to a random pair, so annotators never wait on it."""
    seed: int = 0

    @property
    def answers_per_prompt(self) -> int:
        return self.candidates if self.policy == "margin" else 2


@dataclass(frozen=True)
class PairChoice:
    """The two answers (indices into the prompt's samples) a task shows, and why."""

    pair: tuple[int, int]
    how: str  # margin | random | random: held-out prompt | random: share | random: no reward model yet | random: reward model busy | random: one distinct answer
    margin: float | None = None  # |score difference| of the pair, when scored
    mean_margin: float | None = None  # the mean over every distinct pair of the prompt's samples, when scored


def held_out(prompt_id: str, fraction: float, seed: int) -> bool:
    """Whether the reward model holds this prompt out for validation (as `split_by_prompt` hashes it)."""
    return bucket(prompt_id, seed) < fraction


def choose_pair(answers: Sequence[str], scores: Sequence[float] | None, cfg: SelectionConfig, rng: random.Random,
                validation_prompt: bool) -> PairChoice:
    """The pair of `answers` to publish (`scores`: the reward model's, None when there is no
    trained model or it did not answer in time)."""
    distinct = [(i, j) for i, j in itertools.combinations(range(len(answers)), 2) if answers[i].strip() != answers[j].strip()]
    pairs = distinct or [(0, 1)]
    if cfg.policy == "random":
        return PairChoice((0, 1), "random")
    mean = (sum(abs(scores[i] - scores[j]) for i, j in pairs) / len(pairs)) if scores is not None else None
    if validation_prompt:
        how = "random: held-out prompt"
    elif rng.random() < cfg.random_share:
        how = "random: share"
    elif scores is None:
        how = "random: no reward model yet"
    elif not distinct:
        how = "random: one distinct answer"
    else:
        i, j = min(pairs, key=lambda p: (abs(scores[p[0]] - scores[p[1]]), p))
        return PairChoice((i, j), "margin", abs(scores[i] - scores[j]), mean)
    i, j = rng.choice(pairs)
    return PairChoice((i, j), how, abs(scores[i] - scores[j]) if scores is not None else None, mean)


def summarize(choices: Sequence[PairChoice]) -> dict:
    """What a policy chose: tasks per reason, and the mean margin of the chosen pairs beside
    the mean over all pairs (how much nearer the boundary the chosen ones lie)."""
    counts = Counter(c.how for c in choices)
    scored = [c for c in choices if c.margin is not None and c.mean_margin is not None]
    out: dict = {"tasks": len(choices), "by_reason": dict(sorted(counts.items())), "scored": len(scored)}
    if scored:
        out["mean_margin_chosen"] = round(sum(c.margin for c in scored) / len(scored), 4)  # type: ignore[misc]
        out["mean_margin_all_pairs"] = round(sum(c.mean_margin for c in scored) / len(scored), 4)  # type: ignore[misc]
    return out


def merge_summaries(a: dict, b: dict) -> dict:
    """Two `summarize` results as one (counts added, means weighted by scored tasks)."""
    counts = Counter(a.get("by_reason", {})) + Counter(b.get("by_reason", {}))
    out: dict = {"tasks": a.get("tasks", 0) + b.get("tasks", 0), "by_reason": dict(sorted(counts.items())),
                 "scored": a.get("scored", 0) + b.get("scored", 0)}
    for key in ("mean_margin_chosen", "mean_margin_all_pairs"):
        parts = [(s[key], s.get("scored", 0)) for s in (a, b) if key in s]
        if parts:
            total = sum(n for _, n in parts) or 1
            out[key] = round(sum(v * n for v, n in parts) / total, 4)
    return out
