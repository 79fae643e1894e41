"""Splits stay put as a run's data grows: the reward model's train/validation split (by
prompt id) and the prompt train/evaluation split, over several rounds of growing data."""

import random

from rlhf.preferences import Choice, PreferencePair, expand
from rlhf.prompts import split_prompts
from rlhf.reward.config import RewardConfig
from rlhf.reward.data import split_by_prompt, training_pairs
from rlhf.splits import bucket


def _round_items(rng: random.Random, r: int, seen: list[str]) -> list[PreferencePair]:
    """A round's feedback: new prompts, and new judgements on prompts of earlier rounds."""
    new = [f"p-r{r}-{i}" for i in range(rng.randint(5, 40))]
    old = rng.sample(seen, min(len(seen), 15))
    seen.extend(new)
    items = []
    for pid in new + old:
        for _ in range(rng.randint(1, 3)):
            items.append(PreferencePair(f"prompt {pid}", f"a{rng.random()}", f"b{rng.random()}",
                                        rng.choice([Choice.A, Choice.B]), prompt_id=pid))
    rng.shuffle(items)
    return items


def test_reward_model_split_never_moves_a_prompt_across_rounds():
    cfg = RewardConfig()
    for seed in range(4):
        rng = random.Random(seed)
        items: list[PreferencePair] = []  # what the reward-model actor accumulates, in order
        seen: list[str] = []
        side: dict[str, str] = {}
        for r in range(8):
            items.extend(_round_items(rng, r, seen))
            split = split_by_prompt(training_pairs(expand(items), cfg), cfg.validation_fraction, cfg.split_seed)
            train = {p.group_key for p in split.train}
            validation = {p.group_key for p in split.validation}
            assert train and validation and not train & validation  # no prompt's pairs straddle
            assert train | validation == set(seen)
            for key in train | validation:
                now = "validation" if key in validation else "train"
                assert side.setdefault(key, now) == now, f"seed {seed}, round {r}: {key} moved to {now}"
        share = sum(s == "validation" for s in side.values()) / len(side)
        assert 0.1 < share < 0.3  # about validation_fraction (0.2) of the prompts


def test_both_sides_are_filled_from_the_first_two_prompts_on_and_stay():
    fraction, seed = 0.2, 0
    keys = [f"k{i}" for i in range(200)]
    a, b = [k for k in keys if bucket(k, seed) >= fraction][:2]  # both hash to training
    pairs = training_pairs([PreferencePair(f"q {k}", "x", "y", Choice.A, prompt_id=k) for k in (a, b)], RewardConfig())
    assert {p.group_key for p in split_by_prompt(pairs, fraction, seed).validation} == {b}
    more = pairs + training_pairs([PreferencePair(f"q {k}", "x", "y", Choice.A, prompt_id=k) for k in keys], RewardConfig())
    grown = split_by_prompt(more, fraction, seed)
    assert b in {p.group_key for p in grown.validation} and a in {p.group_key for p in grown.train}


def test_prompt_split_never_moves_a_prompt_as_the_prompt_set_grows():
    rng = random.Random(0)
    pool = [f"Question number {i} about {rng.random()}" for i in range(600)]
    side: dict[str, str] = {}
    for r in range(6):
        prompts = pool[: 100 * (r + 1)]
        rng.shuffle(prompts)  # sources read in another order
        split = split_prompts(prompts, 0.1, 0)
        assert not set(split.train) & set(split.evaluation)
        for p in prompts:
            now = "evaluation" if p in split.evaluation else "train"
            assert side.setdefault(p, now) == now
