"""Token-level distillation losses: divergences between the teacher's and the student's
next-token distributions, pure functions of logits.

Every function takes logits of the same shape (..., V), divides both by ``temperature``, and
returns the divergence at each position summed over the vocabulary, (...). Computed in float32
at least (bfloat16 logits are promoted). ``masked_mean`` reduces over answer positions as TRL's
``GKDTrainer.generalized_jsd_loss`` does with ``reduction="batchmean"``: the sum over unmasked
positions divided by their number.

    loss = masked_mean(generalized_jsd(student_logits, teacher_logits, beta=0.5), answer_mask)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), (..., V) -> (...)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) per position: the student is pushed to cover every token the
    teacher gives mass to (the usual distillation loss, up to the teacher's entropy)."""
    return _kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(student || teacher) per position: the student is pushed to put its mass where the
    teacher's is high, and may drop the teacher's lesser modes."""
    return _kl(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature))


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """Generalised Jensen-Shannon divergence per position (Agarwal et al. 2024, eq. 1, as TRL
    writes it): with M = beta * p_teacher + (1 - beta) * p_student,
    beta * KL(teacher || M) + (1 - beta) * KL(student || M). Its limits at beta -> 0 and 1 are 0,
    so, as TRL, beta = 0 is the forward KL and beta = 1 the reverse KL."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature)
    log_s, log_t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def token_divergence(name: str, student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5,
                     temperature: float = 1.0) -> Tensor:
    """The divergence ``name`` (``forward``, ``reverse``, ``jsd``) per position, (...)."""
    if name == "forward":
        return forward_kl(student_logits, teacher_logits, temperature)
    if name == "reverse":
        return reverse_kl(student_logits, teacher_logits, temperature)
    if name == "jsd":
        return generalized_jsd(student_logits, teacher_logits, beta, temperature)
    raise ValueError(f"unknown divergence {name!r} (forward, reverse or jsd)")


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``values`` (...) where ``mask`` (...) is non-zero, weighted by the mask."""
    return (values * mask.to(values.dtype)).sum()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Weighted mean over the mask's positions; 0 (with a gradient path) when the mask is empty."""
    return masked_sum(values, mask) / mask.to(values.dtype).sum().clamp(min=1.0)
