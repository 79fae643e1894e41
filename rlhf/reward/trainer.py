"""Training the reward model: minibatch AdamW on the Bradley–Terry loss, validation after
every epoch, early stopping on validation loss with the best epoch's weights restored.

    model = build_reward_model(cfg.reward, cfg.model)
    report = train_reward_model(model, pairs)        # pairs: PreferencePair / Ranking records
    report.validation_accuracy, model.score(prompts, responses)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rlhf.preferences import PreferencePair, Ranking, expand
from rlhf.reward.data import PairSplit, TrainingPair, split_by_prompt, training_pairs
from rlhf.reward.loss import bradley_terry_loss, pair_accuracy_counts
from rlhf.reward.model import RewardModel


@dataclass(frozen=True)
class PairMetrics:
    """Loss and accuracy of a reward model on a set of pairs."""

    loss: float  # weighted Bradley–Terry cross-entropy
    accuracy: float  # share of decided pairs (no ties) ranked correctly; nan if none
    pairs: int  # pairs evaluated
    decided: int  # of which with a preference (counted in the accuracy)


@dataclass
class RewardTrainingReport:
    """What one training run did."""

    train_pairs: int
    validation_pairs: int
    epochs_run: int
    best_epoch: int  # 1-based epoch whose weights were kept
    stopped_early: bool
    train_loss: list[float] = field(default_factory=list)  # (epochs_run,) mean over batches
    validation_loss: list[float] = field(default_factory=list)  # (epochs_run,)
    validation_accuracy: float = float("nan")  # of the kept weights, on held-out pairs
    offset: float = 0.0  # subtracted from raw scores to centre them


def _pair_scores(model: RewardModel, pairs: Sequence[TrainingPair], *, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.response_a for p in pairs] + [p.response_b for p in pairs]
    scores = model.score_batch(prompts, responses) if grad else model.score(prompts, responses)
    return scores[: len(pairs)], scores[len(pairs) :]


def _targets(pairs: Sequence[TrainingPair], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.tensor([p.target for p in pairs], dtype=torch.float32, device=device)
    weight = torch.tensor([p.weight for p in pairs], dtype=torch.float32, device=device)
    return target, weight


def evaluate_pairs(model: RewardModel, pairs: Sequence[TrainingPair]) -> PairMetrics:
    """Loss and accuracy on pairs, scored in eval mode without gradients."""
    score_a, score_b = _pair_scores(model, pairs, grad=False)
    target, weight = _targets(pairs, score_a.device)
    loss = bradley_terry_loss(score_a, score_b, target, weight).item()
    correct, decided = pair_accuracy_counts(score_a, score_b, target)
    accuracy = correct / decided if decided else float("nan")
    return PairMetrics(loss=loss, accuracy=accuracy, pairs=len(pairs), decided=decided)


def evaluate_preferences(
    model: RewardModel, records: Sequence[PreferencePair | Ranking]
) -> PairMetrics:
    """:func:`evaluate_pairs` on preference records, with the model's target rules."""
    return evaluate_pairs(model, training_pairs(expand(records), model.cfg))


def _train_epoch(
    model: RewardModel,
    pairs: Sequence[TrainingPair],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> float:
    cfg = model.cfg
    model.train()
    order = torch.randperm(len(pairs), generator=generator).tolist()
    losses: list[float] = []
    for start in range(0, len(order), cfg.batch_size):
        batch = [pairs[i] for i in order[start : start + cfg.batch_size]]
        score_a, score_b = _pair_scores(model, batch, grad=True)
        target, weight = _targets(batch, score_a.device)
        loss = bradley_terry_loss(score_a, score_b, target, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(_trainable(model), cfg.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


def _trainable(model: RewardModel) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _snapshot(model: RewardModel) -> dict[str, torch.Tensor]:
    """Copies of the trainable tensors (all that training changes)."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: t.detach().clone() for name, t in model.state_dict().items() if name in names}


def _centre(model: RewardModel, pairs: Sequence[TrainingPair]) -> float:
    model.offset.zero_()
    score_a, score_b = _pair_scores(model, pairs, grad=False)
    offset = float(torch.cat([score_a, score_b]).mean())
    model.offset.fill_(offset)
    return offset


def fit(model: RewardModel, split: PairSplit) -> RewardTrainingReport:
    """Train on ``split.train`` with early stopping on ``split.validation`` loss; the best
    epoch's weights are kept (and scores centred if configured)."""
    cfg = model.cfg
    if not split.train or not split.validation:
        raise ValueError("both the training and the validation split need pairs")
    optimizer = torch.optim.AdamW(_trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    report = RewardTrainingReport(
        train_pairs=len(split.train), validation_pairs=len(split.validation),
        epochs_run=0, best_epoch=0, stopped_early=False,
    )
    best_loss, best_state, stale = float("inf"), _snapshot(model), 0
    best_accuracy = float("nan")
    for epoch in range(1, cfg.max_epochs + 1):
        report.train_loss.append(_train_epoch(model, split.train, optimizer, generator))
        val = evaluate_pairs(model, split.validation)
        report.validation_loss.append(val.loss)
        report.epochs_run = epoch
        if val.loss < best_loss - cfg.min_delta:
            best_loss, best_state, stale, report.best_epoch = val.loss, _snapshot(model), 0, epoch
            best_accuracy = val.accuracy  # of exactly the weights kept: no second pass needed
        else:
            stale += 1
        if stale >= cfg.patience:
            report.stopped_early = epoch < cfg.max_epochs
            break
    model.load_state_dict(best_state, strict=False)
    model.eval()
    if cfg.center_scores:
        report.offset = _centre(model, split.train)  # a shift of every score: accuracy unchanged
    report.validation_accuracy = best_accuracy if report.best_epoch else evaluate_pairs(model, split.validation).accuracy
    return report


def train_reward_model(
    model: RewardModel, records: Sequence[PreferencePair | Ranking], *, new_from: int = 0
) -> RewardTrainingReport:
    """Expand rankings, turn preferences into targets (ties, both-bad, strength, weights as
    configured), split by prompt, and :func:`fit`.

    ``records[new_from:]`` are new since the model's last update; with ``update_pairs`` set
    and earlier records present, the update trains on :func:`update_split`'s pairs."""
    cfg = model.cfg
    old = training_pairs(expand(records[:new_from]), cfg)
    new = training_pairs(expand(records[new_from:]), cfg)
    split = split_by_prompt(old + new, cfg.validation_fraction, cfg.split_seed)
    if cfg.update_pairs is not None and old:
        split = update_split(split, new, cfg.update_pairs, seed=cfg.seed + len(old))
    return fit(model, split)


def update_split(split: PairSplit, new: Sequence[TrainingPair], budget: int, seed: int) -> PairSplit:
    """The training side cut to the new pairs plus a seeded sample of the earlier ones, at most
    ``budget`` pairs in all (every new one kept); validation unchanged."""
    new_ids = {id(p) for p in new}
    fresh = [p for p in split.train if id(p) in new_ids]
    earlier = [p for p in split.train if id(p) not in new_ids]
    room = min(len(earlier), max(0, budget - len(fresh)))
    replay = random.Random(seed).sample(earlier, room)
    return PairSplit(train=fresh + replay, validation=split.validation)
