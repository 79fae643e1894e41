"""Experiment tracking: TensorBoard event files read back with TensorBoard's own reader, and
an MLflow run in a local SQLite store read back with MLflow's client."""

import math

from rlhf.tracking import Tracker, TrackingConfig, flatten, round_scalars

REPORT = {"round": 1, "win_rate": 0.75, "reward": 0.3, "kl": float("nan"), "feedback_to_policy_s": 4.0,
          "reward_model": {"validation_accuracy": 0.7, "skipped": "no"}, "sft": {"loss_after": 1.2},
          "feedback": {"used/preference": 30}, "stage_seconds": {"ppo": 12.5},
          "evaluation": {"rule": {"win_rate": 0.75, "ci95": [0.6, 0.9]}}, "ppo": [{"kl": 1.0}]}


def test_round_scalars_keep_numbers_by_path():
    s = round_scalars(REPORT)
    assert s["win_rate"] == 0.75 and s["reward_model/validation_accuracy"] == 0.7
    assert s["feedback/used/preference"] == 30 and s["evaluation/rule/win_rate"] == 0.75
    assert "evaluation/rule/ci95" not in s and "ppo" not in s
    assert flatten({"a": {"b": {"c": 1}}}) == {"a/b/c": 1}


def test_tensorboard_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = Tracker(TrackingConfig(), tmp_path, run_name="t")
    tracker.log(round_scalars(REPORT), step=1)
    tracker.log({"win_rate": 0.8}, step=2)
    tracker.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"win_rate", "reward_model/validation_accuracy", "stage_seconds/ppo"} <= tags
    assert "kl" not in tags and "reward_model/skipped" not in tags  # NaN and text are left out
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("win_rate")] == [(1, 0.75), (2, 0.8)]


def test_mlflow_run_in_a_sqlite_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrackingConfig(tensorboard=False, mlflow_tracking_uri=uri, mlflow_experiment="hitl-test")
    tracker = Tracker(cfg, tmp_path, run_name="run-1", params={"reward.lr": 0.001, "ppo.algorithm": "grpo"})
    tracker.log(round_scalars(REPORT), step=1)
    tracker.log({"win_rate": 0.9}, step=2)
    run_id = tracker._mlflow.run_id
    tracker.close()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"reward.lr": "0.001", "ppo.algorithm": "grpo"}
    history = client.get_metric_history(run_id, "win_rate")
    assert [(m.step, m.value) for m in history] == [(1, 0.75), (2, 0.9)]
    assert math.isclose(client.get_metric_history(run_id, "reward_model/validation_accuracy")[0].value, 0.7)
    assert not (tmp_path / "tensorboard").exists()
