"""Typed configuration of preference optimisation (DPO, IPO, KTO)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

POLoss = Literal["dpo", "ipo", "kto"]


class POConfig(BaseModel):
    """How judged pairs (and, for KTO, single judgements) train the policy directly, with the
    reference the policy as it started (adapters off under LoRA, a frozen copy otherwise)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    loss: POLoss = "dpo"
    """``dpo`` (Rafailov et al. 2023: -log sigmoid of beta times the chosen-minus-rejected log-ratio
    margin), ``ipo`` (Azar et al. 2023: the squared distance of the length-normalised margin from
    1 / (2 beta)) or ``kto`` (Ethayarajh et al. 2024: each answer judged alone as desirable or
    not, against a batch KL estimate). In a run's config it is set by ``ppo.algorithm``."""

    beta: float = Field(0.1, gt=0.0)
    """Strength of the pull towards the reference (DPO's and KTO's beta, IPO's tau)."""

    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """DPO only: the assumed rate of flipped labels (conservative DPO); 0 is plain DPO."""

    desirable_weight: float = Field(1.0, gt=0.0)
    """KTO only: weight of desirable answers' losses."""

    undesirable_weight: float = Field(1.0, gt=0.0)
    """KTO only: weight of undesirable answers' losses (raise it when they are rarer)."""

    lr: float = Field(5e-6, gt=0.0)
    """Learning rate of the policy's parameters during the step (constant; PPO's own rate and
    schedule are restored afterwards)."""

    epochs: int = Field(1, ge=1)
    """Passes over the round's examples."""

    batch_size: int = Field(8, ge=1)
    """Pairs (DPO, IPO) or answers (KTO) per optimiser step, over all ranks."""

    max_examples: int = Field(1024, ge=1)
    """Most examples used per call (the first ones in feedback order)."""

    max_prompt_tokens: int = Field(256, ge=1)
    """Chat-formatted prompts longer than this keep their last tokens."""

    max_response_tokens: int = Field(256, ge=2)
    """Answers (with their end-of-turn token) longer than this keep their first tokens."""

    seed: int = Field(0, ge=0)
    """Seed of the order of the examples in each epoch."""
