"""Typed configuration of distillation: a student trained to imitate a teacher."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DistillMode = Literal["token", "sequence"]
Divergence = Literal["forward", "reverse", "jsd"]

_ONLY_FOR: dict[str, tuple[str, tuple[str, ...]]] = {
    "beta": ("divergence", ("jsd",)),
    "divergence": ("mode", ("token",)),
    "temperature": ("mode", ("token",)),
    "lmbda": ("mode", ("token",)),
}
"""Fields that only some settings read: given explicitly with another setting they are refused
by name (a dumped config, which holds every field, loads again only where they agree)."""


class DistillConfig(BaseModel):
    """How a student model learns from a teacher over a run's prompt set (the ``distill``
    section of a run config; ``hitl distill`` options override it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: DistillMode = "token"
    """``token``: the student matches the teacher's next-token distribution at every answer
    position (Hinton et al.'s soft targets; Agarwal et al.'s GKD), on answers the teacher wrote
    (and, with ``lmbda``, the student); ``sequence``: the student is fine-tuned on the teacher's
    answers as text (Kim & Rush's sequence-level distillation), the SFT step of ``rlhf/sft``."""

    divergence: Divergence = "forward"
    """``token`` only. ``forward``: KL(teacher || student), mode-covering; ``reverse``:
    KL(student || teacher), mode-seeking; ``jsd``: the generalised Jensen-Shannon divergence
    with interpolation ``beta`` (TRL's ``GKDTrainer.generalized_jsd_loss``)."""

    beta: float = Field(0.5, ge=0.0, le=1.0)
    """``jsd`` only: the mixture M = beta * teacher + (1 - beta) * student, and the loss
    beta * KL(teacher || M) + (1 - beta) * KL(student || M); as TRL, 0 gives the forward KL and 1
    the reverse KL exactly."""

    temperature: float = Field(1.0, gt=0.0)
    """``token`` only: both models' logits are divided by it before the softmax (above 1 the
    teacher's distribution is flatter, so its lower-ranked tokens teach more)."""

    lmbda: float = Field(0.0, ge=0.0, le=1.0)
    """``token`` only: the share of minibatches whose answers the student samples itself (on-policy
    distillation, TRL's ``lmbda``); the rest train on the teacher's answers. Drawn per minibatch
    from ``seed``."""

    answer_temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature of the teacher's answers (and the student's, with ``lmbda``); 0 is
    greedy (the classic choice for ``sequence``)."""

    max_new_tokens: int = Field(64, ge=1)
    """Longest answer, in tokens, the teacher (or student) writes per prompt."""

    max_prompt_tokens: int = Field(256, ge=1)
    """Chat-formatted prompts longer than this keep their last tokens."""

    prompts: int | None = Field(None, ge=1)
    """Train on the first N prompts of the run's training split (None: all of them)."""

    held_out_prompts: int = Field(32, ge=0)
    """Held-out prompts (the run's evaluation split) on which the student's divergence from the
    teacher and its log-likelihood of the teacher's answers are measured before and after
    training; also the number the evaluation compares on. 0: none."""

    lr: float = Field(1e-5, gt=0.0)
    """Learning rate of the student's trained parameters (constant; AdamW)."""

    epochs: int = Field(1, ge=1)
    """Passes over the teacher's answers."""

    batch_size: int = Field(8, ge=1)
    """Answers per optimiser step."""

    generation_batch_size: int = Field(16, ge=1)
    """Prompts the teacher answers at once."""

    max_grad_norm: float = Field(1.0, gt=0.0)
    """Gradient-norm clip of each step."""

    seed: int = Field(0, ge=0)
    """Seed of the sampled answers, of the order of the answers in each epoch and of the
    on-policy draws."""

    @model_validator(mode="after")
    def _only_where_read(self) -> DistillConfig:
        for name, (setting, values) in _ONLY_FOR.items():
            if name in self.model_fields_set and getattr(self, setting) not in values:
                default = type(self).model_fields[name].default
                if getattr(self, name) != default:
                    raise ValueError(f"{name} is only read with {setting} {' or '.join(map(repr, values))}, "
                                     f"not {getattr(self, setting)!r}")
        return self

    @property
    def jsd_beta(self) -> float:
        """The divergence as a generalised JSD interpolation: forward 0, reverse 1, jsd ``beta``."""
        return {"forward": 0.0, "reverse": 1.0}.get(self.divergence, self.beta)
