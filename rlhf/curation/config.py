"""The `curation` section of the run config: duplicates, guideline versions.

    curation:
      dedup: true                      # exact and near duplicates out, this round and earlier ones
      near_duplicate_threshold: 0.8    # estimated Jaccard of word shingles
      min_guidelines_version: "2"      # judgements under older guidelines are set aside

Flagged content is always kept out of training; flags need no setting.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class CurationConfig(BaseModel):
    """What curation removes before training (`rlhf/curation/rules.py`)."""

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
