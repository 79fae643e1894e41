"""Experiment tracking: a run's scalars as TensorBoard event files (by default, offline) and in
MLflow when a tracking URI is configured.

    tracker = Tracker(TrackingConfig(), run_dir, run_name="local-3f2a", params=flat_config)
    tracker.log({"win_rate": 0.8, "reward_model/validation_accuracy": 0.7}, step=round_)
    tracker.close()

TensorBoard files go to `<run_dir>/tensorboard` (`tensorboard --logdir runs/local/tensorboard`),
written with tensorboardX (Ray's own dependency, so nothing more to install). MLflow logs
params once and metrics per step to the configured URI (a server, or `file:` / `sqlite:`
stores that work offline). Weights & Biases is not offered: its client is not installable
here, so it could not be tested.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)


class TrackingConfig(BaseModel):
    """Where a run's metrics go besides its reports."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensorboard: bool = True
    """Event files under `<run_dir>/tensorboard`: every round's figures, every PPO iteration's."""
    mlflow_tracking_uri: str | None = None
    """An MLflow tracking URI (http://host:5000, file:///path/mlruns, sqlite:///mlflow.db); None: no MLflow."""
    mlflow_experiment: str = "hitl"
    """The MLflow experiment the run is logged under."""


class Tracker:
    def __init__(self, cfg: TrackingConfig, run_dir: Path, run_name: str, params: Mapping[str, Any] | None = None):
        self.cfg = cfg
        self._tb = None
        self._mlflow = None
        if cfg.tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(Path(run_dir) / "tensorboard"), flush_secs=10)
        if cfg.mlflow_tracking_uri:
            self._mlflow = _MlflowRun(cfg, run_name, dict(params or {}))

    def log(self, values: Mapping[str, Any], step: int) -> None:
        """Every finite number of `values` at `step` (others are skipped)."""
        scalars = {k: float(v) for k, v in values.items() if _number(v)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, global_step=step)
        if self._mlflow is not None:
            self._mlflow.log(scalars, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._mlflow is not None:
            self._mlflow.close()
            self._mlflow = None


class _MlflowRun:
    def __init__(self, cfg: TrackingConfig, run_name: str, params: dict[str, Any]):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise ImportError("tracking.mlflow_tracking_uri needs MLflow: pip install mlflow-skinny (or mlflow)") from err
        self.client = MlflowClient(tracking_uri=cfg.mlflow_tracking_uri)
        experiment = self.client.get_experiment_by_name(cfg.mlflow_experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.mlflow_experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log(self, scalars: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in scalars.items()]
        for start in range(0, len(metrics), 500):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 500])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow_key(key: str) -> str:
    """MLflow allows letters, digits, _ - . space : / in metric names."""
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as `a/b/c` keys (lists are left out)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "/"))
        elif not isinstance(value, (list, tuple)):
            out[name] = value
    return out


def round_scalars(report: Mapping[str, Any]) -> dict[str, Any]:
    """What TensorBoard and MLflow get of a round report (actors/coordinator.py RoundReport):
    win-rate, reward, KL, the reward model, SFT, feedback counts, per-judge evaluation, stage
    seconds, feedback-to-policy latency, and the run as people see it (`live`: time,
    judgements per minute, annotators' idle share, tasks ready and retired)."""
    keep = ("win_rate", "reward", "kl", "feedback_to_policy_s", "policy_version", "watermark_to")
    out = {k: report.get(k) for k in keep}
    for section in ("reward_model", "sft", "feedback", "stage_seconds", "evaluation"):
        out.update(flatten(report.get(section) or {}, f"{section}/"))
    live = report.get("live") or {}
    for key in ("elapsed_s", "judgements", "judgements_per_min", "idle_fraction", "ready", "tasks_retired"):
        if isinstance(live.get(key), (int, float)):
            out[f"live/{key}"] = live[key]
    return out
