"""Exact and near-duplicate detection (rlhf/curation/dedup.py): normalisation, MinHash estimates, LSH
banding, item matching within scopes, persistence, and the work a lookup does."""

import random

import numpy as np
import pytest

from rlhf.curation.dedup import DuplicateIndex, MinHasher, jaccard, lsh_shape, normalise, shingles

WORDS = ("apple river stone cloud bread lamp music garden window paper tiger honey silver "
         "forest candle mirror rocket pencil ocean violin marble desert kettle planet").split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_normalise_folds_case_punctuation_width_and_spaces():
    assert normalise("  Hello,   WORLD!! ") == "hello world"
    assert normalise("Ｈｅｌｌｏ_world") == "hello world"  # NFKC full-width letters, underscore
    assert shingles("a b c d", 3) == {"a b c", "b c d"}
    assert shingles("Hi there", 3) == {"hi there"}  # fewer words than a shingle: one shingle


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    base = [f"w{i}" for i in range(200)]
    other = base[:150] + [f"x{i}" for i in range(50)]  # 3-shingles: 148 shared of 252
    a, b = " ".join(base), " ".join(other)
    sa, sb = shingles(a, 3), shingles(b, 3)
    true = len(sa & sb) / len(sa | sb)
    h = MinHasher(num_perm=256, shingle_size=3, seed=1)
    assert jaccard(h.signature(a), h.signature(b)) == pytest.approx(true, abs=0.08)
    assert jaccard(h.signature(a), h.signature(a.upper() + " !")) == 1.0
    assert h.signature(_text(rng, 30)).dtype == np.uint32


def test_lsh_bands_catch_a_pair_at_the_threshold():
    for num_perm, threshold in ((64, 0.8), (64, 0.5), (128, 0.9), (32, 1.0)):
        bands, rows = lsh_shape(num_perm, threshold)
        assert bands * rows <= num_perm
        assert 1 - (1 - threshold**rows) ** bands >= 0.99
        # one more row per band would miss the guarantee (rows is the most that keeps it)
        if rows < num_perm:
            more = num_perm // (rows + 1)
            assert 1 - (1 - threshold ** (rows + 1)) ** more < 0.99


def test_exact_near_and_distinct_items():
    rng = random.Random(1)
    index = DuplicateIndex(threshold=0.8)
    prompt = _text(rng, 20)
    answer_a, answer_b = _text(rng, 40), _text(rng, 40)
    index.add(index.fingerprint("s", prompt, [answer_a, answer_b]), tag=0)

    # order of the responses, case and punctuation do not matter
    exact = index.fingerprint("s", prompt.upper() + "?", [answer_b + ".", answer_a])
    assert index.find(exact).kind == "exact"
    # one word changed in a 40-word answer: a near duplicate
    edited = answer_a.split()
    edited[20] = "zebra"
    near = index.fingerprint("s", prompt, [" ".join(edited), answer_b])
    assert index.find(near).kind == "near"
    # the same prompt with a different answer is new information
    assert index.find(index.fingerprint("s", prompt, [_text(rng, 40), answer_b])) is None
    # a long shared prompt does not make different short answers duplicates
    long_prompt = _text(rng, 300)
    index.add(index.fingerprint("s", long_prompt, ["yes it is", "no"]), tag=0)
    assert index.find(index.fingerprint("s", long_prompt, ["maybe later", "no"])) is None
    # another scope never matches
    assert index.find(index.fingerprint("t", prompt, [answer_a, answer_b])) is None


def test_repeated_responses_within_an_item():
    index = DuplicateIndex(threshold=0.8)
    fp = index.fingerprint("s", "p", ["The same answer.", "another one", "the same answer"])
    assert index.repeated_responses(fp) == [2]


def test_state_round_trip_and_changed_signature_settings_are_refused():
    rng = random.Random(2)
    index = DuplicateIndex(threshold=0.8, num_perm=32)
    items = [(_text(rng, 15), [_text(rng, 25)]) for _ in range(20)]
    for tag, (p, rs) in enumerate(items):
        index.add(index.fingerprint("s", p, rs), tag)
    restored = DuplicateIndex.from_state(index.state(), threshold=0.8, num_perm=32, shingle_size=3, seed=0)
    assert len(restored) == 20
    p, rs = items[7]
    assert restored.find(restored.fingerprint("s", p, rs)).tag == 7
    with pytest.raises(ValueError, match="num_perm: saved 32, now 64"):
        DuplicateIndex.from_state(index.state(), threshold=0.8, num_perm=64, shingle_size=3, seed=0)


def test_lookups_compare_few_candidates():
    """Distinct items: LSH hands almost no candidates to the signature comparison, so a round
    costs O(items), not O(items x index)."""
    rng = random.Random(3)
    index = DuplicateIndex(threshold=0.8)
    for i in range(1500):
        fp = index.fingerprint("s", _text(rng, 25), [_text(rng, 25)])
        assert index.find(fp) is None
        index.add(fp, i)
    assert index.comparisons < 150  # an all-pairs scan would compare about 1.1 million
