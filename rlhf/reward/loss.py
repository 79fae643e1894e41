"""The Bradley–Terry loss with soft targets and per-pair weights, and pair accuracy.

P(A > B) = sigmoid(r_A - r_B). Each pair carries a target p = P(A > B) (1 or 0 for a clear
preference, 0.5 +/- strength/2 for a weaker one, 0.5 for a tie) and a weight w; the loss is
the weighted mean cross-entropy

    L = sum_i w_i * BCE(sigmoid(r_A,i - r_B,i), p_i) / sum_i w_i,

which for p = 1 is the usual -log sigmoid(r_chosen - r_rejected) and for p = 0.5 is
minimised at r_A = r_B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    score_a: torch.Tensor,  # (B,) r(prompt, response_a)
    score_b: torch.Tensor,  # (B,) r(prompt, response_b)
    target: torch.Tensor,  # (B,) P(A > B) to express, in [0, 1]
    weight: torch.Tensor,  # (B,) >= 0, not all 0
) -> torch.Tensor:  # () weighted mean cross-entropy
    per_pair = F.binary_cross_entropy_with_logits(
        (score_a - score_b).float(), target.float(), reduction="none"
    )
    return (per_pair * weight).sum() / weight.sum()


def pair_accuracy_counts(
    score_a: torch.Tensor,  # (B,)
    score_b: torch.Tensor,  # (B,)
    target: torch.Tensor,  # (B,)
) -> tuple[int, int]:
    """(correct, counted) over pairs with a preference (target != 0.5): correct when the
    preferred response scores strictly higher (equal scores count as wrong). Ties are not
    counted."""
    decided = target != 0.5
    wanted_a = target > 0.5
    correct = torch.where(wanted_a, score_a > score_b, score_b > score_a) & decided
    return int(correct.sum()), int(decided.sum())
