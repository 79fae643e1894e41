"""Typed preference data: what people said about pairs and rankings of responses.

The records mirror the wire contract (``protos/hitl/feedback/v1/feedback.proto``) with the
text resolved:

- :class:`PreferencePair`: A better, B better, tie or both bad, with an optional strength in
  (0, 1] for A/B ("how much better"; absent means not stated), an annotator id and a weight.
- :class:`Ranking`: K responses with ranks (1 is best, equal ranks are ties); it expands into
  its K(K-1)/2 pairs, each weighted 1 / (K(K-1)/2) so that one ranking counts as much as one
  pairwise judgement (the InstructGPT normalisation).
- :class:`AnnotatorWeights`: a trust weight per annotator, multiplied into each pair's weight.

:func:`soft_label` turns a pair into the Bradley–Terry training target P(A > B) (see
``docs/ARCHITECTURE.md``, "Reward model"): A/B with strength s give 0.5 +/- s/2, a tie
gives 0.5, both-bad is excluded by default.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal


class Choice(enum.Enum):
    """The judgement on a pair (``Preference.Choice`` on the wire)."""

    A = "a"  # response_a is better
    B = "b"  # response_b is better
    TIE = "tie"  # equally good
    BOTH_BAD = "both_bad"  # neither is acceptable


@dataclass(frozen=True)
class PreferencePair:
    """One pairwise judgement of two responses to the same prompt."""

    prompt: str
    response_a: str
    response_b: str
    choice: Choice
    strength: float | None = None  # in (0, 1] for A/B; None = not stated
    annotator_id: str = ""
    weight: float = 1.0  # >= 0; multiplies this pair's loss
    prompt_id: str = ""  # groups pairs of one prompt in the train/validation split

    def __post_init__(self) -> None:
        if self.strength is not None:
            if self.choice not in (Choice.A, Choice.B):
                raise ValueError(f"strength is only meaningful for A or B, got {self.choice}")
            if not 0.0 < self.strength <= 1.0:
                raise ValueError(f"strength must lie in (0, 1], got {self.strength}")
        if self.weight < 0.0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")

    @property
    def group_key(self) -> str:
        """What keeps all pairs of one prompt on the same side of a split."""
        return self.prompt_id or hashlib.sha256(self.prompt.encode()).hexdigest()

    def swapped(self) -> PreferencePair:
        """The same judgement with A and B exchanged."""
        flipped = {Choice.A: Choice.B, Choice.B: Choice.A}.get(self.choice, self.choice)
        return replace(self, response_a=self.response_b, response_b=self.response_a, choice=flipped)


@dataclass(frozen=True)
class Ranking:
    """K >= 2 responses to one prompt with ranks: 1 is best, equal ranks are ties."""

    prompt: str
    responses: tuple[str, ...]
    ranks: tuple[int, ...]  # ranks[i] is the rank of responses[i]
    annotator_id: str = ""
    weight: float = 1.0
    prompt_id: str = ""

    def __post_init__(self) -> None:
        if len(self.responses) < 2:
            raise ValueError("a ranking needs at least 2 responses")
        if len(self.ranks) != len(self.responses):
            raise ValueError(
                f"{len(self.ranks)} ranks for {len(self.responses)} responses"
            )
        if any(not 1 <= rank <= len(self.responses) for rank in self.ranks):
            raise ValueError(f"ranks must lie in [1, {len(self.responses)}], got {self.ranks}")
        if self.weight < 0.0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")

    @classmethod
    def ordered(
        cls,
        prompt: str,
        best_first: Sequence[str],
        annotator_id: str = "",
        weight: float = 1.0,
        prompt_id: str = "",
    ) -> Ranking:
        """A ranking without ties, from responses listed best first."""
        return cls(
            prompt=prompt,
            responses=tuple(best_first),
            ranks=tuple(range(1, len(best_first) + 1)),
            annotator_id=annotator_id,
            weight=weight,
            prompt_id=prompt_id,
        )

    def to_pairs(self) -> list[PreferencePair]:
        """All K(K-1)/2 pairs; the better-ranked response is A; each pair's weight is the
        ranking's weight divided by the number of pairs."""
        indices = list(itertools.combinations(range(len(self.responses)), 2))
        share = self.weight / len(indices)
        return [self._pair(i, j, share) for i, j in indices]

    def _pair(self, i: int, j: int, weight: float) -> PreferencePair:
        if self.ranks[j] < self.ranks[i]:
            i, j = j, i
        choice = Choice.TIE if self.ranks[i] == self.ranks[j] else Choice.A
        return PreferencePair(
            prompt=self.prompt,
            response_a=self.responses[i],
            response_b=self.responses[j],
            choice=choice,
            annotator_id=self.annotator_id,
            weight=weight,
            prompt_id=self.prompt_id,
        )


@dataclass(frozen=True)
class AnnotatorWeights:
    """Trust per annotator; annotators not listed get ``default``."""

    by_annotator: Mapping[str, float] = field(default_factory=dict)
    default: float = 1.0

    def of(self, annotator_id: str) -> float:
        return self.by_annotator.get(annotator_id, self.default)

    def apply(self, pairs: Iterable[PreferencePair]) -> list[PreferencePair]:
        """The pairs with each weight multiplied by its annotator's."""
        return [replace(pair, weight=pair.weight * self.of(pair.annotator_id)) for pair in pairs]


def expand(records: Iterable[PreferencePair | Ranking]) -> list[PreferencePair]:
    """Pairs and rankings as one list of pairs (rankings expanded, in order)."""
    pairs: list[PreferencePair] = []
    for record in records:
        pairs.extend(record.to_pairs() if isinstance(record, Ranking) else [record])
    return pairs


TieHandling = Literal["half", "exclude"]
BothBadHandling = Literal["exclude", "tie"]


def soft_label(
    pair: PreferencePair,
    *,
    ties: TieHandling = "half",
    both_bad: BothBadHandling = "exclude",
    unstated_strength: float = 1.0,
    label_smoothing: float = 0.0,
) -> float | None:
    """The target P(A > B) of a pair, or None when the pair is left out of the loss.

    A with strength s gives 0.5 + s/2 (s = 1: certain), B gives 0.5 - s/2, a tie 0.5 (or
    excluded), both-bad excluded (or treated as a tie). Label smoothing e then maps p to
    p (1 - e) + e / 2.
    """
    if pair.choice is Choice.BOTH_BAD:
        if both_bad == "exclude":
            return None
        target = 0.5
    elif pair.choice is Choice.TIE:
        if ties == "exclude":
            return None
        target = 0.5
    else:
        strength = unstated_strength if pair.strength is None else pair.strength
        sign = 1.0 if pair.choice is Choice.A else -1.0
        target = 0.5 + sign * strength / 2.0
    return target * (1.0 - label_smoothing) + label_smoothing / 2.0
