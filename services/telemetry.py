"""Prometheus series of every role, through Ray's metrics: one scrape of a node's metrics
port (Ray's `MetricsExportPort`, default 8080 under `ray start`) sees the trainer ranks, the
reward model, the generation engines and the coordinator that run there.

    m = trainer_metrics()                     # once per process, where the role runs
    m.record({"loss": 0.3, ...}, rank=0)      # after each step

Every series is named `hitl_<role>_<what>` here (Ray adds the `ray_` prefix on export) and
tagged with what tells instances apart (`rank`, `replica`). deploy/grafana/hitl.json charts
them; tests/actors/test_loop.py scrapes them from a run. Outside Ray (a unit test, `hitl
train`), recording is a no-op.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]

# (name, description, tag keys) per role; one place, so the dashboard and the tests agree
TRAINER = {
    "step_seconds": "Seconds of the last PPO iteration (rollouts, scoring, update).",
    "samples_per_second": "Rollouts per second of the last PPO iteration, over all ranks.",
    "tokens_per_second": "Response tokens per second of the last PPO iteration, over all ranks.",
    "loss": "Total loss of the last PPO update.",
    "kl": "KL to the reference of the last rollouts (per answer).",
    "clip_fraction": "Share of tokens whose ratio was clipped in the last update.",
    "grad_norm": "Global gradient norm of the last optimiser step (before clipping).",
    "reward": "Mean reward-model score of the last rollouts.",
    "iterations": "PPO iterations run by this rank.",
}
REWARD_MODEL = {
    "accuracy": "Held-out pair accuracy after the last update.",
    "update_seconds": "Seconds of the last reward-model update.",
    "pairs": "Pairs the reward model trains on.",
}
GENERATION = {
    "queue_depth": "Requests waiting in the engine's batching queue.",
    "batch_size": "Requests in the last batch the engine ran.",
    "tokens_per_second": "Generated tokens per second of the last batch.",
    "latency_seconds": "Seconds from a request's arrival to its answer.",
    "policy_version": "Policy version the engine serves.",
}
COORDINATOR = {
    "stage": "1 for the stage the loop is in, 0 for the others (tag `stage`).",
    "round": "The round being run (0-based).",
    "watermark": "Last feedback record the loop has consumed.",
    "feedback_lag": "Records committed to the store and not yet consumed by the loop.",
    "policy_version": "Policy version last pushed to the engines.",
    "win_rate": "Evaluation win-rate of the last round.",
    "reward_accuracy": "The reward model's held-out accuracy of the last round.",
    "open_tasks": "Judgements ready for annotators to pull (open tasks nobody holds).",
    "judgements_per_minute": "Judgements the loop consumed per minute of the run so far.",
    "annotator_idle_fraction": "Simulated annotators' mean share of time with no task to take.",
}
STAGES = ("starting", "publish", "feedback", "curate", "reward_model", "sft", "ppo", "push_weights", "evaluate",
          "checkpoint", "done", "recovering")


def series_names() -> dict[str, list[str]]:
    """The exported names (with Ray's prefix) of every role's series."""
    roles = {"trainer": TRAINER, "reward_model": REWARD_MODEL, "generation": GENERATION, "coordinator": COORDINATOR}
    return {role: [f"ray_hitl_{role}_{name}" for name in names] for role, names in roles.items()}


class RoleMetrics:
    """Gauges (and one histogram, `latency_seconds`) of one role, created on first use."""

    def __init__(self, role: str, names: Mapping[str, str], tag_keys: tuple[str, ...]):
        self.role, self.names, self.tag_keys = role, dict(names), tag_keys
        self._metrics: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> dict[str, Any] | None:
        if self._metrics is None:
            with self._lock:
                if self._metrics is None:
                    self._metrics = _build(self.role, self.names, self.tag_keys)
        return self._metrics or None

    def record(self, values: Mapping[str, float | str | None], **tags: Any) -> None:
        """Set each named gauge (values that are None, or names not of this role, are skipped)."""
        metrics = self._ensure()
        if not metrics:
            return
        tag_values = {k: str(v) for k, v in tags.items()}
        for name, value in values.items():
            metric = metrics.get(name)
            if metric is None or value is None:
                continue
            if name == "stage":  # value: the current stage's name
                for stage in STAGES:
                    metric.set(1.0 if stage == value else 0.0, tags={**tag_values, "stage": stage})
            elif name == "latency_seconds":
                metric.observe(float(value), tags=tag_values)
            else:
                metric.set(float(value), tags=tag_values)


def _build(role: str, names: Mapping[str, str], tag_keys: tuple[str, ...]) -> dict[str, Any]:
    try:
        import ray
        from ray.util.metrics import Gauge, Histogram
    except ImportError:
        return {}
    if not ray.is_initialized():
        return {}
    out: dict[str, Any] = {}
    for name, description in names.items():
        full = f"hitl_{role}_{name}"
        if name == "latency_seconds":
            out[name] = Histogram(full, description=description, boundaries=LATENCY_BOUNDARIES, tag_keys=tag_keys)
        else:
            keys = (*tag_keys, "stage") if name == "stage" else tag_keys  # the stage gauge: one series per stage
            out[name] = Gauge(full, description=description, tag_keys=keys)
    return out


_ROLES: dict[str, RoleMetrics] = {}


def _role(role: str, names: Mapping[str, str], tag_keys: tuple[str, ...]) -> RoleMetrics:
    if role not in _ROLES:
        _ROLES[role] = RoleMetrics(role, names, tag_keys)
    return _ROLES[role]


def trainer_metrics() -> RoleMetrics:
    return _role("trainer", TRAINER, ("rank",))


def reward_model_metrics() -> RoleMetrics:
    return _role("reward_model", REWARD_MODEL, ("replica",))


def generation_metrics() -> RoleMetrics:
    return _role("generation", GENERATION, ("replica",))


def coordinator_metrics() -> RoleMetrics:
    return _role("coordinator", COORDINATOR, ("run",))


def trainer_values(metrics: Mapping[str, float], grad_norm: float | None, world_size: int, samples: int) -> dict[str, float | None]:
    """A PPO iteration's metrics (rlhf.ppo.trainer.PPOTrainer.step) as the trainer's series."""
    seconds = sum(v for k, v in metrics.items() if k.startswith("time_") and k.endswith("_s"))
    tokens = metrics.get("response_length", 0.0) * samples
    return {
        "step_seconds": seconds or None,
        "samples_per_second": samples / seconds if seconds else None,
        "tokens_per_second": tokens / seconds if seconds else None,
        "loss": metrics.get("loss"),
        "kl": metrics.get("kl"),
        "clip_fraction": metrics.get("clip_frac"),
        "grad_norm": grad_norm,
        "reward": metrics.get("reward"),
        "iterations": metrics.get("iteration"),
    }
