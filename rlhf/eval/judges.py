"""Judges of an evaluation: each gives a verdict (A better, B better, tie) on every item.

- `RuleJudge`: a rule of rlhf/quality/judges.py (what simulated annotators follow), without noise.
- `RewardModelJudge`: a reward model scores both answers; the higher wins, equal scores
  (within `tie_margin`) tie. Its scores are kept: the report gives each side's mean reward.
- `LlmJudge`: an OpenAI-compatible chat endpoint, asked with the versioned template
  `LLM_TEMPLATE` (`LLM_TEMPLATE_VERSION` goes into the report) twice per item, once with A
  shown first and once with B shown first. A verdict that survives the swap stands; one that
  flips with the order, or a reply that names neither answer, is a tie: a judge that always
  prefers the first (or second) position scores 1/2.
- The human judge lives in services/eval/human.py (it talks to the feedback store).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from rlhf.eval.config import LlmJudgeConfig
from rlhf.eval.records import EvalItem, JudgeVerdicts, Outcome
from rlhf.quality.judges import Judge, JudgeConfig


class PairJudge(Protocol):
    name: str

    def judge(self, items: Sequence[EvalItem]) -> JudgeVerdicts: ...


class RuleJudge:
    name = "rule"

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self.rule = Judge(cfg)

    def judge(self, items: Sequence[EvalItem]) -> JudgeVerdicts:
        verdicts = tuple(self.rule.compare(i.prompt, i.answer_a, i.answer_b) for i in items)
        return JudgeVerdicts(self.name, verdicts, details={"rule": self.cfg.rule, "tie_margin": self.cfg.tie_margin})


Scorer = Callable[[list[str], list[str]], Sequence[float]]
"""(prompts, responses) -> one reward per row: `RewardModel.score`, or the reward-model actors' `score`."""


class RewardModelJudge:
    name = "reward-model"

    def __init__(self, scorer: Scorer, tie_margin: float = 0.0, label: str | None = None):
        self.scorer = scorer
        self.tie_margin = tie_margin
        self.label = label

    def judge(self, items: Sequence[EvalItem]) -> JudgeVerdicts:
        prompts = [i.prompt for i in items]
        scores = [float(s) for s in self.scorer(prompts + prompts, [i.answer_a for i in items] + [i.answer_b for i in items])]
        a, b = scores[: len(items)], scores[len(items):]
        verdicts = tuple("tie" if abs(x - y) <= self.tie_margin else "a" if x > y else "b" for x, y in zip(a, b))
        details = {"tie_margin": self.tie_margin, **({"reward_model": self.label} if self.label else {})}
        return JudgeVerdicts(self.name, verdicts, scores_a=tuple(a), scores_b=tuple(b), details=details)


def reward_model_scorer(model, batch_size: int = 64) -> Scorer:
    """A `Scorer` over an `rlhf.reward.RewardModel` in this process."""

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        out: list[float] = []
        for k in range(0, len(prompts), batch_size):
            out.extend(float(s) for s in model.score(prompts[k:k + batch_size], responses[k:k + batch_size]).tolist())
        return out

    return score


LLM_TEMPLATE_VERSION = "pairwise-v1"
LLM_SYSTEM = "You are a careful, impartial judge of answers written by AI assistants."
LLM_TEMPLATE = (
    "Compare two answers to the same request and decide which one is better: more helpful, "
    "correct and appropriate. Do not let the order of the answers or their length decide.\n\n"
    "[Request]\n{prompt}\n\n[Answer A]\n{first}\n\n[Answer B]\n{second}\n\n"
    "Reply with exactly one letter: A if answer A is better, B if answer B is better."
)
"""The judge's prompt; any change to it or to `LLM_SYSTEM` needs a new `LLM_TEMPLATE_VERSION`."""

_ALONE = re.compile(r"^\W*([AB])\W*$", re.IGNORECASE)
_NAMED = re.compile(r"\banswer\s+([AB])\b", re.IGNORECASE)
_LEADING = re.compile(r"^\W*([AB])[.:)]")


def parse_choice(reply: str) -> str | None:
    """'A' or 'B' as the reply states it: the letter alone, the one answer it names ('answer
    B'), or a leading 'B.' / 'B:' / 'B)'; else None (a reply naming both, or neither)."""
    text = (reply or "").strip()
    m = _ALONE.match(text)
    if m:
        return m.group(1).upper()
    named = {x.upper() for x in _NAMED.findall(text)}
    if named:
        return named.pop() if len(named) == 1 else None
    m = _LEADING.match(text)
    return m.group(1) if m else None


def combine_orders(first: str | None, swapped: str | None) -> Outcome:
    """The verdict from the reply with A shown first and the reply with B shown first."""
    in_first = {"A": "a", "B": "b"}.get(first or "")
    in_swapped = {"A": "b", "B": "a"}.get(swapped or "")
    if in_first is not None and in_first == in_swapped:
        return in_first  # type: ignore[return-value]
    return "tie"


class LlmJudge:
    name = "llm"

    def __init__(self, cfg: LlmJudgeConfig, client=None):
        if client is None:
            from openai import OpenAI

            key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
            client = OpenAI(base_url=cfg.base_url, api_key=key or "none", timeout=cfg.timeout_s, max_retries=2)
        self.cfg = cfg
        self.client = client
        self._served: str | None = None

    def _model(self) -> str:
        """The configured model, else the first the endpoint lists (asked once)."""
        if self.cfg.model:
            return self.cfg.model
        if self._served is None:
            self._served = next(iter(self.client.models.list())).id
        return self._served

    def _ask(self, prompt: str, first: str, second: str) -> str:
        messages = [{"role": "system", "content": LLM_SYSTEM},
                    {"role": "user", "content": LLM_TEMPLATE.format(prompt=prompt, first=first, second=second)}]
        response = self.client.chat.completions.create(model=self._model(), messages=messages, temperature=0.0,
                                                       max_tokens=self.cfg.max_tokens)
        return response.choices[0].message.content or ""

    def judge(self, items: Sequence[EvalItem]) -> JudgeVerdicts:
        asks = [(i.prompt, i.answer_a, i.answer_b) for i in items] + [(i.prompt, i.answer_b, i.answer_a) for i in items]
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            replies = list(pool.map(lambda args: self._ask(*args), asks))
        first, swapped = replies[: len(items)], replies[len(items):]
        verdicts, per_item = [], []
        consistent = unparsed = 0
        for r1, r2 in zip(first, swapped):
            c1, c2 = parse_choice(r1), parse_choice(r2)
            verdict = combine_orders(c1, c2)
            unparsed += (c1 is None) + (c2 is None)
            consistent += c1 is not None and c2 is not None and combine_orders(c1, c2) != "tie"
            verdicts.append(verdict)
            per_item.append({"a_first": r1, "b_first": r2})
        details = {"template_version": LLM_TEMPLATE_VERSION, "model": self._model() if items else self.cfg.model, "base_url": self.cfg.base_url,
                   "consistent_across_orders": consistent, "unparsed_replies": unparsed}
        return JudgeVerdicts(self.name, tuple(verdicts), details=details, item_details=tuple(per_item))
