"""Bradley–Terry loss against hand-computed values; targets, weights and the split."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.preferences import Choice, PreferencePair, Ranking, expand
from rlhf.reward import (
    RewardConfig,
    bradley_terry_loss,
    encode,
    pair_accuracy_counts,
    split_by_prompt,
    training_pairs,
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_loss_matches_hand_computed_values() -> None:
    # d = 1: -log sigmoid(1) = log(1 + e^-1); tie at d = 2: -0.5 log s(2) - 0.5 log s(-2)
    loss = bradley_terry_loss(_t(1.0, 2.0), _t(0.0, 0.0), _t(1.0, 0.5), _t(1.0, 1.0))
    clear = math.log1p(math.exp(-1.0))
    tie = 0.5 * math.log1p(math.exp(-2.0)) + 0.5 * math.log1p(math.exp(2.0))
    assert loss.item() == pytest.approx((clear + tie) / 2, rel=1e-6)


def test_weights_scale_each_pair_and_zero_weight_drops_it() -> None:
    a, b, target = _t(1.0, -3.0), _t(0.0, 0.0), _t(1.0, 1.0)
    only_first = bradley_terry_loss(a[:1], b[:1], target[:1], _t(1.0))
    assert bradley_terry_loss(a, b, target, _t(2.0, 0.0)).item() == pytest.approx(only_first.item())
    weighted = bradley_terry_loss(a, b, target, _t(1.0, 3.0)).item()
    second = math.log1p(math.exp(3.0))
    assert weighted == pytest.approx((math.log1p(math.exp(-1.0)) + 3 * second) / 4, rel=1e-6)


def test_tie_gradient_pulls_scores_together() -> None:
    a = torch.tensor([2.0], requires_grad=True)
    b = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(a, b, _t(0.5), _t(1.0)).backward()
    assert a.grad.item() > 0 and b.grad.item() < 0  # descent lowers a, raises b
    assert a.grad.item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item() - 0.5)
    equal = torch.tensor([1.0], requires_grad=True)
    bradley_terry_loss(equal, torch.tensor([1.0]), _t(0.5), _t(1.0)).backward()
    assert equal.grad.item() == 0.0


def test_accuracy_ignores_ties() -> None:
    correct, counted = pair_accuracy_counts(_t(1, 0, 5, 3), _t(0, 1, 4, 3), _t(1, 1, 0.5, 0))
    assert (correct, counted) == (1, 3)  # 2nd wrong, 3rd a tie, 4th equal scores: wrong


def _pairs() -> list[PreferencePair]:
    return [
        PreferencePair("p1", "a", "b", Choice.A, strength=0.5, annotator_id="x", weight=2.0),
        PreferencePair("p1", "a", "c", Choice.TIE),
        PreferencePair("p2", "a", "b", Choice.BOTH_BAD),
        PreferencePair("p2", "a", "b", Choice.B, weight=0.0),
    ]


def test_training_pairs_apply_the_configured_rules() -> None:
    default = training_pairs(_pairs(), RewardConfig())
    assert [(p.target, p.weight) for p in default] == [(0.75, 2.0), (0.5, 1.0)]
    strict = training_pairs(_pairs(), RewardConfig(ties="exclude"))
    assert [p.target for p in strict] == [0.75]
    both_bad_tie = training_pairs(_pairs(), RewardConfig(both_bad="tie"))
    assert [p.target for p in both_bad_tie] == [0.75, 0.5, 0.5]


def test_split_keeps_prompts_whole_and_is_deterministic() -> None:
    records = [Ranking.ordered(f"prompt {i}", ["x", "y", "z"]) for i in range(20)]
    pairs = training_pairs(expand(records), RewardConfig())
    split = split_by_prompt(pairs, fraction=0.25, seed=3)
    train_prompts = {p.prompt for p in split.train}
    val_prompts = {p.prompt for p in split.validation}
    assert 2 <= len(val_prompts) <= 9 and len(train_prompts) + len(val_prompts) == 20
    assert not train_prompts & val_prompts
    assert len(split.train) + len(split.validation) == len(pairs)
    again = split_by_prompt(pairs[:6] + pairs[6:][::-1], fraction=0.25, seed=3)  # the same first two prompts
    assert {p.prompt for p in again.validation} == val_prompts
    assert {p.prompt for p in split_by_prompt(pairs, 0.25, seed=4).validation} != val_prompts
    with pytest.raises(ValueError, match="at least 2 prompts"):
        split_by_prompt(pairs[:3], 0.5, seed=0)


def test_encode_uses_the_chat_template_right_padding_and_left_truncation(tokenizer) -> None:
    batch = encode(tokenizer, ["hi", "a longer question here"], ["yes", "no"], max_length=64)
    mask = batch.attention_mask
    assert mask[0].tolist() == sorted(mask[0].tolist(), reverse=True)  # right padding
    assert int(mask[1].sum()) == mask.shape[1]  # the longest row has no pad
    text = tokenizer.decode(batch.input_ids[0, : int(mask[0].sum())])
    assert text.endswith("<|im_start|>assistant\nyes<|im_end|>\n") and "user\nhi" in text
    short = encode(tokenizer, ["a longer question here"], ["no"], max_length=8)
    assert short.input_ids.shape == (1, 8)
    assert torch.equal(short.input_ids[0], batch.input_ids[1, -8:])  # the end is kept
