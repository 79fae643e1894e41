"""Typed configuration of supervised fine-tuning on human corrections."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SFTConfig(BaseModel):
    """Corrections as demonstrations: a masked-loss fine-tuning step on the policy's own
    DeepSpeed engine (the LoRA adapters or full weights that PPO trains), before each round's
    PPO iterations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    """Run the step; off, correction records are counted but not trained on."""

    lr: float = Field(1e-5, gt=0.0)
    """Learning rate of the policy's parameters during the step (constant; PPO's own rate and
    schedule are restored afterwards)."""

    epochs: int = Field(1, ge=1)
    """Passes over the round's demonstrations."""

    batch_size: int = Field(8, ge=1)
    """Demonstrations per optimiser step, over all ranks."""

    max_examples: int = Field(256, ge=1)
    """Most demonstrations used per round (the first ones in feedback order)."""

    max_prompt_tokens: int = Field(256, ge=1)
    """Chat-formatted prompts longer than this keep their last tokens."""

    max_response_tokens: int = Field(256, ge=2)
    """Responses (the corrected text and the end-of-turn token) longer than this keep their
    first tokens."""

    seed: int = Field(0, ge=0)
    """Seed of the order of the demonstrations in each epoch."""

    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of a step's demonstrations held out (by a stable hash of the prompt, so a prompt's
    corrections stay on one side) to stop the step early on their loss; 0: no validation, every
    epoch runs. Needs at least one demonstration on each side, else the step trains on all."""

    patience: int = Field(1, ge=1)
    """With validation: stop after this many epochs in a row whose validation loss is not
    below the best so far by more than `min_delta`. The weights are the last epoch's (going
    back to an earlier epoch would mean restoring DeepSpeed's fp32 master partitions too)."""

    min_delta: float = Field(0.0, ge=0.0)
    """The improvement in validation loss (nats per token) that counts as one."""


class BestOfNConfig(BaseModel):
    """Rejection-sampling fine-tuning (``ppo.algorithm: best_of_n``), as Llama 2 and ReST/RAFT
    do it: each round the engines write `n` answers to each of `prompts_per_round` training
    prompts, the reward model scores them, and the policy is fine-tuned (the SFT step, with the
    ``sft`` section's learning rate, epochs and batch size) on each prompt's best answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(8, ge=2)
    """Answers sampled per prompt."""

    prompts_per_round: int = Field(32, ge=1)
    """Training prompts sampled per round (taken in order from the training split)."""

    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature of the candidates."""

    min_gap: float = Field(0.0, ge=0.0)
    """A prompt's best answer is kept only when its reward exceeds the mean of the prompt's
    other answers by more than this (0: whenever it is strictly above; prompts whose answers
    all score alike teach nothing)."""

    keep_fraction: float = Field(1.0, gt=0.0, le=1.0)
    """Of the prompts left, the share with the largest gaps that are trained on."""
