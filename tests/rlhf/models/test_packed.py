"""oneDNN packed linears: the same products as ``nn.Linear``, packs that follow the weights,
and generation weights that equal merged adapters without touching the base weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlhf.models import LoraConfig, ModelConfig, load_policy
from rlhf.models.packed import (
    ONEDNN_AVAILABLE,
    PackedLinear,
    _KEPT,
    forget_packs,
    keep_packs,
    packed_weights,
    use_packed_linears,
    uses_packed_linears,
)



def test_the_pinned_pytorch_build_has_onednn():
    """Without it every PackedLinear is plain nn.Linear and the tests below would test nothing."""
    assert ONEDNN_AVAILABLE


def _pair(frozen: bool, bias: bool = True) -> tuple[nn.Linear, PackedLinear]:
    torch.manual_seed(0)
    plain = nn.Linear(48, 96, bias=bias)
    packed = nn.Linear(48, 96, bias=bias)
    packed.load_state_dict(plain.state_dict())
    use_packed_linears(packed)
    for p in [*plain.parameters(), *packed.parameters()]:
        p.requires_grad_(not frozen)
    return plain, packed


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", [True, False])
def test_packed_linear_matches_nn_linear_forward_and_backward(frozen: bool, bias: bool):
    plain, packed = _pair(frozen, bias)
    assert type(packed) is PackedLinear
    x = torch.randn(3, 7, 48)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), plain(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed(x[0, :1]), plain(x[0, :1]), atol=1e-5, rtol=1e-5)
    xp, xq = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    plain(xp).square().sum().backward()
    packed(xq).square().sum().backward()
    torch.testing.assert_close(xq.grad, xp.grad, atol=1e-4, rtol=1e-5)
    if not frozen:
        torch.testing.assert_close(packed.weight.grad, plain.weight.grad, atol=1e-4, rtol=1e-5)
    else:
        assert packed.weight.grad is None
        assert id(packed.weight) in _KEPT  # the frozen weight's pack is kept


def test_a_row_does_not_depend_on_the_rest_of_the_batch():
    _, packed = _pair(frozen=True)
    x = torch.randn(64, 48)
    with torch.no_grad():
        alone = torch.stack([packed(x[i : i + 1])[0] for i in range(0, 64, 9)])
        batched = packed(x)[0:64:9]
    assert torch.equal(alone, batched)


def test_kept_packs_follow_in_place_changes_of_the_weight():
    plain, packed = _pair(frozen=True)
    x = torch.randn(5, 48)
    with torch.no_grad():
        packed(x)
        new = torch.randn_like(plain.weight)
        packed.weight.copy_(new)  # moves the version counter: the pack is remade
        plain.weight.copy_(new)
        torch.testing.assert_close(packed(x), plain(x), atol=1e-5, rtol=1e-5)
        packed.load_state_dict({"weight": new * 2, "bias": plain.bias})
        torch.testing.assert_close(packed(x), 2 * (x @ new.t()) + plain.bias, atol=1e-5, rtol=1e-5)
        # through .data the version counter does not move: the stale pack stays until forgotten
        packed.weight.data.mul_(0.0)
        assert not torch.allclose(packed(x), packed.bias.expand(5, -1))
        forget_packs(packed)
        torch.testing.assert_close(packed(x), packed.bias.expand(5, -1))


def test_packs_of_collected_weights_are_dropped():
    _, packed = _pair(frozen=True)
    with torch.no_grad():
        packed(torch.randn(2, 48))
    key = id(packed.weight)
    assert key in _KEPT
    del packed
    import gc

    gc.collect()
    assert key not in _KEPT


def test_off_fp32_it_is_nn_linear():
    plain, packed = _pair(frozen=True)
    x = torch.randn(4, 48, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(packed.double()(x), plain.double()(x))


def _lora_policy(cfg: ModelConfig):
    lora = LoraConfig(enabled=True, rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "o_proj"))
    model, tokenizer = load_policy(cfg, lora)
    torch.manual_seed(1)
    with torch.no_grad():  # peft starts B at zero: give the adapters an update to merge
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tokenizer


def test_packed_weights_equal_merged_adapters_and_leave_the_base_untouched(tiny_cfg: ModelConfig):
    model, _ = _lora_policy(tiny_cfg)
    assert uses_packed_linears(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 1000, (3, 11))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with packed_weights(model):
            inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(inside, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(after, expected)  # adapters route back to their own products on exit
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k
    # with the adapters off the packed generation weights are the base weights
    with torch.no_grad(), model.disable_adapter():
        reference = model(input_ids=ids).logits
    assert not torch.allclose(reference, expected, atol=1e-4)


def test_packed_weights_follow_a_trained_full_model(tiny_cfg: ModelConfig):
    model, _ = load_policy(tiny_cfg)
    model.requires_grad_(True)
    ids = torch.randint(0, 1000, (2, 9))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(input_ids=ids).logits.square().mean().backward()
    opt.step()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with packed_weights(model):
            inside = model(input_ids=ids).logits
    torch.testing.assert_close(inside, expected, atol=1e-4, rtol=1e-4)
    assert all(m._inference_pack is None for m in model.modules() if isinstance(m, PackedLinear))


@pytest.mark.slow
def test_loaded_policies_use_packed_linears_with_tied_weights_kept(tiny_cfg: ModelConfig):
    model, _ = load_policy(tiny_cfg)
    assert type(model.get_output_embeddings()) is PackedLinear
    assert not any(type(m) is nn.Linear for m in model.modules())
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    plain, _ = load_policy(tiny_cfg.model_copy(update={"onednn_linear": False}))
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("foreach", [False, True])
def test_kept_packs_of_trained_weights_follow_optimiser_steps(foreach: bool):
    plain, packed = _pair(frozen=False)
    assert keep_packs(packed) == 1
    x = torch.randn(6, 48)
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1, foreach=foreach) for m in (plain, packed)]
    for _ in range(3):
        with torch.no_grad():
            torch.testing.assert_close(packed(x), plain(x), atol=1e-5, rtol=1e-5)
        assert id(packed.weight) in _KEPT
        for model, opt in zip((plain, packed), opts):
            opt.zero_grad()
            model(x).square().sum().backward()  # with gradients: the plain product
            opt.step()
    torch.testing.assert_close(packed.weight, plain.weight)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), plain(x), atol=1e-5, rtol=1e-5)


def test_reward_scores_follow_its_training(tiny_cfg: ModelConfig):
    from rlhf.reward import RewardConfig, build_reward_model

    rm = build_reward_model(RewardConfig(head_init_std=0.5), tiny_cfg)
    prompts, responses = ["Name a fruit."] * 3 + ["Why?"], ["An apple.", "A pear.", "Stone.", "Because."]
    before = rm.score(prompts, responses)
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
    rm.score_batch(prompts, responses).sum().backward()
    opt.step()
    after = rm.score(prompts, responses)
    assert not torch.allclose(before, after, atol=1e-4)
    for module in rm.modules():  # the same weights on the default BLAS
        if isinstance(module, PackedLinear):
            module.__class__ = nn.Linear
    torch.testing.assert_close(after, rm.score(prompts, responses), atol=1e-5, rtol=1e-5)
