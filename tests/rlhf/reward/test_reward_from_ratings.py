"""Ratings move the reward model: a model trained only on the pairs curation makes from ratings
learns the rule the ratings follow (no Ray).

Tasks of 4 candidates from the synthetic rule (tests/rlhf/reward/synthetic.py: liked words
raise an answer's quality, disliked words lower it) are rated by an annotator on two aspects:
`helpfulness` (1..7) follows the quality, `length` (1..12) counts words and has weight 0. The
reward model trains on the curated pairs alone; its accuracy on held-out preference pairs of
unseen prompts, judged by the hidden rule, must rise from chance to well above it, and a model
trained on the same ratings inverted must learn the opposite order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.curation import CurationConfig, curate
from rlhf.curation.config import RatingPairsConfig
from rlhf.models import ModelConfig
from rlhf.preferences import Choice, PreferencePair
from rlhf.records import StoredRecord, Task
from rlhf.reward import RewardConfig, build_reward_model, evaluate_preferences, train_reward_model
from tests.rlhf.reward.synthetic import DISLIKED, FILLER, LIKED, TOPICS, make_pairs, quality

FAST = RewardConfig(head_init_std=0.5, max_length=96, batch_size=16, lr=3e-3, max_epochs=10, patience=3,
                    validation_fraction=0.2)
SCALES = (pb.RatingScale(aspect="helpfulness", min=1, max=7), pb.RatingScale(aspect="length", min=1, max=12))
CURATION = CurationConfig(ratings=RatingPairsConfig(aspect_weights={"length": 0.0}, margin=0.1))


def _answer(rng: random.Random) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 6))]
    for pool in (LIKED, DISLIKED):
        for _ in range(rng.randint(0, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(pool))
    return " ".join(words)


def rated_tasks(n: int, seed: int, invert: bool = False) -> tuple[list[Task], list[StoredRecord]]:
    """``n`` tasks of 4 answers and one annotator's ratings of each (helpfulness from the hidden
    quality, or its mirror image with ``invert``; length from the word count)."""
    rng = random.Random(seed)
    tasks, records = [], []
    for t in range(n):
        task_id = f"t{t}"
        cands = tuple(pb.Candidate(candidate_id=f"{task_id}-{i}", text=_answer(rng)) for i in range(4))
        tasks.append(Task(task_id=task_id, project="p", prompt_id=f"pid{t}", prompt=f"Tell me about {TOPICS[t % len(TOPICS)]}, part {t}",
                          candidates=cands, rating_scales=SCALES))
        entries = []
        for c in cands:
            helpful = min(7, max(1, 4 + quality(c.text)))
            entries += [pb.Ratings.Entry(candidate_id=c.candidate_id, aspect="helpfulness", value=8 - helpful if invert else helpful),
                        pb.Ratings.Entry(candidate_id=c.candidate_id, aspect="length", value=min(12, len(c.text.split())))]
        record = pb.FeedbackRecord(feedback_id=f"f{t}", project="p", task_id=task_id, annotator_id="rater",
                                   ratings=pb.Ratings(entries=entries))
        records.append(StoredRecord(seq=t + 1, record=record, received_at=0.0))
    return tasks, records


def pairs_from_ratings(n: int, seed: int, invert: bool = False) -> list[PreferencePair]:
    tasks, records = rated_tasks(n, seed, invert)
    curated = curate(records, {t.task_id: t for t in tasks}.get, cfg=CURATION)
    assert curated.outcomes == {"used/ratings": n}
    assert curated.counts["pairs_from_ratings"] == len(curated.items) == 6 * n  # every two of 4 answers (ties included)
    assert all(isinstance(p, PreferencePair) for p in curated.items)
    return curated.items


@dataclass(frozen=True)
class Moved:
    own_before: float  # accuracy on the rating pairs it trains on, before training
    own_after: float
    held_out_before: float  # on held-out pairs of unseen prompts, labelled by the hidden rule
    held_out_after: float


def train_on_ratings(tiny_cfg: ModelConfig, invert: bool) -> Moved:
    items = pairs_from_ratings(48, seed=3, invert=invert)
    held_out = make_pairs(200, seed=99)
    torch.manual_seed(0)
    model = build_reward_model(FAST, tiny_cfg)
    own_before, held_before = evaluate_preferences(model, items).accuracy, evaluate_preferences(model, held_out).accuracy
    train_reward_model(model, items)
    return Moved(own_before, evaluate_preferences(model, items).accuracy, held_before, evaluate_preferences(model, held_out).accuracy)


def test_rating_pairs_follow_the_helpfulness_ratings_only():
    """Length has weight 0: the pairs order answers by the hidden quality alone."""
    tasks, records = rated_tasks(6, seed=3)
    by_text = {c.text: quality(c.text) for t in tasks for c in t.candidates}
    items = curate(records, {t.task_id: t for t in tasks}.get, cfg=CURATION).items
    decided = [p for p in items if p.choice is Choice.A]
    assert decided and all(by_text[p.response_a] > by_text[p.response_b] for p in decided)
    assert all(by_text[p.response_a] == by_text[p.response_b] for p in items if p.choice is Choice.TIE)


@pytest.mark.slow
def test_ratings_move_the_reward_model(tiny_cfg: ModelConfig) -> None:
    moved = train_on_ratings(tiny_cfg, invert=False)
    assert moved.held_out_before < 0.7 and moved.own_before < 0.7  # the fresh model ranks at about chance
    assert moved.held_out_after >= 0.9 and moved.own_after >= 0.9
    assert moved.held_out_after - moved.held_out_before >= 0.2


@pytest.mark.slow
def test_inverted_ratings_teach_the_opposite_order(tiny_cfg: ModelConfig) -> None:
    """The control: the same answers rated the other way round; what the model learns comes
    from the ratings, not from the answers or the training."""
    moved = train_on_ratings(tiny_cfg, invert=True)
    assert moved.own_after >= 0.85  # it learns the (inverted) ratings
    assert moved.held_out_after <= 0.2  # and so ranks by the hidden rule the wrong way
