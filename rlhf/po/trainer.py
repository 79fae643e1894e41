"""DPO, IPO and KTO on the PPO trainer's own DeepSpeed engine (as SFT runs there).

    report = run_preference_optimisation(ppo_trainer, pairs_from(curated.items), POConfig(loss="dpo"))

The step trains exactly what PPO trains (the LoRA adapters, or every weight) through
``trainer.policy_engine`` with its ZeRO partitioning, clipping and optimiser; the reference is
PPO's (``trainer.reference``: adapters off under LoRA, else the frozen starting policy). It is
collective: every rank calls it with the same examples in the same order.

- **Rows.** A pair is two rows, its chosen and its rejected answer after the same
  chat-formatted prompt (the SFT batch layout, ``rlhf.sft.data.make_batch``); a KTO example is
  one row. An answer's log-prob is the sum over its tokens, the end-of-turn token included.
- **Batches.** A minibatch of ``batch_size`` examples is cut into ranks x accumulation steps
  micro-batches of equal row count; missing rows are zero-weight padding, so every rank runs
  the same forward and backward passes (ZeRO's collectives need that).
- **Normalisation.** Example losses times their weights are summed and divided by the
  minibatch's summed weight over all ranks (scaled for DeepSpeed's averaging over ranks and
  accumulation steps): N ranks give the gradient of one process holding the whole minibatch,
  and with unit weights the loss is TRL's batch mean.
- **KTO's reference point** z0 is estimated once per minibatch, before its updates: each
  answer paired with the previous example's prompt (cycled within the micro-batch, as TRL
  does), the mean policy-minus-reference log-ratio over all ranks, clamped at 0, detached.
- **Learning rate.** As in SFT: the policy's group runs at ``POConfig.lr``, other groups (a
  value head) at 0, PPO's scheduler detached and everything restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rlhf.po.config import POConfig
from rlhf.po.data import KTOExample, PairExample
from rlhf.po.losses import dpo_loss, ipo_loss, kto_loss
from rlhf.ppo.rollout import response_logprobs
from rlhf.ppo.trainer import PPOTrainer, _all_reduce_sum
from rlhf.sft.data import Demonstration, make_batch
from rlhf.sft.trainer import _chunks, _learning_rate, _policy, epoch_order

_ORDER_STREAM = 3_000_000  # sample_seed index offset of the epoch orders (SFT uses 2_000_000+)

Example = PairExample | KTOExample


@dataclass
class POReport:
    """What one preference-optimisation step did; losses are weighted means per example."""

    loss: str
    examples: int
    epochs: int
    optimizer_steps: int
    loss_before: float  # on the examples, before the first update (eval mode)
    loss_after: float  # on the examples, after the last update
    accuracy_before: float  # pairs: the chosen answer's log-ratio above the rejected one's; KTO: the sign of each log-ratio right
    accuracy_after: float
    epoch_loss: list[float] = field(default_factory=list)


@dataclass
class _Rows:
    """One micro-batch of a rank: token rows and what each example needs."""

    sequences: Tensor  # (R, P+T)
    attention_mask: Tensor  # (R, P+T)
    token_mask: Tensor  # (R, T) 1 on real answer tokens
    weights: Tensor  # (E,) example weights; 0 for padding
    desirable: Tensor | None  # (E,) bool, KTO
    kl_sequences: Tensor | None = None  # KTO: each answer after the previous example's prompt
    kl_attention_mask: Tensor | None = None
    kl_token_mask: Tensor | None = None


def run_preference_optimisation(trainer: PPOTrainer, examples: Sequence[Example], cfg: POConfig) -> POReport:
    """``cfg.epochs`` passes of shuffled minibatches of ``examples`` (zero-weight ones dropped)."""
    kind = KTOExample if cfg.loss == "kto" else PairExample
    examples = [e for e in examples if e.weight > 0][: cfg.max_examples]
    if not examples:
        raise ValueError(f"{cfg.loss} needs at least one example of positive weight")
    if not all(isinstance(e, kind) for e in examples):
        raise ValueError(f"{cfg.loss} trains on {kind.__name__}s")
    engine = trainer.policy_engine
    before, acc_before = evaluate(trainer, examples, cfg)
    report = POReport(cfg.loss, len(examples), cfg.epochs, 0, before, float("nan"), acc_before, float("nan"))
    was_training = engine.module.training
    engine.train()
    with _learning_rate(engine, cfg.lr):
        for epoch in range(cfg.epochs):
            order = epoch_order(examples, cfg.seed, trainer.iteration, _ORDER_STREAM + epoch)
            loss_sum, weight = 0.0, 0.0
            for minibatch in _chunks(order, cfg.batch_size):
                step_loss, step_weight = _train_minibatch(trainer, minibatch, cfg)
                loss_sum, weight = loss_sum + step_loss, weight + step_weight
                report.optimizer_steps += 1
            report.epoch_loss.append(loss_sum / weight)
    engine.module.train(was_training)
    report.loss_after, report.accuracy_after = evaluate(trainer, examples, cfg)
    return report


@torch.no_grad()
def evaluate(trainer: PPOTrainer, examples: Sequence[Example], cfg: POConfig) -> tuple[float, float]:
    """(weighted mean loss, weighted accuracy) of ``examples`` under the policy in eval mode; collective."""
    policy = _policy(trainer)
    was_training = policy.training
    policy.eval()
    try:
        totals = torch.zeros(3, device=trainer.dist.device)
        for minibatch in _chunks(list(examples), cfg.batch_size):
            batches = list(_micro_batches(trainer, minibatch, cfg))
            kl = _kl_point(trainer, policy, batches) if cfg.loss == "kto" else None
            for rows in batches:
                losses, correct = _losses(trainer, policy, rows, cfg, kl)
                totals += torch.stack([(losses * rows.weights).sum(), (correct * rows.weights).sum(), rows.weights.sum()]).float()
        sums = _all_reduce_sum(totals)
    finally:
        policy.train(was_training)
    return (sums[0] / sums[2].clamp(min=1e-12)).item(), (sums[1] / sums[2].clamp(min=1e-12)).item()


def _train_minibatch(trainer: PPOTrainer, minibatch: list[Example], cfg: POConfig) -> tuple[float, float]:
    """One optimiser step on ``minibatch``; (summed weighted loss, summed weight), all ranks."""
    batches = list(_micro_batches(trainer, minibatch, cfg))
    weight = _all_reduce_sum(torch.stack([b.weights.sum() for b in batches]).sum().float())
    world, gas = trainer.dist.world_size, trainer.ds_cfg.gradient_accumulation_steps
    normalizer = weight.clamp(min=1e-12) / (world * gas)
    policy = _policy(trainer)
    kl = _kl_point(trainer, policy, batches) if cfg.loss == "kto" else None
    loss_sum = torch.zeros((), device=trainer.dist.device)
    for rows in batches:
        losses, _ = _losses(trainer, policy, rows, cfg, kl)
        weighted = (losses * rows.weights).sum()
        trainer.policy_engine.backward(weighted / normalizer)
        trainer.policy_engine.step()
        loss_sum += weighted.detach().float()
    return _all_reduce_sum(loss_sum).item(), weight.item()


def _answer_logps(model, sequences: Tensor, attention_mask: Tensor, token_mask: Tensor) -> Tensor:
    """Sum over each row's answer tokens of log pi(token | everything before it), (R,)."""
    logprobs, _ = response_logprobs(model, sequences, attention_mask, token_mask.shape[1], 1.0)
    return (logprobs.float() * token_mask).sum(-1)


