"""Typed configuration for PPO-family training and its DeepSpeed engines.

Two models, each validated on load (unknown keys are errors, ranges are checked):

- :class:`PPOConfig`: the algorithm (advantage estimator, rollout and generation settings,
  losses, KL control, optimisation schedule, seed).
- :class:`DeepSpeedConfig`: how the policy and critic engines run (ZeRO stage, precision,
  gradient checkpointing, offload, gradient accumulation).

:func:`deepspeed_config_dict` turns them into the dict that ``deepspeed.initialize`` takes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

AdvantageEstimatorName = Literal["gae", "grpo", "rloo"]
AlgorithmName = Literal["ppo", "dpo", "ipo", "kto", "best_of_n"]
PO_ALGORITHMS = ("dpo", "ipo", "kto")
"""The algorithms that train on judged pairs directly (``rlhf/po/``)."""


class PPOConfig(BaseModel):
    """Settings of one PPO-family trainer (PPO with GAE, GRPO, RLOO)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: AlgorithmName = "ppo"
    """How the policy learns each round: ``ppo`` (the PPO family, by ``advantage_estimator``: on
    rollouts scored by the reward model), or ``dpo``, ``ipo``, ``kto`` (on the round's judged
    pairs, and for ``kto`` single judgements, directly: no rollouts, no reward model in the
    update; settings in the ``po`` section, ``rlhf/po/``), or ``best_of_n`` (rejection-sampling
    fine-tuning: the reward model picks the best of n sampled answers and the policy is
    fine-tuned on the picks; settings in the ``best_of_n`` section)."""

    advantage_estimator: AdvantageEstimatorName = "gae"
    """Advantage estimator, by registered name: ``gae`` (PPO with a critic), ``grpo``
    (group-normalised outcome reward, no critic) or ``rloo`` (leave-one-out baseline, no critic)."""

    rollout_batch_size: int = Field(8, gt=0)
    """Prompts per PPO iteration, over all ranks (each rank takes an equal, contiguous share)."""

    group_size: int = Field(1, gt=0)
    """Responses sampled per prompt; must be at least 2 for ``grpo`` and ``rloo``."""

    chat_template: bool = True
    """Rollouts render each prompt by the run's ``template`` in the tokenizer's chat template
    (by default a user turn, then the assistant's turn opened), as the generation server and
    the reward model do; the reward model still receives the plain prompt. Off, or for a
    tokenizer without a chat template, prompts are generated from as raw text (and the
    ``template`` section must stay at its default)."""
    max_prompt_tokens: int = Field(256, gt=0)
    """Prompts longer than this many tokens are truncated from the left."""

    max_new_tokens: int = Field(32, gt=0)
    """Most tokens generated per response."""

    min_new_tokens: int = Field(0, ge=0)
    """Fewest tokens generated per response (EOS is suppressed before that); benchmarks set it
    equal to ``max_new_tokens`` to fix the generation length."""

    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature; log-probs used in training are taken at the same temperature."""

    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass; 1.0 turns it off."""

    top_k: int = Field(0, ge=0)
    """Sample among the k most likely tokens; 0 turns it off."""

    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """Discount factor of GAE."""

    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE lambda (bias/variance trade-off of the advantage estimate)."""

    clip_range: float = Field(0.2, gt=0.0)
    """PPO ratio clip epsilon: the ratio is clipped to [1 - eps, 1 + eps]."""

    value_clip_range: float | None = Field(0.2, gt=0.0)
    """Value clip: new values are kept within this distance of the rollout values; None turns it off."""

    kl_coef: float = Field(0.05, ge=0.0)
    """Initial (or fixed) coefficient beta of the KL penalty against the reference policy."""

    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator: ``k1`` = log pi - log pi_ref (unbiased, may be negative),
    ``k3`` = exp(-k1) - 1 + k1 (unbiased, never negative, lower variance)."""

    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL penalty acts: subtracted from the per-token reward (classic PPO-RLHF), or
    added to the policy loss (GRPO paper style)."""

    kl_controller: Literal["fixed", "adaptive"] = "fixed"
    """``fixed`` keeps ``kl_coef``; ``adaptive`` moves it toward ``kl_target`` (Ziegler et al. 2019)."""

    kl_target: float = Field(6.0, gt=0.0)
    """Target KL (nats per sequence) of the adaptive controller."""

    kl_horizon: int = Field(10000, gt=0)
    """Horizon (in samples) of the adaptive controller: larger means slower changes of beta."""

    whiten_advantages: bool = True
    """Normalise advantages to zero mean, unit variance over the batch (masked, across ranks)."""

    reward_clip: float | None = Field(None, gt=0.0)
    """Clip scores from the reward function to [-c, c]; None turns it off."""

    value_loss_coef: float = Field(0.5, ge=0.0)
    """Weight of the value loss when the critic is a head on the policy's backbone (one engine,
    one joint loss); a separate critic trains on its own loss with its own optimizer."""

    entropy_coef: float = Field(0.0, ge=0.0)
    """Weight of the entropy bonus in the policy loss."""

    minibatch_size: int = Field(8, gt=0)
    """Samples (responses) per optimiser step, over all ranks."""

    ppo_epochs: int = Field(1, gt=0)
    """Passes over each rollout batch."""

    policy_lr: float = Field(1e-5, gt=0.0)
    """Learning rate of the policy optimiser (AdamW)."""

    critic_lr: float = Field(1e-5, gt=0.0)
    """Learning rate of the critic optimiser (AdamW); unused without a critic."""

    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay of policy and critic."""

    lr_warmup_steps: int = Field(0, ge=0)
    """Optimiser steps of linear learning-rate warmup; the rate is constant afterwards."""

    max_grad_norm: float = Field(1.0, gt=0.0)
    """Gradients are clipped to this global norm."""

    seed: int = Field(0, ge=0)
    """Seed of everything random: initialisation, sampling (per sample), minibatch order."""

    behaviour_correction: Literal["none", "truncated_is"] = "truncated_is"
    """How samples drawn by another policy than the trainer's at rollout time (a generation
    engine, a version behind or another kernel) are corrected: ``truncated_is`` weights each
    token's policy loss by min(pi_old / mu, `behaviour_is_cap`); ``none`` trains on them as
    if the trainer had drawn them."""

    behaviour_is_cap: float = Field(2.0, ge=1.0)
    """Largest importance weight of ``truncated_is``."""

    @model_validator(mode="after")
    def _check_consistency(self) -> PPOConfig:
        if self.advantage_estimator in ("grpo", "rloo") and self.group_size < 2:
            raise ValueError(
                f"group_size must be >= 2 for advantage_estimator={self.advantage_estimator!r}"
            )
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        samples = self.rollout_batch_size * self.group_size
        if samples % self.minibatch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must divide rollout_batch_size * "
                f"group_size ({samples})"
            )
        return self

    @property
    def samples_per_iteration(self) -> int:
        """Responses generated per iteration over all ranks."""
        return self.rollout_batch_size * self.group_size

    @property
    def uses_critic(self) -> bool:
        """Whether the estimator needs a value function (PPO with GAE; never the offline losses)."""
        return self.algorithm == "ppo" and self.advantage_estimator == "gae"


