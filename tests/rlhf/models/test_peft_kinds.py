"""The PEFT kinds (``lora.kind``) on the tiny model, without DeepSpeed: what each trains, that
the reference (PEFT part off) is the base model, that merging and oneDNN packs keep the
outputs, that a push of the trainable tensors makes a generation engine compute the same
logits, and that the reward model saves and loads under every kind.
(PPO and DPO steps, checkpoints: tests/rlhf/ppo/test_peft_kinds_training.py.)
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from rlhf.models import LoraConfig, load_policy, reference_model
from rlhf.models.loading import load_causal_lm
from rlhf.models.packed import packed_weights
from rlhf.models.peft_kinds import adapter_state, expected_trainable_count, kind_of, trainable_count
from rlhf.ppo.rollout import merged_lora

KINDS = ["lora", "dora", "ia3", "bitfit", "bottleneck"]

# by hand, for hidden 32, MLP 64, 2 layers, rank 8, each kind's default targets:
EXPECTED = {
    "lora": 2 * 4 * 8 * (32 + 32),  # A (8 x 32) and B (32 x 8) on q, k, v, o
    "dora": 2 * 4 * (8 * (32 + 32) + 32),  # LoRA's plus one magnitude per output row
    "ia3": 2 * (32 + 32 + 64),  # k and v outputs, down_proj's input
    "bitfit": 2 * (4 * 32 + 64 + 64 + 32),  # one bias per output of q, k, v, o, gate, up, down
    "bottleneck": 2 * 2 * (32 * 8 + 8 + 8 * 32 + 32),  # down and up (with biases) after o_proj and down_proj
}
NAME_MARK = {"lora": "lora_", "dora": "lora_", "ia3": "ia3_l", "bitfit": "beft_bias", "bottleneck": "lora_"}


def _ids(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(["Name a colour. Blue!", "Hi"], return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def _logits(model, ids, mask) -> torch.Tensor:
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _trained(model, seed: int = 1) -> None:
    """Move every trainable tensor, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_trains_what_it_should(tiny_cfg, tokenizer, kind):
    cfg = LoraConfig(enabled=True, kind=kind)
    policy, _ = load_policy(tiny_cfg, cfg)
    assert kind_of(policy) == kind
    assert trainable_count(policy) == EXPECTED[kind] == expected_trainable_count(load_causal_lm(tiny_cfg, tokenizer), cfg)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(NAME_MARK[kind] in n for n in trainable)
    pushed = adapter_state(policy)  # what a push carries: exactly the trainable tensors
    assert sum(t.numel() for t in pushed.values()) == EXPECTED[kind] and len(pushed) == len(trainable)


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_part_is_identity_and_the_reference_is_the_base_model(tiny_cfg, tokenizer, kind):
    policy, _ = load_policy(tiny_cfg, LoraConfig(enabled=True, kind=kind))
    base = load_causal_lm(tiny_cfg, tokenizer)
    ids, mask = _ids(tokenizer)
    assert torch.allclose(_logits(policy, ids, mask), _logits(base, ids, mask), atol=1e-6)  # starts as the base
    _trained(policy)
    ref = reference_model(policy)
    assert ref.shares_weights  # PEFT part off, no copy
    assert torch.equal(ref.logits(ids, mask), _logits(base, ids, mask))
    assert not torch.allclose(_logits(policy, ids, mask), _logits(base, ids, mask), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_merged_and_packed_generation_weights_keep_outputs_and_base(tiny_cfg, tokenizer, kind):
    policy, _ = load_policy(tiny_cfg, LoraConfig(enabled=True, kind=kind))
    _trained(policy)
    ids, mask = _ids(tokenizer)
    want = _logits(policy, ids, mask)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    for weights in (merged_lora, packed_weights):
        with weights(policy):
            got = _logits(policy, ids, mask)
        assert torch.allclose(got, want, atol=1e-4), weights.__name__
        assert all(torch.equal(p, frozen[n]) for n, p in policy.named_parameters() if n in frozen)  # restored exactly
    assert torch.equal(reference_model(policy).logits(ids, mask), _logits(load_causal_lm(tiny_cfg, tokenizer), ids, mask))


@pytest.mark.parametrize("kind", KINDS)
def test_a_push_of_the_trainable_tensors_makes_the_engine_compute_the_same_logits(tiny_cfg, tokenizer, kind):
    from rlhf.sync import WeightLayout
    from services.generation.engine import PolicyEngine, WeightUpdate

    cfg = LoraConfig(enabled=True, kind=kind)
    policy, _ = load_policy(tiny_cfg, cfg)
    _trained(policy)
    engine = PolicyEngine(tiny_cfg, cfg)
    ids, mask = _ids(tokenizer)
    assert not torch.allclose(_logits(engine.model, ids, mask), _logits(policy, ids, mask), atol=1e-4)
    tensors = adapter_state(policy)  # what trainer rank 0 pushes (actors/trainer_group.py)
    layout = WeightLayout.of(tensors)
    assert layout == engine.weight_layout()  # the sync group's two ends agree on names, shapes, buckets
    flats = layout.flat_buffers()
    layout.pack(tensors, flats)  # through the sync group's buffers, as a push travels
    engine.load_weights(WeightUpdate(1, layout.views(flats), adapters_only=True))
    assert torch.equal(_logits(engine.model, ids, mask), _logits(policy, ids, mask))
    assert all(torch.equal(engine.weights()[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("kind", KINDS)
def test_reward_model_trains_the_kind_and_saves_and_loads(tiny_cfg, tmp_path, kind):
    from rlhf.reward import RewardConfig, build_reward_model, load_reward_model

    cfg = RewardConfig(lora=LoraConfig(enabled=True, kind=kind), head_init_std=0.1)
    model = build_reward_model(cfg, tiny_cfg)
    head = 32 + 1
    assert trainable_count(model) == EXPECTED[kind] + head
    prompts, answers = ["Name a colour.", "Say hi."], ["Blue.", "Hello there, friend."]
    fresh = model.score(prompts, answers)
    _trained(model.backbone)
    with model.backbone.disable_adapter():  # the PEFT part off: the untrained backbone again
        assert torch.allclose(model.score(prompts, answers), fresh, atol=1e-5)
    scores = model.score(prompts, answers)
    assert not torch.allclose(scores, fresh, atol=1e-4)
    model.save(tmp_path / "rm")
    assert (tmp_path / "rm" / "adapters.safetensors").exists() == (kind in ("bitfit", "bottleneck"))
    assert torch.allclose(load_reward_model(tmp_path / "rm").score(prompts, answers), scores, atol=1e-5)


def test_bitfit_existing_bias_terms_trains_the_model_biases_and_refuses_a_model_without():
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.models.peft_kinds import apply_peft

    with_bias = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, attention_bias=True))
    cfg = LoraConfig(enabled=True, kind="bitfit", bias_terms="existing")
    ids = torch.randint(0, 64, (1, 5))
    before = with_bias(input_ids=ids).logits.detach()
    model = apply_peft(with_bias, cfg)
    assert trainable_count(model) == 4 * 16  # q, k, v, o have biases; the MLP has none
    _trained(model)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, before)  # the reference keeps b0
    with pytest.raises(ValueError, match="lora.bias_terms='existing'"):
        apply_peft(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2)), cfg)


