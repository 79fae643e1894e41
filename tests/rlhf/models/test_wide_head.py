"""The LM head's CPU inference form: the same module and parameters, the same logits."""

from __future__ import annotations

import torch
from torch import nn

from rlhf.models import ModelConfig, load_policy
from rlhf.models.loading import WideHeadLinear, wide_head


def test_wide_head_gives_the_logits_of_nn_linear_with_and_without_gradients():
    torch.manual_seed(0)
    plain = nn.Linear(48, 20000, bias=True)
    wide = nn.Linear(48, 20000, bias=True)
    wide.load_state_dict(plain.state_dict())
    wide.__class__ = WideHeadLinear
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        torch.testing.assert_close(wide(x), plain(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(wide(x[0, :1]), plain(x[0, :1]), atol=1e-5, rtol=1e-5)
    xg = x.clone().requires_grad_(True)
    wide(xg).square().sum().backward()
    xp = x.clone().requires_grad_(True)
    plain(xp).square().sum().backward()
    torch.testing.assert_close(xg.grad, xp.grad)
    torch.testing.assert_close(wide.weight.grad, plain.weight.grad)


def test_loaded_policies_get_the_wide_head_with_tied_weights_kept(tiny_cfg: ModelConfig):
    model, _ = load_policy(tiny_cfg)
    head = model.get_output_embeddings()
    assert type(head) is WideHeadLinear
    if model.config.tie_word_embeddings:
        assert head.weight is model.get_input_embeddings().weight
    assert "lm_head.weight" in model.state_dict() or model.config.tie_word_embeddings
    small = nn.Linear(8, 100)
    holder = type("M", (), {"get_output_embeddings": lambda self: small})()
    wide_head(holder)
    assert type(small) is nn.Linear  # a narrow head stays as it is