class DeepSpeedConfig(BaseModel):
    """How the policy and critic DeepSpeed engines run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    zero_stage: int = Field(0, ge=0, le=3)
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states sharded), 2 (+ gradients),
    3 (+ parameters)."""

    bf16: bool | Literal["auto"] = "auto"
    """bf16 mixed precision; ``auto`` turns it on with a GPU and off (fp32) on the CPU."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer states on the CPU (ZeRO stage >= 1)."""

    offload_param: Literal["none", "cpu"] = "none"
    """Keep parameters on the CPU (ZeRO stage 3 only)."""

    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimiser step on each rank; the per-rank minibatch is split into
    this many micro-batches."""

    @model_validator(mode="after")
    def _check_offload(self) -> DeepSpeedConfig:
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage=3")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        return self

    def use_bf16(self, device_type: str) -> bool:
        """bf16 on or off for a device type (``"cuda"`` or ``"cpu"``)."""
        if self.bf16 == "auto":
            return device_type == "cuda"
        return bool(self.bf16)


def deepspeed_config_dict(
    ds: DeepSpeedConfig,
    *,
    micro_batch_size: int,
    world_size: int,
    max_grad_norm: float,
    device_type: str,
) -> dict[str, Any]:
    """The ``config`` dict for ``deepspeed.initialize`` of one engine.

    ``micro_batch_size`` is the per-rank micro-batch; the train batch size follows from it,
    the gradient accumulation steps and the world size. The optimizer and scheduler are built
    by the trainer and handed to DeepSpeed, so none is configured here.
    """
    bf16 = ds.use_bf16(device_type)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(
            {
                "contiguous_gradients": True,
                "overlap_comm": device_type == "cuda",
                "reduce_scatter": True,
            }
        )
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": device_type == "cuda"}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": device_type == "cuda"}
    if ds.zero_stage == 3:
        zero.update(
            {
                "stage3_param_persistence_threshold": 0 if device_type == "cpu" else 100_000,
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * ds.gradient_accumulation_steps * world_size,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
