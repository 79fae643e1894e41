"""Supervised fine-tuning on demonstrations, on the PPO trainer's own DeepSpeed engine.

    report = run_sft(ppo_trainer, demonstrations, SFTConfig(enabled=True, lr=1e-5, epochs=2))

The step trains exactly what PPO trains (the LoRA adapters, or every weight) through
``trainer.policy_engine``: the same ZeRO partitioning, gradient clipping and optimiser. It is
collective: every rank calls it with the same demonstrations, in the same order.

- **Loss.** Negative log-likelihood of the response tokens (and the end-of-turn token) given
  the chat-formatted prompt; prompt tokens are masked out (the LM head is applied only at
  response positions). Token losses are weighted by the demonstration's weight, summed, and
  divided by the minibatch's weighted token count over all ranks, scaled for DeepSpeed's
  averaging over ranks and accumulation steps: N ranks give the gradient of one process
  holding the whole minibatch (the PPO update's normalisation).
- **Batches.** A minibatch of ``batch_size`` demonstrations is cut into ranks x accumulation
  steps micro-batches of equal row count; missing rows are zero-weight padding, so every rank
  runs the same number of forward and backward passes (ZeRO's collectives need that).
- **Early stopping.** With ``validation_fraction`` > 0, the demonstrations of a share of the
  prompts (a stable hash, as the reward model splits) are held out; after every epoch their
  loss is measured and the step stops after ``patience`` epochs without a new best, with the
  reason in the report (``stopped``).
- **Learning rate.** For the step, the policy's parameter group runs at ``SFTConfig.lr`` and
  any other group of the engine (a value head) at 0; the engine's scheduler is detached, so
  PPO's warm-up schedule does not advance. Both are restored afterwards. The optimiser's
  moments are shared with PPO (ZeRO keeps one optimiser state per engine).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rlhf.early_stopping import Patience
from rlhf.ppo.rollout import response_logprobs, sample_seed
from rlhf.ppo.trainer import PPOTrainer, _all_reduce_sum
from rlhf.sft.config import SFTConfig
from rlhf.sft.data import Demonstration, SFTBatch, make_batch
from rlhf.splits import bucket

_ORDER_STREAM = 2_000_000  # sample_seed index offset of the epoch orders (PPO's use 1_000_000+)


@dataclass
class SFTReport:
    """What one SFT step did; losses are mean negative log-likelihoods per response token."""

    demonstrations: int
    epochs: int
    optimizer_steps: int
    tokens: float  # weighted response tokens per epoch, all ranks
    loss_before: float  # on the demonstrations, before the first update
    loss_after: float  # on the demonstrations, after the last update
    epoch_loss: list[float] = field(default_factory=list)  # training loss of each epoch
    validation: int = 0  # demonstrations held out for early stopping (not trained on)
    validation_loss: list[float] = field(default_factory=list)  # after each epoch run
    epochs_run: int = 0
    stopped: str | None = None  # why the step ended before `epochs`, else None


def run_sft(trainer: PPOTrainer, demos: Sequence[Demonstration], cfg: SFTConfig) -> SFTReport:
    """Up to ``cfg.epochs`` passes of shuffled minibatches over ``demos`` (weight 0 ones
    dropped), stopped early on held-out demonstrations when ``cfg.validation_fraction`` > 0."""
    demos = [d for d in demos if d.weight > 0][: cfg.max_examples]
    if not demos:
        raise ValueError("run_sft needs at least one demonstration of positive weight")
    demos, held_out = split_validation(demos, cfg)
    engine = trainer.policy_engine
    report = SFTReport(demonstrations=len(demos), epochs=cfg.epochs, optimizer_steps=0, tokens=0.0,
                       loss_before=mean_nll(trainer, demos, cfg), loss_after=float("nan"), validation=len(held_out))
    stopper = Patience(cfg.patience, cfg.min_delta, mode="min")
    was_training = engine.module.training
    engine.train()
    with _learning_rate(engine, cfg.lr):
        for epoch in range(cfg.epochs):
            _train_epoch(trainer, demos, cfg, epoch, report)
            if held_out:
                report.validation_loss.append(mean_nll(trainer, held_out, cfg))
                if stopper.update(report.validation_loss[-1]) and epoch + 1 < cfg.epochs:
                    report.stopped = stopper.reason("validation loss", "epoch")
                    break
    engine.module.train(was_training)
    report.loss_after = mean_nll(trainer, demos, cfg)
    return report


def split_validation(demos: list[Demonstration], cfg: SFTConfig) -> tuple[list[Demonstration], list[Demonstration]]:
    """(train, held out): a demonstration is held out when its prompt's stable hash falls under
    ``cfg.validation_fraction``; no split unless both sides get one."""
    if cfg.validation_fraction <= 0:
        return demos, []
    held = [bucket(d.prompt_id or d.prompt, cfg.seed) < cfg.validation_fraction for d in demos]
    train = [d for d, h in zip(demos, held) if not h]
    held_out = [d for d, h in zip(demos, held) if h]
    return (train, held_out) if train and held_out else (demos, [])


def epoch_order(items: Sequence, seed: int, iteration: int, stream: int) -> list:
    """`items` shuffled for one epoch, the same on every rank (seeded by seed, the trainer's
    iteration and the epoch's stream index)."""
    g = torch.Generator().manual_seed(sample_seed(seed, iteration, stream))
    return [items[i] for i in torch.randperm(len(items), generator=g).tolist()]


def _train_epoch(trainer: PPOTrainer, demos: list[Demonstration], cfg: SFTConfig, epoch: int, report: SFTReport) -> None:
    order = epoch_order(demos, cfg.seed, trainer.iteration, _ORDER_STREAM + epoch)
    loss_sum, tokens = 0.0, 0.0
    for minibatch in _chunks(order, cfg.batch_size):
        step_loss, step_tokens = _train_minibatch(trainer, minibatch, cfg)
        loss_sum, tokens = loss_sum + step_loss, tokens + step_tokens
        report.optimizer_steps += 1
    report.epoch_loss.append(loss_sum / tokens)
    report.tokens = tokens
    report.epochs_run = epoch + 1


@torch.no_grad()
def mean_nll(trainer: PPOTrainer, demos: Sequence[Demonstration], cfg: SFTConfig) -> float:
    """Mean negative log-likelihood per (weighted) response token of ``demos`` under the
    policy, in eval mode; collective."""
    policy = _policy(trainer)
    was_training = policy.training
    policy.eval()
    try:
        total, tokens = torch.zeros((), device=trainer.dist.device), torch.zeros((), device=trainer.dist.device)
        for minibatch in _chunks(list(demos), cfg.batch_size):
            for batch in _micro_batches(trainer, minibatch, cfg):
                total += _nll_sum(policy, batch)
                tokens += batch.loss_mask.sum()
        sums = _all_reduce_sum(torch.stack([total.float(), tokens.float()]))
    finally:
        policy.train(was_training)
    return (sums[0] / sums[1].clamp(min=1e-12)).item()


def _train_minibatch(trainer: PPOTrainer, minibatch: list[Demonstration], cfg: SFTConfig) -> tuple[float, float]:
    """One optimiser step on ``minibatch``; (summed token loss, weighted tokens), all ranks."""
    batches = list(_micro_batches(trainer, minibatch, cfg))
    local_tokens = torch.stack([b.loss_mask.sum() for b in batches]).sum()
    tokens = _all_reduce_sum(local_tokens.float())
    world, gas = trainer.dist.world_size, trainer.ds_cfg.gradient_accumulation_steps
    normalizer = tokens.clamp(min=1e-12) / (world * gas)
    policy = _policy(trainer)
    loss_sum = torch.zeros((), device=trainer.dist.device)
    for batch in batches:
        nll = _nll_sum(policy, batch)
        trainer.policy_engine.backward(nll / normalizer)
        trainer.policy_engine.step()
        loss_sum += nll.detach().float()
    return _all_reduce_sum(loss_sum).item(), tokens.item()


def _micro_batches(trainer: PPOTrainer, minibatch: list[Demonstration], cfg: SFTConfig) -> Iterator[SFTBatch]:
    """This rank's accumulation-step micro-batches of a global minibatch, padded to equal rows."""
    world, rank = trainer.dist.world_size, trainer.dist.rank
    gas = trainer.ds_cfg.gradient_accumulation_steps
    rows = math.ceil(len(minibatch) / (world * gas))
    padded: list[Demonstration | None] = [*minibatch, *[None] * (world * gas * rows - len(minibatch))]
    mine = padded[rank * gas * rows : (rank + 1) * gas * rows]
    for i in range(gas):
        yield make_batch(trainer.tokenizer, mine[i * rows : (i + 1) * rows], cfg.max_prompt_tokens,
                         cfg.max_response_tokens, trainer.dist.device, filler=minibatch[0], template=trainer.template)


def _nll_sum(policy, batch: SFTBatch) -> Tensor:
    """Sum over response tokens of weight x -log p(token | everything before it)."""
    logprobs, _ = response_logprobs(policy, batch.sequences, batch.attention_mask, batch.response_length, 1.0)
    return -(logprobs.float() * batch.loss_mask).sum()


def _policy(trainer: PPOTrainer):
    module = trainer.policy_engine.module
    return module.policy if trainer.critic_is_head else module


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@contextmanager
def _learning_rate(engine, lr: float):
    """The policy's group (the first) at ``lr``, other groups at 0, the scheduler detached."""
    groups = engine.optimizer.param_groups
    saved = [g["lr"] for g in groups]
    scheduler, engine.lr_scheduler = engine.lr_scheduler, None
    for i, group in enumerate(groups):
        group["lr"] = lr if i == 0 else 0.0
    try:
        yield
    finally:
        for group, value in zip(groups, saved):
            group["lr"] = value
        engine.lr_scheduler = scheduler
