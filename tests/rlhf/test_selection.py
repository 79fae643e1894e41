"""The task-selection policies (rlhf/selection.py)."""

import random

import pytest

from rlhf.selection import SelectionConfig, choose_pair, held_out, merge_summaries, summarize
from rlhf.splits import bucket

ANSWERS = ["a long answer here", "short", "a medium answer", "short "]
SCORES = [0.9, -0.4, 0.1, -0.35]


def test_random_compares_the_first_two_samples():
    choice = choose_pair(ANSWERS[:2], None, SelectionConfig(), random.Random(0), validation_prompt=False)
    assert choice.pair == (0, 1) and choice.how == "random" and SelectionConfig().answers_per_prompt == 2


def test_margin_takes_the_closest_pair_of_different_answers():
    cfg = SelectionConfig(policy="margin", random_share=0.0)
    choice = choose_pair(ANSWERS, SCORES, cfg, random.Random(0), validation_prompt=False)
    # (1, 3) are 0.05 apart but the same text once stripped; the next closest is (1, 2)? no: (2, 3) at 0.45, (1, 2) at 0.5
    assert choice.pair == (2, 3) and choice.how == "margin"
    assert choice.margin == pytest.approx(0.45)
    assert choice.mean_margin > choice.margin and cfg.answers_per_prompt == 4


def test_held_out_prompts_and_the_random_share_stay_random():
    cfg = SelectionConfig(policy="margin", random_share=0.0)
    assert choose_pair(ANSWERS, SCORES, cfg, random.Random(0), validation_prompt=True).how == "random: held-out prompt"
    always = SelectionConfig(policy="margin", random_share=1.0)
    assert choose_pair(ANSWERS, SCORES, always, random.Random(0), validation_prompt=False).how == "random: share"
    assert choose_pair(ANSWERS, None, cfg, random.Random(0), validation_prompt=False).how == "random: no reward model yet"
    same = ["x", "x ", " x"]
    assert choose_pair(same, [0.0, 1.0, 2.0], cfg, random.Random(0), validation_prompt=False).how == "random: one distinct answer"
    # random pairs of the margin policy never pair identical texts when different ones exist
    rng = random.Random(1)
    for _ in range(50):
        c = choose_pair(ANSWERS, SCORES, always, rng, validation_prompt=False)
        assert ANSWERS[c.pair[0]].strip() != ANSWERS[c.pair[1]].strip()


def test_the_share_is_about_right():
    cfg = SelectionConfig(policy="margin", random_share=0.25)
    rng = random.Random(3)
    hows = [choose_pair(ANSWERS, SCORES, cfg, rng, validation_prompt=False).how for _ in range(2000)]
    assert 0.2 < hows.count("random: share") / len(hows) < 0.3


def test_held_out_matches_the_reward_models_split():
    ids = [f"p-{i:04d}" for i in range(200)]
    assert [held_out(i, 0.2, 7) for i in ids] == [bucket(i, 7) < 0.2 for i in ids]
    assert 20 < sum(held_out(i, 0.2, 7) for i in ids) < 60


def test_summaries_count_reasons_and_weigh_margins():
    cfg = SelectionConfig(policy="margin", random_share=0.0)
    one = summarize([choose_pair(ANSWERS, SCORES, cfg, random.Random(0), validation_prompt=False)])
    two = summarize([choose_pair(ANSWERS, None, cfg, random.Random(0), validation_prompt=False)] * 3)
    merged = merge_summaries(merge_summaries({}, one), two)
    assert merged["tasks"] == 4 and merged["by_reason"] == {"margin": 1, "random: no reward model yet": 3}
    assert merged["scored"] == 1 and merged["mean_margin_chosen"] == pytest.approx(0.45)
