"""The student's training: token-level (the teacher's next-token distributions) or
sequence-level (the teacher's answers as text), on the PPO trainer's DeepSpeed engine.

    trainer = student_trainer(student, tokenizer, cfg, DeepSpeedConfig())
    answers = write_answers(teacher, tokenizer, prompts, cfg)
    report = distill(trainer, teacher, answers, held_out_answers, cfg)

The student trains as the loop's policy does: what the engine holds trainable (its LoRA
adapters, or every weight), with AdamW at ``cfg.lr``, gradient clipping and, under DeepSpeed's
gradient accumulation, one optimiser step per minibatch. One process.

- **Token-level.** Each minibatch of answers is scored by both models on the same tokens (the
  LM head only at answer positions, ``rlhf.ppo.rollout.response_logits``); the loss is the
  chosen divergence (``rlhf.distill.losses``) summed over answer tokens and divided by the
  minibatch's answer-token count. With ``lmbda`` > 0 a minibatch is, with that probability,
  replaced by the student's own answers to its prompts (on-policy distillation).
- **Sequence-level.** The teacher's answers are demonstrations for the SFT step
  (``rlhf.sft.run_sft``): the student's negative log-likelihood of them, prompt masked.
- **Measured before and after**, on held-out prompts the teacher answered: the student's mean
  divergence from the teacher per answer token, and its negative log-likelihood of the teacher's
  answer tokens.

Teacher and student must share the tokenizer (``rlhf.distill.data.check_same_tokenizer``);
their sizes may differ. Logits are cut to the tokenizer's length, so embedding matrices padded
to different sizes still compare token by token.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rlhf.distill.config import DistillConfig
from rlhf.distill.data import Answer, answer_batch, demonstrations, sampler_config, write_answers
from rlhf.distill.losses import masked_sum, token_divergence
from rlhf.ppo.config import DeepSpeedConfig
from rlhf.ppo.rollout import response_logits, sample_seed
from rlhf.sft.config import SFTConfig
from rlhf.templates import DEFAULT_TEMPLATE, PromptTemplate

_ORDER_STREAM = 3_000_000  # sample_seed index offsets: the epoch orders ...
_ON_POLICY_STREAM = 3_100_000  # ... and the on-policy draws (PPO's use 1_000_000+, SFT's 2_000_000+)


@dataclass
class HeldOut:
    """The student against the teacher on held-out answers of the teacher, per answer token."""

    answers: int
    tokens: int
    divergence: float  # mean divergence (the config's) from the teacher
    nll: float  # mean negative log-likelihood of the teacher's tokens


@dataclass
class DistillReport:
    """What one distillation did. ``loss_*``: the training objective on the training answers
    (mean divergence per answer token, or the SFT loss), before the first and after the last
    update."""

    mode: str
    answers: int
    epochs: int
    optimizer_steps: int
    loss_before: float
    loss_after: float
    epoch_loss: list[float] = field(default_factory=list)
    on_policy_steps: int = 0
    held_out_before: HeldOut | None = None
    held_out_after: HeldOut | None = None


def student_trainer(student, tokenizer, cfg: DistillConfig, ds: DeepSpeedConfig, template: PromptTemplate = DEFAULT_TEMPLATE):
    """The student on a DeepSpeed engine in this process (the PPO trainer, with no reward model:
    its engine, optimiser and LoRA handling are what the loop's policy trains with); prompts
    are rendered by ``template`` (the SFT batches; the teacher's answers must use the same)."""
    from rlhf.ppo.trainer import PPOTrainer

    def no_reward(prompts: list[str], responses: list[str]):
        raise RuntimeError("distillation scores nothing")

    return PPOTrainer(student, tokenizer, no_reward, sampler_config(cfg), ds, template=template)


def distill(trainer, teacher, answers: Sequence[Answer], held_out: Sequence[Answer], cfg: DistillConfig) -> DistillReport:
    """Train ``trainer``'s student on ``answers`` by ``cfg.mode``; measure it on ``held_out``
    before and after."""
    if trainer.dist.world_size != 1:
        raise ValueError("distillation runs in one process")
    teacher.to(trainer.dist.device).eval()
    before = held_out_figures(_student(trainer), teacher, held_out, cfg, trainer.tokenizer) if held_out else None
    if cfg.mode == "token":
        report = run_token_distillation(trainer, teacher, answers, cfg)
    else:
        report = run_sequence_distillation(trainer, answers, cfg)
    report.held_out_before = before
    if held_out:
        report.held_out_after = held_out_figures(_student(trainer), teacher, held_out, cfg, trainer.tokenizer)
    return report


# -- token-level --------------------------------------------------------------------------


def run_token_distillation(trainer, teacher, answers: Sequence[Answer], cfg: DistillConfig) -> DistillReport:
    """``cfg.epochs`` passes of shuffled minibatches; each one optimiser step on the divergence."""
    if not answers:
        raise ValueError("token-level distillation needs at least one answer")
    engine = trainer.policy_engine
    report = DistillReport(mode="token", answers=len(answers), epochs=cfg.epochs, optimizer_steps=0,
                           loss_before=mean_divergence(_student(trainer), teacher, answers, cfg, trainer.tokenizer),
                           loss_after=float("nan"))
    draws = torch.Generator().manual_seed(sample_seed(cfg.seed, 0, _ON_POLICY_STREAM))
    was_training = engine.module.training
    engine.train()
    for epoch in range(cfg.epochs):
        g = torch.Generator().manual_seed(sample_seed(cfg.seed, epoch, _ORDER_STREAM))
        order = [answers[i] for i in torch.randperm(len(answers), generator=g).tolist()]
        loss_sum, tokens = 0.0, 0.0
        for minibatch in _chunks(order, cfg.batch_size):
            if cfg.lmbda > 0 and torch.rand((), generator=draws).item() < cfg.lmbda:
                minibatch = write_answers(_student(trainer), trainer.tokenizer, [a.prompt for a in minibatch], cfg,
                                          stream=report.optimizer_steps + 1, device=trainer.dist.device,
                                          template=trainer.template)
                report.on_policy_steps += 1
            step_loss, step_tokens = _train_minibatch(trainer, teacher, minibatch, cfg)
            loss_sum, tokens = loss_sum + step_loss, tokens + step_tokens
            report.optimizer_steps += 1
        report.epoch_loss.append(loss_sum / max(tokens, 1.0))
    engine.module.train(was_training)
    report.loss_after = mean_divergence(_student(trainer), teacher, answers, cfg, trainer.tokenizer)
    return report


def _train_minibatch(trainer, teacher, minibatch: list[Answer], cfg: DistillConfig) -> tuple[float, float]:
    """One optimiser step: the minibatch in gradient-accumulation micro-batches of equal rows
    (padding rows add nothing), the summed token divergence over the minibatch's token count.
    Returns (summed divergence, answer tokens)."""
    gas = trainer.ds_cfg.gradient_accumulation_steps
    rows = math.ceil(len(minibatch) / gas)
    padded: list[Answer | None] = [*minibatch, *[None] * (gas * rows - len(minibatch))]
    batches = [_padded_batch(padded[i * rows : (i + 1) * rows], minibatch[0], trainer) for i in range(gas)]
    tokens = sum(float(b.loss_mask.sum()) for b in batches)
    normalizer = max(tokens, 1.0) / gas  # DeepSpeed divides each micro-batch's loss by gas
    student, engine = _student(trainer), trainer.policy_engine
    loss_sum = 0.0
    for batch in batches:
        student_logits, teacher_logits = _logits(student, teacher, batch, len(trainer.tokenizer))
        loss = masked_sum(_divergence(student_logits, teacher_logits, cfg), batch.loss_mask)
        engine.backward(loss / normalizer)
        engine.step()
        loss_sum += loss.item()
    return loss_sum, tokens


def _padded_batch(rows: list[Answer | None], filler: Answer, trainer):
    batch = answer_batch([r or filler for r in rows], trainer.tokenizer.pad_token_id, trainer.dist.device)
    for i, r in enumerate(rows):
        if r is None:
            batch.loss_mask[i] = 0.0
    return batch


# -- sequence-level -----------------------------------------------------------------------


def run_sequence_distillation(trainer, answers: Sequence[Answer], cfg: DistillConfig) -> DistillReport:
    """The SFT step on the teacher's answers (their text; empty answers dropped)."""
    from rlhf.sft.trainer import run_sft

    demos = demonstrations(answers)
    if not demos:
        raise ValueError("sequence-level distillation needs at least one non-empty answer of the teacher")
    sft = SFTConfig(enabled=True, lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size, max_examples=len(demos),
                    max_prompt_tokens=cfg.max_prompt_tokens, max_response_tokens=cfg.max_new_tokens + 1, seed=cfg.seed)
    done = run_sft(trainer, demos, sft)
    return DistillReport(mode="sequence", answers=len(demos), epochs=cfg.epochs, optimizer_steps=done.optimizer_steps,
                         loss_before=done.loss_before, loss_after=done.loss_after, epoch_loss=list(done.epoch_loss))


# -- measuring ----------------------------------------------------------------------------


@torch.no_grad()
def held_out_figures(student, teacher, answers: Sequence[Answer], cfg: DistillConfig, tokenizer) -> HeldOut:
    """The student's mean divergence from the teacher and mean NLL of the answers' tokens."""
    div_sum = nll_sum = tokens = 0.0
    was_training = student.training
    student.eval()
    try:
        for batch in _eval_batches(student, answers, cfg, tokenizer):
            student_logits, teacher_logits = _logits(student, teacher, batch, len(tokenizer))
            div_sum += masked_sum(_divergence(student_logits, teacher_logits, cfg), batch.loss_mask).item()
            nll_sum += masked_sum(_token_nll(student_logits, batch), batch.loss_mask).item()
            tokens += float(batch.loss_mask.sum())
    finally:
        student.train(was_training)
    n = max(tokens, 1.0)
    return HeldOut(answers=len(answers), tokens=int(tokens), divergence=div_sum / n, nll=nll_sum / n)


@torch.no_grad()
def mean_divergence(student, teacher, answers: Sequence[Answer], cfg: DistillConfig, tokenizer) -> float:
    """The student's mean divergence (the config's) from the teacher per answer token."""
    return held_out_figures(student, teacher, answers, cfg, tokenizer).divergence


def _eval_batches(student, answers: Sequence[Answer], cfg: DistillConfig, tokenizer) -> Iterator:
    device = next(student.parameters()).device
    for chunk in _chunks(list(answers), cfg.batch_size):
        yield answer_batch(chunk, tokenizer.pad_token_id, device)


def _logits(student, teacher, batch, vocab: int) -> tuple[Tensor, Tensor]:
    """(B, T, vocab) next-token logits of both models at the answer positions; the teacher's
    (in eval mode) without gradients. The student's mode is the caller's."""
    T = batch.response_length
    student_logits = response_logits(student, batch.sequences, batch.attention_mask, T)[..., :vocab]
    with torch.no_grad():
        teacher_logits = response_logits(teacher, batch.sequences, batch.attention_mask, T)[..., :vocab]
    return student_logits, teacher_logits


def _divergence(student_logits: Tensor, teacher_logits: Tensor, cfg: DistillConfig) -> Tensor:
    return token_divergence(cfg.divergence, student_logits, teacher_logits, beta=cfg.beta, temperature=cfg.temperature)


def _token_nll(student_logits: Tensor, batch) -> Tensor:
    """(B, T): -log p_student of each answer token (temperature 1)."""
    T = batch.response_length
    logp = torch.log_softmax(student_logits.float(), dim=-1)
    return -logp.gather(-1, batch.sequences[:, -T:, None])[..., 0]


def _student(trainer):
    return trainer.policy_engine.module


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
