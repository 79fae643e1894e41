"""Reference policy (shared under LoRA, frozen copy otherwise) and critics, on tiny models."""

from __future__ import annotations

import torch

from rlhf.models import (
    CriticConfig,
    LoraConfig,
    ModelConfig,
    SeparateCritic,
    ValueHeadCritic,
    build_critic,
    load_policy,
    reference_model,
)


def _batch(tok, texts: list[str], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    tok.padding_side = side
    try:
        enc = tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "left"
    return enc.input_ids, enc.attention_mask


def _train_step(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    optimizer.step()
    model.eval()


def test_lora_reference_is_the_base_with_adapters_disabled(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    lora = LoraConfig(enabled=True, rank=4, alpha=32)
    policy, tok = load_policy(tiny_cfg, lora)
    base, _ = load_policy(tiny_cfg)
    ref = reference_model(policy)
    assert ref.shares_weights
    ids, mask = _batch(tok, ["the quick brown fox", "jumps"], "left")
    for _ in range(3):
        _train_step(policy, ids, mask)
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask,
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        policy_logits = policy(input_ids=ids, attention_mask=mask,
                               position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    ref_logits = ref.logits(ids, mask)
    assert torch.allclose(ref_logits, base_logits, atol=1e-5)
    assert not torch.allclose(policy_logits, base_logits, atol=1e-3)  # the adapters learned
    with ref.active() as module:
        assert module is policy  # no second copy
    policy_after = policy(input_ids=ids, attention_mask=mask,
                          position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert torch.allclose(policy_after, policy_logits, atol=1e-5)  # adapters back on after the block (with gradients: rounding may differ)


def test_full_finetune_reference_is_a_frozen_copy(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    policy, tok = load_policy(tiny_cfg)
    ref = reference_model(policy)
    assert not ref.shares_weights
    ids, mask = _batch(tok, ["the quick brown fox", "jumps"], "left")
    before = ref.logits(ids, mask)
    _train_step(policy, ids, mask)
    assert torch.equal(ref.logits(ids, mask), before)
    with ref.active() as module:
        assert module is not policy
        assert not any(p.requires_grad for p in module.parameters())
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(module.parameters(), policy.parameters()))


def test_value_head_critic_values_per_token_independent_of_padding(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    policy, tok = load_policy(tiny_cfg, LoraConfig(enabled=True))
    critic = build_critic(CriticConfig(kind="value_head", head_init_std=0.5), policy, tiny_cfg, tok)
    assert isinstance(critic, ValueHeadCritic)
    texts = ["a much longer first sequence here", "short"]
    left_ids, left_mask = _batch(tok, texts, "left")
    right_ids, right_mask = _batch(tok, texts, "right")
    with torch.no_grad():
        left = critic(left_ids, left_mask)
        right = critic(right_ids, right_mask)
        joint = critic.policy_and_values(left_ids, left_mask)
    assert left.shape == left_ids.shape
    assert torch.allclose(left[left_mask.bool()], right[right_mask.bool()], atol=1e-5)
    assert torch.allclose(joint.values, left, atol=1e-5)
    assert joint.logits.shape == (*left_ids.shape, len(tok))
    head_ids = {id(p) for p in critic.head_parameters()}
    assert len(head_ids) == 2
    critic(left_ids, left_mask)[left_mask.bool()].sum().backward()
    assert critic.head.linear.weight.grad is not None
    lora_grads = [p.grad for n, p in policy.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None for g in lora_grads)  # values train the shared backbone


def test_value_head_starts_at_zero_by_default(tiny_cfg: ModelConfig) -> None:
    policy, tok = load_policy(tiny_cfg)
    critic = build_critic(CriticConfig(), policy, tiny_cfg, tok)
    ids, mask = _batch(tok, ["hello"], "left")
    assert torch.count_nonzero(critic(ids, mask)) == 0


def test_separate_critic_owns_its_weights(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    policy, tok = load_policy(tiny_cfg)
    cfg = CriticConfig(kind="separate", head_init_std=0.5, lora=LoraConfig(enabled=True, rank=2))
    critic = build_critic(cfg, policy, tiny_cfg, tok)
    assert isinstance(critic, SeparateCritic)
    policy_ptrs = {p.data_ptr() for p in policy.parameters()}
    assert not any(p.data_ptr() in policy_ptrs for p in critic.parameters())
    trainable = [n for n, p in critic.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any(n.startswith("head.") for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
    ids, mask = _batch(tok, ["one two three", "four"], "left")
    values = critic(ids, mask)
    assert values.shape == ids.shape and torch.isfinite(values).all()
