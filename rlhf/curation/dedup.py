"""Exact and near-duplicate detection for training items, in close to linear time.

An *item* is a prompt and one or more responses (a preference pair, a ranking, a
demonstration), judged within a *scope* (e.g. one annotator). Two items of the same scope are

- **exact duplicates** when their prompts and their sets of responses are equal after
  :func:`normalise` (Unicode NFKC, case folded, punctuation dropped, whitespace collapsed);
- **near duplicates** when their prompts are near duplicates and their responses can be
  paired off one to one into near duplicates. Two texts are near duplicates when the Jaccard
  similarity of their sets of word ``k``-shingles, estimated by MinHash over ``num_perm``
  hash functions, is at least ``threshold``.

:class:`DuplicateIndex` finds candidates with locality-sensitive hashing on the prompts'
signatures: ``bands x rows <= num_perm``, with ``rows`` the largest for which a pair of
prompts at exactly the threshold still shares a band with probability >= 0.99. A lookup
costs one dict probe for the exact key, ``bands`` probes for candidates, and a signature
comparison per candidate; building a signature is linear in the text's length. Per round
that is O(items x (num_perm + candidates)).

Signatures depend on ``num_perm``, ``shingle_size`` and ``seed``; an index saved with other
values cannot be compared and is refused on load.
"""

from __future__ import annotations

import base64
import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64(0xFFFFFFFF)
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    """The text as duplicates are compared: NFKC, case folded, punctuation and underscores
    replaced by spaces, whitespace collapsed."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NON_WORD.sub(" ", folded).split())


def shingles(text: str, size: int) -> set[str]:
    """Word ``size``-shingles of the normalised text; a text of fewer words is one shingle."""
    words = normalise(text).split()
    if len(words) <= size:
        return {" ".join(words)}
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def text_key(text: str) -> str:
    """Digest of the normalised text: equal for exact duplicates."""
    return hashlib.sha256(normalise(text).encode()).hexdigest()[:32]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The Jaccard similarity that two MinHash signatures estimate."""
    return float(np.mean(a == b))


def lsh_shape(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest chance candidates) for which two texts
    of similarity ``threshold`` share at least one band with probability >= 0.99."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= 0.99:
            best = (bands, rows)
    return best


class MinHasher:
    """MinHash signatures of word shingles: ``num_perm`` universal hashes
    ``(a * h + b) mod (2^61 - 1)`` of each shingle's 32-bit BLAKE2b hash, minimum per hash."""

    def __init__(self, num_perm: int = 64, shingle_size: int = 3, seed: int = 0) -> None:
        if num_perm < 1 or shingle_size < 1:
            raise ValueError(f"num_perm and shingle_size must be >= 1, got {num_perm}, {shingle_size}")
        self.num_perm, self.shingle_size, self.seed = num_perm, shingle_size, seed
        rng = np.random.default_rng(seed)
        # a, b < 2^31 and h < 2^32 keep a * h + b below 2^64: no overflow in uint64
        self._a = rng.integers(1, 1 << 31, size=num_perm, dtype=np.uint64)
        self._b = rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint32 signature of the text's shingles."""
        hashes = np.fromiter(
            (int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "big") for s in shingles(text, self.shingle_size)),
            dtype=np.uint64,
        )
        mixed = (hashes[:, None] * self._a[None, :] + self._b[None, :]) % _MERSENNE
        return (mixed & _MAX32).min(axis=0).astype(np.uint32)


@dataclass(frozen=True)
class Fingerprint:
    """What the index keeps of one item."""

    scope: str
    exact: str  # digest of scope, normalised prompt and sorted normalised responses
    prompt: np.ndarray  # MinHash signature of the prompt
    response_keys: tuple[str, ...]  # text_key of each response
    responses: tuple[np.ndarray, ...]  # MinHash signature of each response


@dataclass(frozen=True)
class Match:
    """An earlier item that a fingerprint duplicates."""

    kind: str  # "exact" or "near"
    tag: int  # the tag the earlier item was added with (e.g. its round)


