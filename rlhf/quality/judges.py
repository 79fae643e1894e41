"""Rule-based judges: what simulated annotators prefer, and how win-rates are scored.

A judge scores one (prompt, response); comparing two scores gives a preference.
The same rule, without noise, scores the final policy against the initial one.

Rules (by name):
- ``positive``: more positive words than negative ones (a small lexicon).
- ``concise``: fewer words, as long as the answer is not empty.
- ``format``: answers that match a regular expression (e.g. a bulleted list).

A judge can also *edit* an answer the way a person following the rule would correct it
(`Judge.edit`): ``concise`` keeps the first sentence, ``positive`` drops the sentences with
negative words, ``format`` turns sentences into a bulleted list. Simulated annotators send
such edits as corrections.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

POSITIVE = frozenset(
    "good great excellent happy glad love wonderful amazing fantastic nice best delightful "
    "joy joyful pleasant positive beautiful brilliant awesome kind thank thanks enjoy fun "
    "success successful helpful hope hopeful bright cheerful perfect superb lovely".split()
)
NEGATIVE = frozenset(
    "bad terrible awful sad hate horrible worst poor ugly angry annoying boring negative "
    "wrong fail failure painful unpleasant disappointing sorry problem problems hard difficult "
    "unfortunately never nothing dull gloomy miserable".split()
)
NO_ANSWER = "(no answer)"
"""How an empty answer is shown in a labeling task (a candidate's text may not be empty):
judges score it as the empty answer it stands for, and training uses the empty text."""

_WORD = re.compile(r"[a-z']+")
_SENTENCE = re.compile(r"[^.!?\n]*(?:[.!?]+|\n|$)")


class JudgeConfig(BaseModel):
    """One rule a judge applies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: Literal["positive", "concise", "format"] = "positive"
    """What is preferred (see the module docstring)."""
    pattern: str = r"^\s*(?:[-*•]|\d+[.)])\s+\S"
    """``format`` only: a regular expression (multiline) that good answers match."""
    tie_margin: float = Field(0.0, ge=0.0)
    """Score differences at or below this are ties."""


def answer_text(shown: str) -> str:
    """The answer a task's candidate text stands for: empty for the ``NO_ANSWER`` placeholder."""
    return "" if shown.strip() == NO_ANSWER else shown


def shown_text(answer: str) -> str:
    """How an answer is shown in a labeling task: ``NO_ANSWER`` for an empty one."""
    return answer if answer.strip() else NO_ANSWER


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def positivity(text: str) -> float:
    ws = words(text)
    if not ws:
        return 0.0
    return (sum(w in POSITIVE for w in ws) - sum(w in NEGATIVE for w in ws)) / len(ws) ** 0.5


def conciseness(text: str) -> float:
    n = len(words(text))
    return -1e6 if n == 0 else -float(n)


@dataclass(frozen=True)
class Judge:
    cfg: JudgeConfig

    def score(self, prompt: str, response: str) -> float:
        return _SCORERS[self.cfg.rule](self.cfg, answer_text(response))

    def compare(self, prompt: str, a: str, b: str) -> Literal["a", "b", "tie"]:
        """Which answer the rule prefers."""
        sa, sb = self.score(prompt, a), self.score(prompt, b)
        if abs(sa - sb) <= self.cfg.tie_margin:
            return "tie"
        return "a" if sa > sb else "b"

    def edit(self, prompt: str, response: str) -> str:
        """The response corrected to follow the rule (unchanged where it already does)."""
        return _EDITORS[self.cfg.rule](response)

    def noisy_compare(self, prompt: str, a: str, b: str, noise: float, rng: random.Random) -> Literal["a", "b", "tie"]:
        """The rule's answer, replaced by a coin flip between a and b with probability `noise`."""
        if rng.random() < noise:
            return rng.choice(("a", "b"))
        return self.compare(prompt, a, b)


def _format_score(cfg: JudgeConfig, response: str) -> float:
    return float(bool(re.search(cfg.pattern, response, flags=re.MULTILINE)))


def sentences(text: str) -> list[str]:
    """The text's sentences (ended by . ! ? or a line break), stripped, empty ones left out."""
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def _first_sentence(response: str) -> str:
    parts = sentences(response)
    return parts[0] if parts and words(parts[0]) else response.strip()


def _without_negative(response: str) -> str:
    kept = [s for s in sentences(response) if not NEGATIVE.intersection(words(s))]
    return " ".join(kept) if kept and any(words(s) for s in kept) else response.strip()


def _bulleted(response: str) -> str:
    return "\n".join(f"- {s}" for s in sentences(response)) or response.strip()


_EDITORS: dict[str, Callable[[str], str]] = {
    "positive": _without_negative,
    "concise": _first_sentence,
    "format": _bulleted,
}


_SCORERS: dict[str, Callable[[JudgeConfig, str], float]] = {
    "positive": lambda cfg, r: positivity(r),
    "concise": lambda cfg, r: conciseness(r),
    "format": _format_score,
}


def win_rate(judge: Judge, prompts: list[str], new: list[str], old: list[str]) -> float:
    """Share of prompts where `new` beats `old` under the rule (ties count half)."""
    if not prompts:
        raise ValueError("win_rate needs at least one prompt")
    points = 0.0
    for p, a, b in zip(prompts, new, old, strict=True):
        verdict = judge.compare(p, a, b)
        points += 1.0 if verdict == "a" else 0.5 if verdict == "tie" else 0.0
    return points / len(prompts)