def test_config_names_fields_a_kind_does_not_use_and_fills_its_targets():
    assert LoraConfig(kind="adapter").kind == "bottleneck"
    assert LoraConfig(kind="bottleneck").target_modules == ("o_proj", "down_proj")
    assert LoraConfig(kind="ia3").ia3_feedforward == ("down_proj",)
    assert LoraConfig(kind="lora").target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    dumped = LoraConfig(enabled=True, kind="ia3").model_dump()  # a run's config.json loads again
    assert LoraConfig.model_validate(dumped).kind == "ia3"
    for bad, field in [({"kind": "ia3", "rank": 4}, "rank"), ({"kind": "bitfit", "alpha": 2.0}, "alpha"),
                       ({"kind": "lora", "bias_terms": "existing"}, "bias_terms"),
                       ({"kind": "dora", "feedforward_modules": ("o_proj",)}, "feedforward_modules"),
                       ({"kind": "ia3", "feedforward_modules": ("up_proj",)}, "feedforward_modules"),
                       ({"kind": "prefix"}, "kind")]:
        with pytest.raises(ValidationError, match=field):
            LoraConfig(**bad)


def test_targets_that_match_nothing_are_refused(tiny_cfg):
    with pytest.raises(ValueError, match="target_modules"):
        load_policy(tiny_cfg, LoraConfig(enabled=True, kind="ia3", target_modules=("nope",), feedforward_modules=()))
