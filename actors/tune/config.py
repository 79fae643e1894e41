"""The space file of `hitl tune`: what to search, how, and what a trial is.

    config: ../configs/tiny.yaml          # relative to this file
    objective: {metric: reward_accuracy}
    trial: {kind: replay, store: sqlite:///hitl-data/feedback.db, rounds: 4}
    search: {algorithm: random, trials: 8, seed: 0}
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}
    space:
      reward.lr: {loguniform: [1.0e-4, 1.0e-2]}
      reward.max_epochs: {choice: [2, 5, 10]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

METRICS = ("reward_accuracy", "win_rate", "reward_at_kl")


class Param(BaseModel):
    """One searched field: exactly one of the keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    choice: list[Any] | None = None
    """One of these values, drawn (random, tpe)."""
    grid: list[Any] | None = None
    """Every one of these values (search.algorithm grid only)."""
    uniform: tuple[float, float] | None = None
    """A float drawn uniformly in [low, high]."""
    loguniform: tuple[float, float] | None = None
    """A float drawn uniformly in log space in [low, high] (both > 0)."""
    randint: tuple[int, int] | None = None
    """An integer in [low, high] (both included)."""

    @model_validator(mode="after")
    def _one(self) -> "Param":
        given = [k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, grid, uniform, loguniform, randint (got {given or 'none'})")
        for key in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, key)
            if bounds is not None and not bounds[0] <= bounds[1]:
                raise ValueError(f"{key}: low {bounds[0]} is above high {bounds[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: bounds must be > 0, got {self.loguniform[0]}")
        for key in ("choice", "grid"):
            if getattr(self, key) == []:
                raise ValueError(f"{key}: needs at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def sample_values(self) -> list[Any]:
        """Values a config check tries: the ends of a range, or every listed value."""
        values = getattr(self, self.kind)
        return list(values)


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: Literal["reward_accuracy", "win_rate", "reward_at_kl"] = "reward_accuracy"
    """`reward_accuracy`: the reward model's held-out pair accuracy; `win_rate`: the round's
    evaluation win-rate against the initial policy (`loop` trials); `reward_at_kl`: the mean
    reward of the round's last PPO iteration whose KL is within `kl_budget` (`loop` trials).
    All are maximised."""
    kl_budget: float | None = Field(None, gt=0)
    """`reward_at_kl` only: the KL (per answer, as round reports give it) allowed."""

    @model_validator(mode="after")
    def _budget(self) -> "Objective":
        if self.metric == "reward_at_kl" and self.kl_budget is None:
            raise ValueError("kl_budget: required for metric reward_at_kl")
        return self


class TrialSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["replay", "replay_loop", "loop"] = "replay"
    """`replay`: the reward-model stage over stored feedback, round by round; `replay_loop`:
    the whole loop over stored feedback (reward model, SFT, policy update, evaluation; nobody
    is asked again: actors/tune/replay.py); `loop`: the whole loop (`hitl run`) with the
    config's simulated annotators. Loop trials run one at a time."""
    store: str | None = None
    """`replay`, `replay_loop`: the store URL to replay (a relative SQLite path is taken from the space
    file's folder); None: the run config's feedback store."""
    project: str | None = None
    """`replay`, `replay_loop`: the project to replay; None: the run config's `feedback.project`."""
    rounds: int = Field(4, ge=1)
    """`replay`, `replay_loop`: the snapshot is cut into this many rounds of equal size, in watermark
    order; each round updates the reward model and reports (ASHA's time unit)."""
    watermark: int | None = Field(None, ge=0)
    """`replay`, `replay_loop`: the last record replayed; None: the store's last record when the search
    starts (written to OUT/tune.json, so a resumed search replays the same records)."""
    cpus: float = Field(1.0, gt=0)
    """CPUs a trial reserves (its torch threads); Tune runs as many at once as fit."""


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: Literal["grid", "random", "tpe"] = "random"
    """`grid`: every combination of the `grid` lists; `random`: independent draws;
    `tpe`: Bayesian optimisation with Optuna's tree-structured Parzen estimator."""
    trials: int = Field(8, ge=1)
    """Trials to run (`grid`: how many times the whole grid is run)."""
    seed: int = 0
    """Seed of the draws (`random`, `tpe`)."""
    max_concurrent: int | None = Field(None, ge=1)
    """Most trials at once; None: as many as the cluster's CPUs allow (`loop` trials: 1)."""


class SchedulerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["asha", "none"] = "asha"
    """`asha`: asynchronous successive halving, stopping trials whose objective is in the
    lower part at a rung; `none`: every trial runs all its rounds."""
    grace_period: int = Field(1, ge=1)
    """Rounds every trial runs before it can be stopped."""
    reduction_factor: float = Field(2.0, gt=1)
    """At each rung, the top 1/reduction_factor of trials go on."""


class TuneSpec(BaseModel):
    """A whole `hitl tune` space file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: Path
    """The run config every trial starts from (relative to the space file)."""
    objective: Objective = Field(default_factory=Objective)
    trial: TrialSpec = Field(default_factory=TrialSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    space: dict[str, Param]
    """Dotted config field (`reward.lr`, `annotators.annotators[0].noise`) -> its values."""

    @field_validator("space", mode="before")
    @classmethod
    def _params(cls, value: Any) -> Any:
        """Each field's values checked here, so an error names the field it is about."""
        if not isinstance(value, dict):
            return value
        out = {}
        for name, param in value.items():
            try:
                out[name] = param if isinstance(param, Param) else Param.model_validate(param)
            except ValidationError as err:
                detail = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors(include_url=False))
                raise ValueError(f"{name}: {detail}") from None
        return out

    @model_validator(mode="after")
    def _consistent(self) -> "TuneSpec":
        if not self.space:
            raise ValueError("space: name at least one field to search")
        grid = [name for name, p in self.space.items() if p.kind == "grid"]
        if self.search.algorithm == "grid" and len(grid) != len(self.space):
            others = sorted(set(self.space) - set(grid))
            raise ValueError(f"space.{others[0]}: search.algorithm grid needs `grid` values for every field")
        if self.search.algorithm != "grid" and grid:
            raise ValueError(f"space.{grid[0]}: `grid` values need search.algorithm grid (use `choice`)")
        if self.trial.kind == "replay" and self.objective.metric != "reward_accuracy":
            raise ValueError(f"objective.metric: {self.objective.metric} needs trial.kind replay_loop or loop "
                             "(replay trains the reward model only)")
        return self