def _reference_logps(trainer: PPOTrainer, sequences: Tensor, attention_mask: Tensor, token_mask: Tensor) -> Tensor:
    with trainer.reference.active() as reference:
        return _answer_logps(reference, sequences, attention_mask, token_mask)


def _losses(trainer: PPOTrainer, policy, rows: _Rows, cfg: POConfig, kl: Tensor | None) -> tuple[Tensor, Tensor]:
    """(per-example losses (E,), per-example correctness (E,) as 0/1) of one micro-batch."""
    ref = _reference_logps(trainer, rows.sequences, rows.attention_mask, rows.token_mask)
    logps = _answer_logps(policy, rows.sequences, rows.attention_mask, rows.token_mask)
    if cfg.loss == "kto":
        losses, rewards = kto_loss(logps, ref, rows.desirable, kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
        return losses, ((rewards > 0) == rows.desirable).float()
    n = rows.weights.shape[0]
    chosen, rejected = (logps[:n], logps[n:]), (ref[:n], ref[n:])
    if cfg.loss == "dpo":
        losses, r_chosen, r_rejected = dpo_loss(chosen[0], chosen[1], rejected[0], rejected[1], cfg.beta, cfg.label_smoothing)
    else:
        tokens = rows.token_mask.sum(-1)
        losses, r_chosen, r_rejected = ipo_loss(chosen[0], chosen[1], rejected[0], rejected[1], tokens[:n], tokens[n:], cfg.beta)
    return losses, (r_chosen > r_rejected).float()


@torch.no_grad()
def _kl_point(trainer: PPOTrainer, policy, batches: list[_Rows]) -> Tensor:
    """KTO's z0 for a minibatch: the mismatched rows' mean log-ratio over every rank, clamped at 0."""
    total = torch.zeros(2, device=trainer.dist.device)
    for rows in batches:
        mask = rows.kl_token_mask
        ref = _reference_logps(trainer, rows.kl_sequences, rows.kl_attention_mask, mask)
        logps = _answer_logps(policy, rows.kl_sequences, rows.kl_attention_mask, mask)
        real = rows.weights > 0
        total += torch.stack([(logps - ref)[real].sum(), real.sum()]).float()
    sums = _all_reduce_sum(total)
    return (sums[0] / sums[1].clamp(min=1.0)).clamp(min=0)


def _micro_batches(trainer: PPOTrainer, minibatch: list[Example], cfg: POConfig) -> Iterator[_Rows]:
    """This rank's accumulation-step micro-batches of a global minibatch, padded to equal rows."""
    world, rank = trainer.dist.world_size, trainer.dist.rank
    gas = trainer.ds_cfg.gradient_accumulation_steps
    rows = math.ceil(len(minibatch) / (world * gas))
    padded: list[Example | None] = [*minibatch, *[None] * (world * gas * rows - len(minibatch))]
    mine = padded[rank * gas * rows : (rank + 1) * gas * rows]
    for i in range(gas):
        yield _rows(trainer, mine[i * rows : (i + 1) * rows], minibatch[0], cfg)


def _rows(trainer: PPOTrainer, examples: list[Example | None], filler: Example, cfg: POConfig) -> _Rows:
    weights = torch.tensor([0.0 if e is None else e.weight for e in examples], device=trainer.dist.device)
    real = [e or filler for e in examples]
    if isinstance(filler, PairExample):
        answers = [(e.prompt, e.chosen) for e in real] + [(e.prompt, e.rejected) for e in real]
        batch = _token_rows(trainer, answers, cfg)
        return _Rows(batch.sequences, batch.attention_mask, batch.loss_mask, weights, None)
    batch = _token_rows(trainer, [(e.prompt, e.completion) for e in real], cfg)
    desirable = torch.tensor([e.desirable for e in real], dtype=torch.bool, device=trainer.dist.device)
    shifted = real[-1:] + real[:-1]  # answer i-1 after prompt i, as TRL cycles them
    kl = _token_rows(trainer, [(e.prompt, s.completion) for e, s in zip(real, shifted)], cfg)
    return _Rows(batch.sequences, batch.attention_mask, batch.loss_mask, weights, desirable,
                 kl.sequences, kl.attention_mask, kl.loss_mask)


def _token_rows(trainer: PPOTrainer, answers: list[tuple[str, str]], cfg: POConfig):
    demos = [Demonstration(prompt, answer) for prompt, answer in answers]
    return make_batch(trainer.tokenizer, demos, cfg.max_prompt_tokens, cfg.max_response_tokens, trainer.dist.device,
                      template=trainer.template)
