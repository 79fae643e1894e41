"""Stable splits: a key's side depends on nothing but the key and a seed.

Used by the prompt train/evaluation split (``rlhf.prompts``) and the reward model's
train/validation split (``rlhf.reward.data``), so that as a run's data grows, round after
round, no prompt ever moves from one side to the other.
"""

from __future__ import annotations

import hashlib


def bucket(key: str, seed: int) -> float:
    """A uniform-looking number in [0, 1) from SHA-256 of (seed, key); keys with
    ``bucket < fraction`` are held out."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
