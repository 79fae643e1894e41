"""Curation, Ray-free: what of the stored feedback trains the reward model and the policy.

`rules.curate` turns a round's records into training items (preference pairs, rankings,
pairs made from ratings by `ratings`, demonstrations from corrections), dropping flagged
content, duplicates (`dedup`: exact and MinHash near-duplicates) and old guideline versions,
weighting annotators; `memory` keeps what earlier rounds used and flagged, so a resumed run
curates the same way; `config` is its `CurationConfig`."""

from rlhf.curation.config import CurationConfig, RatingPairsConfig
from rlhf.curation.memory import CurationMemory
from rlhf.curation.rules import Curated, FlaggedContent, curate, without_flagged

__all__ = ["Curated", "CurationConfig", "CurationMemory", "FlaggedContent", "RatingPairsConfig", "curate", "without_flagged"]
