"""The losses, as pure tensor functions of summed answer log-probs (policy and reference).

Inputs are per-answer sums of token log-probs over the answer's tokens (the end-of-turn token
included), shape (B,). Each function returns the per-example losses (B,) and the implied
rewards beta * (log pi - log pi_ref) (B,), detached, for reports. The forms follow the papers
and TRL's implementations (DPOTrainer's "sigmoid" and "ipo" losses, KTOTrainer's "kto"), which
tests/rlhf/po/test_against_trl.py checks on the same model and batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
    beta: float, label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """-log sigmoid(beta * margin), margin = (chosen log-ratio) - (rejected log-ratio); with
    label smoothing e, (1 - e) of that plus e of the flipped pair's loss (conservative DPO)."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    losses = -F.logsigmoid(beta * margin)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * margin)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ipo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
    chosen_tokens: Tensor, rejected_tokens: Tensor, beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(margin - 1 / (2 beta))^2 with each log-ratio averaged over its answer's tokens (so the
    target margin does not scale with length), as the IPO authors and TRL compute it."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    margin = chosen_ratio / chosen_tokens.clamp(min=1.0) - rejected_ratio / rejected_tokens.clamp(min=1.0)
    losses = (margin - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_loss(
    policy: Tensor, reference: Tensor, desirable: Tensor, kl: Tensor, beta: float,
    desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per answer: desirable 1 - sigmoid(beta (log-ratio - z0)), undesirable
    1 - sigmoid(beta (z0 - log-ratio)), weighted; z0 = `kl`, the batch's KL estimate (detached,
    >= 0), taken on mismatched prompt/answer pairs (see `kl_reference_point`)."""
    ratio = policy - reference
    z0 = kl.detach()
    good = 1 - torch.sigmoid(beta * (ratio - z0))
    bad = 1 - torch.sigmoid(beta * (z0 - ratio))
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return losses, beta * ratio.detach()


def kl_reference_point(policy_mismatched: Tensor, reference_mismatched: Tensor) -> Tensor:
    """KTO's z0 from one batch: the mean log-ratio of answers paired with other prompts (an
    estimate of KL(pi || pi_ref) that carries no signal about the judged answers), clamped at 0."""
    return (policy_mismatched - reference_mismatched).mean().detach().clamp(min=0)
