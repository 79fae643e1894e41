"""Patience on a series of measurements: when a trainer has stopped getting better.

    p = Patience(patience=2, min_delta=0.0, mode="min")
    for epoch in ...:
        if p.update(validation_loss):
            break  # p.reason("validation loss") says why

Used by the SFT step (validation loss per epoch), a round's PPO iterations (mean reward per
iteration) and the loop (evaluation win-rate per round). A value counts as better only when it
beats the best so far by more than ``min_delta``; ``patience`` measurements in a row that do
not mean it is time to stop. The reward model keeps its own loop, which also restores the
best epoch's weights (rlhf/reward/trainer.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal


@dataclass
class Patience:
    patience: int
    min_delta: float = 0.0
    mode: Literal["min", "max"] = "min"
    best: float = math.nan
    best_step: int = -1  # 0-based index of the best measurement
    steps: int = 0  # measurements seen
    stale: int = 0  # measurements since the best

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")

    def update(self, value: float) -> bool:
        """Record the next measurement; True when `patience` in a row have not improved.
        NaN never improves."""
        improved = not math.isnan(value) and (
            math.isnan(self.best) or (value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta))
        if improved:
            self.best, self.best_step, self.stale = value, self.steps, 0
        else:
            self.stale += 1
        self.steps += 1
        return self.stale >= self.patience

    def reason(self, what: str, unit: str = "step") -> str:
        """Why it stopped, in words: what, the best and where it was, how long since."""
        better = "below" if self.mode == "min" else "above"
        return (f"{what} not {better} its best {self.best:.4g} ({unit} {self.best_step + 1}) by more than "
                f"{self.min_delta:g} for {self.stale} {unit}(s); stopped after {unit} {self.steps}")


def replay(values: Iterable[float], patience: int, min_delta: float = 0.0, mode: Literal["min", "max"] = "min") -> Patience:
    """A Patience fed `values` in order (for series kept elsewhere, e.g. a run's reports)."""
    p = Patience(patience, min_delta, mode)
    for v in values:
        p.update(v)
    return p
