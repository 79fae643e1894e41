"""Synthetic preferences that follow a hidden rule, for reward-model learning tests.

Each response is a short sentence of filler words plus some "liked" and "disliked" words;
its hidden quality is (#liked - #disliked). The preferred response of a pair is the one with
the higher quality (pairs of equal quality are not made). Label noise flips a share of the
judgements.
"""

from __future__ import annotations

import random

from rlhf.preferences import Choice, PreferencePair

LIKED = ("apple", "green", "happy", "river")
DISLIKED = ("stone", "grey", "angry", "desert")
FILLER = ("the", "a", "is", "was", "very", "and", "it", "we", "saw", "today", "there", "then")
TOPICS = ("fruit", "weather", "travel", "music", "cooking", "sports", "books", "gardens")


def quality(response: str) -> int:
    words = response.split()
    return sum(w in LIKED for w in words) - sum(w in DISLIKED for w in words)


def _response(rng: random.Random) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 6))]
    for _ in range(rng.randint(0, 2)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(LIKED))
    for _ in range(rng.randint(0, 2)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(DISLIKED))
    return " ".join(words)


def make_pairs(n: int, seed: int, noise: float = 0.0) -> list[PreferencePair]:
    """``n`` pairs over ``n // 4`` prompts; a share ``noise`` of the labels is flipped."""
    rng = random.Random(seed)
    pairs: list[PreferencePair] = []
    while len(pairs) < n:
        a, b = _response(rng), _response(rng)
        if quality(a) == quality(b):
            continue
        prompt_number = len(pairs) // 4
        prompt = f"Say something about {TOPICS[prompt_number % len(TOPICS)]} #{prompt_number}"
        choice = Choice.A if quality(a) > quality(b) else Choice.B
        if rng.random() < noise:
            choice = Choice.B if choice is Choice.A else Choice.A
        pairs.append(PreferencePair(prompt=prompt, response_a=a, response_b=b, choice=choice))
    return pairs
