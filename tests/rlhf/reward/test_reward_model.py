"""The reward model on a tiny backbone: padding-independent scores, early stopping, save/load,
and learning a hidden rule from synthetic preferences (with and without label noise)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rlhf.models import LoraConfig, ModelConfig
from rlhf.preferences import Choice, PreferencePair
from rlhf.reward import (
    PairMetrics,
    RewardConfig,
    RewardTrainingReport,
    build_reward_model,
    evaluate_preferences,
    last_token_index,
    load_reward_model,
    train_reward_model,
)
from tests.rlhf.reward.synthetic import make_pairs

FAST = RewardConfig(head_init_std=0.5, max_length=96, batch_size=16, lr=3e-3,
                    max_epochs=10, patience=3, validation_fraction=0.2)


def test_last_token_index_for_either_padding_side() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 3, 3]


def test_score_does_not_depend_on_batch_neighbours_or_padding(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_reward_model(FAST, tiny_cfg)
    prompts = ["hi", "tell me about rivers and mountains", "ok"]
    responses = ["short", "a considerably longer answer with many more words in it", "x"]
    together = model.score(prompts, responses)
    alone = torch.cat([model.score([p], [r]) for p, r in zip(prompts, responses)])
    pairs_of_two = model.score(prompts, responses, batch_size=2)
    assert together.shape == (3,)
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(pairs_of_two, alone, atol=1e-5)
    assert len(set(together.tolist())) == 3  # the scores do read the input


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_scoring_equals_scoring_each_pair_alone(tiny_cfg: ModelConfig, lora: bool) -> None:
    torch.manual_seed(0)
    cfg = FAST.model_copy(update={"lora": LoraConfig(enabled=True) if lora else None,
                                  "score_batch_size": 5, "max_length": 40})
    model = build_reward_model(cfg, tiny_cfg)
    with torch.no_grad():  # adapters that change the output (B starts at zero)
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    long_prompt = "tell me about rivers and mountains " * 6  # longer than max_length: rows are cut on the left
    prompts = (["what is rain?"] * 4 + ["hi"] + [long_prompt] * 3 + ["name a fruit please"] * 7
               + ["same answers"] * 2)
    responses = ["wet", "water from clouds falling down", "", "rain is water"] + ["hello"] + [
        "rivers flow", "mountains rise high above the plains", "x"] + [f"fruit {i} " * i for i in range(7)] + [
        "identical", "identical"]
    shared = model.score(prompts, responses)
    alone = torch.stack([model.score([p], [r], share_prompts=False)[0] for p, r in zip(prompts, responses)])
    plain = model.score(prompts, responses, share_prompts=False)
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain, alone, atol=1e-5, rtol=1e-4)
    assert shared.std() > 0  # the scores differ: equality is not trivial


def test_shared_prompt_training_scores_give_the_same_gradients(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_reward_model(FAST.model_copy(update={"lora": LoraConfig(enabled=True, dropout=0.0)}), tiny_cfg)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    model.train()
    prompts = ["what is rain?", "name a fruit please", "what is rain?", "name a fruit please", "hi"]
    responses = ["water from clouds", "apple", "wet", "a ripe banana from the market", "hello"]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    grads = []
    for share in (True, False):
        model.zero_grad()
        scores = model.score_batch(prompts, responses, share_prompts=share)
        (scores * weights).sum().backward()
        grads.append((scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (shared, g_shared), (plain, g_plain) = grads
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-4)
    assert g_shared.keys() == g_plain.keys() and any("lora_A" in n for n in g_shared)
    for name in g_plain:  # equal up to float rounding, relative to the gradient's scale
        scale = g_plain[name].abs().max().item()
        assert (g_shared[name] - g_plain[name]).abs().max().item() <= 1e-5 * scale + 1e-7, name


def test_prompt_groups_share_only_common_tokens_and_keep_a_suffix() -> None:
    from rlhf.reward.model import MIN_SHARED_TOKENS, _chunks, _prompt_groups

    base = list(range(100, 100 + MIN_SHARED_TOKENS + 2))
    rows = [base + [1, 2], base + [1, 3], base[:-1], list(range(20)), base + [9], list(range(30))]
    prompts = ["a", "a", "a", "b", "c", "c"]
    groups, alone = _prompt_groups(prompts, rows)
    # group "a": the shortest row keeps one token after the shared prefix
    assert groups == [([0, 1, 2], len(base) - 2)]
    assert sorted(alone) == [3, 4, 5]  # "b" is alone; "c" shares no prefix
    assert _chunks([([0, 1, 2, 3, 4], 10), ([5, 6], 12)], 3) == [[([0, 1, 2], 10)], [([3, 4], 10)], [([5, 6], 12)]]


def test_lora_reward_model_trains_head_and_adapters_only(tiny_cfg: ModelConfig) -> None:
    model = build_reward_model(FAST.model_copy(update={"lora": LoraConfig(enabled=True)}), tiny_cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any(n.startswith("head.") for n in trainable)


@dataclass
class Learned:
    report: RewardTrainingReport
    held_out: PairMetrics  # on 200 new pairs with clean labels and unseen prompts


def _learn(cfg: RewardConfig, tiny_cfg: ModelConfig, noise: float, n_pairs: int = 240) -> Learned:
    torch.manual_seed(0)
    model = build_reward_model(cfg, tiny_cfg)
    report = train_reward_model(model, make_pairs(n_pairs, seed=1, noise=noise))
    return Learned(report, evaluate_preferences(model, make_pairs(200, seed=99)))


@pytest.fixture(scope="module")
def clean(tiny_cfg: ModelConfig) -> Learned:
    return _learn(FAST, tiny_cfg, noise=0.0)


@pytest.mark.slow
def test_learns_a_hidden_rule(clean: Learned) -> None:
    assert clean.report.validation_accuracy >= 0.9
    assert clean.held_out.accuracy >= 0.9
    best = clean.report.validation_loss[clean.report.best_epoch - 1]
    assert best == min(clean.report.validation_loss)
    assert clean.report.train_loss[-1] < clean.report.train_loss[0]


@pytest.mark.slow
def test_label_noise_lowers_accuracy_gracefully(clean: Learned, tiny_cfg: ModelConfig) -> None:
    noisy = _learn(FAST, tiny_cfg, noise=0.2)
    assert 0.7 <= noisy.held_out.accuracy <= clean.held_out.accuracy  # lower, far from 0.5
    assert noisy.report.validation_accuracy < clean.report.validation_accuracy
    assert min(noisy.report.validation_loss) > min(clean.report.validation_loss)


@pytest.mark.slow
def test_training_is_seeded_and_deterministic(tiny_cfg: ModelConfig) -> None:
    cfg = FAST.model_copy(update={"max_epochs": 2})
    first = _learn(cfg, tiny_cfg, noise=0.1, n_pairs=64)
    second = _learn(cfg, tiny_cfg, noise=0.1, n_pairs=64)
    assert first.report.train_loss == second.report.train_loss
    assert first.report.validation_loss == second.report.validation_loss
    assert first.held_out == second.held_out


@pytest.mark.slow
def test_early_stopping_keeps_the_best_epoch(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    cfg = FAST.model_copy(update={"lr": 3e-2, "max_epochs": 12, "patience": 1})
    model = build_reward_model(cfg, tiny_cfg)
    report = train_reward_model(model, make_pairs(96, seed=5, noise=0.3))
    assert report.stopped_early and report.epochs_run < cfg.max_epochs
    assert report.epochs_run == report.best_epoch + cfg.patience
    best = min(report.validation_loss)
    assert report.validation_loss[report.best_epoch - 1] == best


@pytest.mark.slow
def test_centred_scores_and_save_load_round_trip(tiny_cfg: ModelConfig, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = FAST.model_copy(update={"max_epochs": 2, "lora": LoraConfig(enabled=True, rank=4)})
    model = build_reward_model(cfg, tiny_cfg)
    pairs = make_pairs(64, seed=2)
    report = train_reward_model(model, pairs)
    assert report.offset != 0.0
    all_prompts = [p.prompt for p in pairs] * 2
    all_responses = [p.response_a for p in pairs] + [p.response_b for p in pairs]
    scores = model.score(all_prompts, all_responses)
    train_mean = scores.mean().item()
    assert abs(train_mean) < 0.5 * scores.abs().mean().item() + 1e-3  # near 0 after centring

    model.save(tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm")
    assert loaded.cfg == model.cfg
    assert torch.allclose(loaded.score(all_prompts, all_responses), scores, atol=1e-5)
    assert loaded.tokenizer.chat_template == model.tokenizer.chat_template


def test_ties_pull_scores_together(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    cfg = FAST.model_copy(update={"max_epochs": 6, "patience": 6, "center_scores": False})
    pairs = [PreferencePair(f"q{i}", "alpha beta", "gamma delta", Choice.TIE) for i in range(24)]
    model = build_reward_model(cfg, tiny_cfg)
    gap_before = (model.score(["q0"], ["alpha beta"]) - model.score(["q0"], ["gamma delta"])).abs()
    train_reward_model(model, pairs)
    gap_after = (model.score(["q0"], ["alpha beta"]) - model.score(["q0"], ["gamma delta"])).abs()
    assert gap_before.item() > 0.01 and gap_after.item() < 0.25 * gap_before.item()


def test_update_split_keeps_new_pairs_and_samples_earlier_ones() -> None:
    from rlhf.reward.data import PairSplit, TrainingPair
    from rlhf.reward.trainer import update_split

    def pair(i: int) -> TrainingPair:
        return TrainingPair(prompt=f"p{i}", response_a="a", response_b="b", target=1.0, weight=1.0, group_key=f"p{i}")

    earlier, new, held = [pair(i) for i in range(20)], [pair(i) for i in range(20, 26)], [pair(i) for i in range(30, 33)]
    split = PairSplit(train=earlier + new, validation=held)
    cut = update_split(split, new, budget=10, seed=3)
    assert cut.validation == held
    assert cut.train[:6] == new and len(cut.train) == 10
    assert all(p in earlier for p in cut.train[6:]) and len({p.prompt for p in cut.train}) == 10
    assert update_split(split, new, budget=10, seed=3).train == cut.train  # seeded
    assert update_split(split, new, budget=4, seed=3).train == new  # new pairs are never dropped
    assert len(update_split(split, new, budget=100, seed=3).train) == 26


@pytest.mark.slow
def test_incremental_updates_train_on_a_bounded_set_and_keep_learning(tiny_cfg: ModelConfig) -> None:
    cfg = FAST.model_copy(update={"update_pairs": 60, "max_epochs": 4})
    torch.manual_seed(0)
    model = build_reward_model(cfg, tiny_cfg)
    records = make_pairs(240, seed=1)
    first = train_reward_model(model, records[:80])
    later = [train_reward_model(model, records[: 80 + 40 * k], new_from=40 + 40 * k) for k in range(1, 5)]
    assert first.train_pairs > 60
    assert all(r.train_pairs <= 60 for r in later)
    assert later[-1].validation_pairs > first.validation_pairs  # validation covers every held-out pair
    assert evaluate_preferences(model, make_pairs(200, seed=99)).accuracy >= 0.85
