"""What preference optimisation trains on, made from curated judgements.

- DPO and IPO take pairs: a preferred and a dispreferred answer to one prompt (a preference
  for A or B; each ranked pair of a ranking; ties and "both bad" say nothing about the order
  and are left out).
- KTO takes single answers, each desirable or not (Ethayarajh et al. 2024): both answers of
  every pair (the preferred desirable, the other not), both answers of a "both bad" pair as
  undesirable, and corrections (the corrected text) as desirable. So every kind of judgement
  the loop collects, except ties, teaches it something.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rlhf.preferences import Choice, PreferencePair, Ranking, expand
from rlhf.sft.data import Demonstration


@dataclass(frozen=True)
class PairExample:
    prompt: str
    chosen: str
    rejected: str
    weight: float = 1.0


@dataclass(frozen=True)
class KTOExample:
    prompt: str
    completion: str
    desirable: bool
    weight: float = 1.0


def pairs_from(items: Iterable[PreferencePair | Ranking]) -> list[PairExample]:
    """Ordered pairs of every preference for A or B (rankings expanded); ties, both-bad pairs,
    zero-weight items and empty answers are left out."""
    out = []
    for pair in expand(items):
        if pair.choice not in (Choice.A, Choice.B) or pair.weight <= 0:
            continue
        chosen, rejected = (pair.response_a, pair.response_b) if pair.choice is Choice.A else (pair.response_b, pair.response_a)
        if chosen.strip() and rejected.strip() and chosen != rejected:
            out.append(PairExample(pair.prompt, chosen, rejected, pair.weight))
    return out


def kto_examples_from(items: Iterable[PreferencePair | Ranking], demonstrations: Sequence[Demonstration] = ()) -> list[KTOExample]:
    """Single judged answers: each pair's preferred answer desirable and the other not, both
    answers of a both-bad pair undesirable, each correction desirable (ties say nothing)."""
    out = []
    for pair in expand(items):
        if pair.weight <= 0:
            continue
        if pair.choice is Choice.BOTH_BAD:
            verdicts = [(pair.response_a, False), (pair.response_b, False)]
        elif pair.choice in (Choice.A, Choice.B):
            verdicts = [(pair.response_a, pair.choice is Choice.A), (pair.response_b, pair.choice is Choice.B)]
        else:
            continue
        out += [KTOExample(pair.prompt, text, good, pair.weight) for text, good in verdicts if text.strip()]
    out += [KTOExample(d.prompt, d.response, True, d.weight) for d in demonstrations if d.weight > 0 and d.response.strip()]
    return out
