"""The `curation` section of the run config: duplicates, guideline versions, ratings.

    curation:
      dedup: true                      # exact and near duplicates out, this round and earlier ones
      near_duplicate_threshold: 0.8    # estimated Jaccard of word shingles
      min_guidelines_version: "2"      # judgements under older guidelines are set aside
      ratings:                         # ratings become preference pairs (rlhf/curation/ratings.py)
        pair_on: overall               # or each_aspect: one pair per aspect on which two answers differ
        aspect_weights: {helpfulness: 2.0, verbosity: 0.0}   # 0 leaves an aspect out
        margin: 0.1                    # normalised difference a preference needs

Flagged content is always kept out of training; flags need no setting.
"""

from __future__ import annotations

import re

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_NUMBER = re.compile(r"\d+")


def version_key(version: str) -> tuple[int, ...] | None:
    """A guidelines version as comparable numbers: the digit runs in order, trailing zeros
    dropped ("v2.1" -> (2, 1), "2.1.0" -> (2, 1), "2024-05-01" -> (2024, 5, 1)); None when
    the version holds no number (or is empty)."""
    parts = [int(n) for n in _NUMBER.findall(version)]
    if not parts:
        return None
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


class RatingPairsConfig(BaseModel):
    """How ratings (a value per candidate and aspect, on the task's scales) become preference
    pairs for the reward model (`rlhf/curation/ratings.py`). Values are compared normalised by
    their aspect's scale: (value - min) / (max - min), in [0, 1]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    """Ratings become preference pairs; off, ratings records are counted `not_used/ratings`."""

    pair_on: Literal["overall", "each_aspect"] = "overall"
    """``overall``: one pair per two candidates of a task, compared on `overall_aspect` where
    both were rated on it, else on the weighted mean of the aspects both were rated on.
    ``each_aspect``: one pair per aspect and two candidates rated on it; the aspects share the
    ratings' weight in proportion to their weights."""

    overall_aspect: str | None = "overall"
    """The aspect that rates an answer as a whole; with ``pair_on: overall`` it decides alone
    where both candidates were rated on it (and its weight is not 0). None: always the
    weighted mean."""

    aspect_weights: dict[str, float] = Field(default_factory=dict)
    """Weight of each aspect, by name; an aspect not named gets `default_aspect_weight`, and an
    aspect of weight 0 is left out of pairing."""

    default_aspect_weight: float = Field(1.0, ge=0.0)
    """Weight of an aspect that `aspect_weights` does not name."""

    margin: float = Field(0.0, ge=0.0, lt=1.0)
    """Two candidates make a preference when their normalised ratings differ by more than
    this; equal ratings are a tie (trained as the reward config's `ties` says)."""

    within_margin: Literal["skip", "tie"] = "skip"
    """Two candidates whose ratings differ, but by no more than `margin`: ``skip`` makes no
    pair of them; ``tie`` makes a tie."""

    strength_from_difference: bool = False
    """The preference's strength is the normalised difference (so a 1-to-7 difference on a 1..7
    scale is certain, one step much less); off, strength is unstated and the reward config's
    `unstated_strength` applies."""

    @field_validator("aspect_weights")
    @classmethod
    def _weights_valid(cls, value: dict[str, float]) -> dict[str, float]:
        for aspect, weight in value.items():
            if not aspect:
                raise ValueError("an aspect name must not be empty")
            if not (math.isfinite(weight) and weight >= 0.0):
                raise ValueError(f"the weight of {aspect!r} must be a finite number >= 0, got {weight}")
        return value

    @model_validator(mode="after")
    def _some_weight(self) -> RatingPairsConfig:
        if self.enabled and self.default_aspect_weight == 0.0 and not any(self.aspect_weights.values()):
            raise ValueError("every aspect has weight 0, so ratings make no pairs: set enabled: false instead")
        return self

    def weight_of(self, aspect: str) -> float:
        """The aspect's weight (0: left out)."""
        return self.aspect_weights.get(aspect, self.default_aspect_weight)


class CurationConfig(BaseModel):
    """What curation removes before training, and how ratings become pairs (`rlhf/curation/rules.py`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dedup: bool = True
    """Remove exact and near duplicates: of an item kept earlier in the round, or used in an
    earlier round of the run (`rlhf/curation/dedup.py`)."""

    near_duplicate_threshold: float = Field(0.8, gt=0.0, le=1.0)
    """Two texts are near duplicates when the estimated Jaccard similarity of their word
    shingles is at least this; 1.0 leaves only exact duplicates (after normalisation)."""

    shingle_size: int = Field(3, ge=1, le=16)
    """Words per shingle."""

    num_permutations: int = Field(64, ge=8, le=1024)
    """MinHash functions per signature: more estimate the similarity more closely (standard
    error about sqrt(J (1 - J) / n)) and cost proportionally more."""

    dedup_seed: int = Field(0, ge=0)
    """Seed of the MinHash functions. Changing it, `num_permutations` or `shingle_size` makes a
    resumed run's saved signatures incomparable (refused on resume)."""

    per_annotator: bool = True
    """Judgements (preferences, rankings) of the same content by different annotators are
    independent labels and all kept; the same annotator's repeat counts once. Off: the same
    content counts once overall. Demonstrations always count once overall."""

    drop_identical_responses: bool = True
    """A preference between two responses that are duplicates of each other says nothing
    about which is better: dropped. In a ranking, the repeat of a response is removed."""

    min_guidelines_version: str | None = None
    """Judgements made under an older guidelines version are set aside (counted, not used).
    Versions compare by their numbers in order ("v2.1" < "v2.10" < "3")."""

    keep_unversioned: bool = False
    """With `min_guidelines_version` set: keep judgements that carry no guidelines version
    (otherwise they are set aside, since they cannot be shown to be current)."""

    ratings: RatingPairsConfig = Field(default_factory=RatingPairsConfig)
    """How ratings become preference pairs for the reward model (aspects, weights, margin)."""

    @field_validator("min_guidelines_version")
    @classmethod
    def _has_number(cls, value: str | None) -> str | None:
        if value is not None and version_key(value) is None:
            raise ValueError(f"must contain a version number, e.g. '2' or 'v2.1', got {value!r}")
        return value

    def set_aside_reason(self, guidelines_version: str) -> str | None:
        """Why a judgement under ``guidelines_version`` is set aside, or None to use it."""
        if self.min_guidelines_version is None:
            return None
        have = version_key(guidelines_version)
        if have is None:
            return None if self.keep_unversioned else "set_aside/unversioned_guidelines"
        return "set_aside/old_guidelines" if have < version_key(self.min_guidelines_version) else None  # type: ignore[operator]
