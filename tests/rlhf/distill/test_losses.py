"""The token-level distillation losses: hand-computed values on two-token vocabularies, the
mask, and equality (value and gradients) with TRL's `GKDTrainer.generalized_jsd_loss`."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.distill import DistillConfig, forward_kl, generalized_jsd, masked_mean, reverse_kl, token_divergence

# student uniform over two tokens, teacher 3:1
STUDENT = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
TEACHER = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_forward_and_reverse_kl_by_hand():
    s, t = [0.5, 0.5], [0.75, 0.25]
    assert forward_kl(STUDENT, TEACHER).item() == pytest.approx(_kl(t, s), rel=1e-6)
    assert reverse_kl(STUDENT, TEACHER).item() == pytest.approx(_kl(s, t), rel=1e-6)
    assert _kl(t, s) != pytest.approx(_kl(s, t), rel=1e-2)  # the two directions really differ here


@pytest.mark.parametrize("beta", [0.25, 0.5, 0.9])
def test_generalized_jsd_by_hand(beta):
    s, t = [0.5, 0.5], [0.75, 0.25]
    m = [beta * ti + (1 - beta) * si for si, ti in zip(s, t)]
    expected = beta * _kl(t, m) + (1 - beta) * _kl(s, m)
    assert generalized_jsd(STUDENT, TEACHER, beta).item() == pytest.approx(expected, rel=1e-6)


def test_the_ends_of_beta_are_the_two_kls_and_the_temperature_flattens_both():
    assert generalized_jsd(STUDENT, TEACHER, 0.0).item() == pytest.approx(forward_kl(STUDENT, TEACHER).item())
    assert generalized_jsd(STUDENT, TEACHER, 1.0).item() == pytest.approx(reverse_kl(STUDENT, TEACHER).item())
    # at temperature 2 the teacher's 3:1 becomes sqrt(3):1
    r = math.sqrt(3.0)
    t2 = [r / (1 + r), 1 / (1 + r)]
    assert forward_kl(STUDENT, TEACHER, temperature=2.0).item() == pytest.approx(_kl(t2, [0.5, 0.5]), rel=1e-6)
    assert forward_kl(TEACHER, TEACHER).item() == pytest.approx(0.0, abs=1e-7)


def test_masked_mean_counts_answer_positions_only():
    student = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [9.0, -9.0]]])  # the last position is far off
    teacher = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0], [-9.0, 9.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    got = masked_mean(forward_kl(student, teacher), mask).item()
    assert got == pytest.approx(_kl([0.75, 0.25], [0.5, 0.5]) / 2, rel=1e-6)
    assert masked_mean(forward_kl(student, teacher), torch.zeros_like(mask)).item() == 0.0


def test_the_config_picks_the_divergence():
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    for cfg, expected in ((DistillConfig(divergence="forward"), forward_kl(s, t)),
                          (DistillConfig(divergence="reverse"), reverse_kl(s, t)),
                          (DistillConfig(divergence="jsd", beta=0.3), generalized_jsd(s, t, 0.3))):
        got = token_divergence(cfg.divergence, s, t, beta=cfg.beta, temperature=cfg.temperature)
        assert torch.allclose(got, expected)
        assert torch.allclose(generalized_jsd(s, t, cfg.jsd_beta), expected)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_equal_to_trl_gkd_values_and_gradients(beta, temperature):
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(int(beta * 10 + temperature * 100))
    B, T, V = 3, 6, 13
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(B, T)
    mask[0, :2] = 0  # a prompt
    mask[1, 4:] = 0  # padding after a short answer
    mask[2, 0] = 0
    labels = torch.where(mask > 0, torch.randint(0, V, (B, T), generator=g), torch.full((B, T), -100))

    ours_s, ours_t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    ours = masked_mean(generalized_jsd(ours_s, ours_t, beta, temperature), mask.double())
    ours.backward()
    trl_s, trl_t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    theirs = GKDTrainer.generalized_jsd_loss(trl_s.float(), trl_t.float(), labels=labels, beta=beta, temperature=temperature)
    theirs.backward()

    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert ours.item() > 0.05  # not trivially equal at zero
    assert torch.allclose(ours_s.grad, trl_s.grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(ours_t.grad, trl_t.grad, rtol=1e-4, atol=1e-7)
    assert ours_s.grad[0, :2].abs().max() == 0  # nothing flows from masked positions