class DuplicateIndex:
    """Items added so far, searchable for exact and near duplicates (see the module docstring)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 64, shingle_size: int = 3, seed: int = 0) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
        self.threshold = threshold
        self.hasher = MinHasher(num_perm, shingle_size, seed)
        self.bands, self.rows = lsh_shape(num_perm, threshold)
        self._entries: list[tuple[Fingerprint, int]] = []
        self._exact: dict[str, int] = {}
        self._buckets: dict[tuple[str, int, bytes], list[int]] = {}
        self.comparisons = 0
        """Candidate items compared by signature so far (what LSH keeps small)."""

    def __len__(self) -> int:
        return len(self._entries)

    def fingerprint(self, scope: str, prompt: str, responses: Sequence[str]) -> Fingerprint:
        keys = tuple(text_key(r) for r in responses)
        exact = hashlib.sha256("\0".join([scope, text_key(prompt), *sorted(keys)]).encode()).hexdigest()[:32]
        return Fingerprint(
            scope=scope, exact=exact, prompt=self.hasher.signature(prompt),
            response_keys=keys, responses=tuple(self.hasher.signature(r) for r in responses),
        )

    def similar(self, a: str, a_sig: np.ndarray, b: str, b_sig: np.ndarray) -> bool:
        """Whether two texts (their text_keys and signatures) are exact or near duplicates."""
        return a == b or jaccard(a_sig, b_sig) >= self.threshold

    def repeated_responses(self, fp: Fingerprint) -> list[int]:
        """Indices of responses that duplicate an earlier response of the same item."""
        out = []
        for j in range(1, len(fp.responses)):
            if any(self.similar(fp.response_keys[i], fp.responses[i], fp.response_keys[j], fp.responses[j]) for i in range(j)):
                out.append(j)
        return out

    def find(self, fp: Fingerprint) -> Match | None:
        """The earliest added item that ``fp`` duplicates, exactly or nearly; None if none."""
        if fp.exact in self._exact:
            return Match("exact", self._entries[self._exact[fp.exact]][1])
        for i in sorted(self._candidates(fp)):
            self.comparisons += 1
            other, tag = self._entries[i]
            if jaccard(fp.prompt, other.prompt) >= self.threshold and self._responses_match(fp, other):
                return Match("near", tag)
        return None

    def add(self, fp: Fingerprint, tag: int) -> None:
        """Remember an item (kept for training) under ``tag``."""
        index = len(self._entries)
        self._entries.append((fp, tag))
        self._exact.setdefault(fp.exact, index)
        for key in self._band_keys(fp):
            self._buckets.setdefault(key, []).append(index)

    def _band_keys(self, fp: Fingerprint) -> list[tuple[str, int, bytes]]:
        r = self.rows
        return [(fp.scope, band, fp.prompt[band * r : (band + 1) * r].tobytes()) for band in range(self.bands)]

    def _candidates(self, fp: Fingerprint) -> set[int]:
        found: set[int] = set()
        for key in self._band_keys(fp):
            found.update(self._buckets.get(key, ()))
        return found

    def _responses_match(self, a: Fingerprint, b: Fingerprint) -> bool:
        """Whether a's responses pair off one to one with near duplicates among b's."""
        if len(a.responses) != len(b.responses):
            return False
        free = list(range(len(b.responses)))
        for key, sig in zip(a.response_keys, a.responses):
            hit = next((j for j in free if self.similar(key, sig, b.response_keys[j], b.responses[j])), None)
            if hit is None:
                return False
            free.remove(hit)
        return True

    # -- persistence ------------------------------------------------------------------

    def state(self) -> dict:
        """A JSON-ready snapshot; :meth:`from_state` rebuilds the index from it."""
        h = self.hasher
        return {
            "num_perm": h.num_perm, "shingle_size": h.shingle_size, "seed": h.seed,
            "entries": [
                [fp.scope, fp.exact, _b64(fp.prompt), list(fp.response_keys), [_b64(s) for s in fp.responses], tag]
                for fp, tag in self._entries
            ],
        }

    @classmethod
    def from_state(cls, state: dict, threshold: float, num_perm: int, shingle_size: int, seed: int) -> DuplicateIndex:
        """An index with the saved entries; the signature parameters must be the saved ones."""
        index = cls(threshold, num_perm, shingle_size, seed)
        saved = {k: state.get(k) for k in ("num_perm", "shingle_size", "seed")}
        wanted = {"num_perm": num_perm, "shingle_size": shingle_size, "seed": seed}
        if state.get("entries") and saved != wanted:
            changed = ", ".join(f"{k}: saved {saved[k]}, now {wanted[k]}" for k in wanted if saved[k] != wanted[k])
            raise ValueError(f"the duplicate index was saved with other signature settings ({changed}); its signatures cannot be compared")
        for scope, exact, prompt, keys, sigs, tag in state.get("entries", []):
            fp = Fingerprint(scope, exact, _unb64(prompt), tuple(keys), tuple(_unb64(s) for s in sigs))
            index.add(fp, int(tag))
        return index


def _b64(sig: np.ndarray) -> str:
    return base64.b64encode(sig.astype("<u4").tobytes()).decode()


def _unb64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<u4").astype(np.uint32)
