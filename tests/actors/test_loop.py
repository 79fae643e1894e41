"""The loop end to end on a tiny model: real Ray, Serve, gRPC, DeepSpeed (ZeRO-2, 2 workers)."""

import json

import pytest
import yaml

from actors.config import RunConfig
from rlhf.config import parse_config


def tiny_run_config(tmp_path, rounds=2, **coordinator):
    data = yaml.safe_load(open("configs/tiny.yaml"))
    data["deepspeed"] = {"zero_stage": 2, "bf16": False}
    data["ppo"].update(rollout_batch_size=4, minibatch_size=2)
    data.update(
        cluster={"trainer": {"workers": 2, "num_cpus": 0.5}, "reward_model": {"num_cpus": 0.5}},
        feedback={"service": {"store": f"sqlite:///{tmp_path / 'feedback.db'}", "port": 0, "metrics_port": None}, "project": "loop"},
        generation={"replicas": 1, "num_cpus": 0.5, "http_port": 8792, "max_batch_size": 8},
        coordinator={"rounds": rounds, "tasks_per_round": 8, "min_feedback_per_round": 8, "ppo_iterations_per_round": 2,
                     "eval_prompts": 4, "eval_max_new_tokens": 8, "run_dir": str(tmp_path / "run"), "progress": False, **coordinator},
        annotators={"annotators": [{"annotator_id": "a1", "noise": 0.0, "seed": 1, "judge": {"rule": "concise"}},
                                   {"annotator_id": "a2", "noise": 0.2, "seed": 2, "judge": {"rule": "concise"}}]},
    )
    return parse_config(data, RunConfig)


def _scrape_series(wait: bool) -> set[str]:
    """The names of the hitl series a scrape of this node's Ray metrics port returns; with
    `wait`, scraped again (while the run's actors live) until every role's are there or Ray's
    export interval has surely passed."""
    import time
    import urllib.request

    import ray

    from services.telemetry import series_names

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    wanted = {n for names in series_names().values() for n in names}
    deadline, seen = time.monotonic() + 45, set()
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        seen |= {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_hitl_")}
        names = {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n in seen}
        if not wait or wanted <= names or time.monotonic() > deadline:
            return seen
        time.sleep(2)


def _check_observability(run_dir, scraped: set[str], reports) -> None:
    """Every role's Prometheus series (scraped while the run went on), the TensorBoard event
    files, the status record and `hitl status` on it."""
    from click.testing import CliRunner
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hitl.cli import main
    from services.telemetry import series_names

    wanted = series_names()
    for role in ("trainer", "reward_model", "generation", "coordinator"):
        names = {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n in scraped}
        missing = [n for n in wanted[role] if n not in names]
        # the coordinator's win-rate/accuracy series appear from the first round report on
        assert not missing, (role, missing, sorted(scraped))
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("win_rate")] == [0, 1]
    assert [round(e.value, 4) for e in acc.Scalars("win_rate")] == [round(r.win_rate, 4) for r in reports]
    assert len(acc.Scalars("ppo/kl")) == 4 and "reward_model/validation_accuracy" in acc.Tags()["scalars"]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["round"] == "2/2" and status["policy_version"] == 2
    assert status["last_error"] is None and status["metrics"]["win_rate"] == reports[-1].win_rate
    shown = CliRunner().invoke(main, ["status", str(run_dir)])
    assert shown.exit_code == 0 and "state       finished" in shown.output and "policy      v2" in shown.output, shown.output
    # the same record from the cluster's key-value store, read by a process that only has the address
    import os
    import subprocess
    import sys

    import ray

    listed = subprocess.run([sys.executable, "-m", "hitl.cli", "status", "--json", "--address", ray.get_runtime_context().gcs_address,
                             status["run_id"]], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert listed.returncode == 0, listed.stderr[-2000:]
    (remote,) = json.loads(listed.stdout)
    assert remote == status


@pytest.mark.slow
def test_rounds_run_checkpoint_and_resume(ray_session, tmp_path):
    from actors.coordinator import Coordinator

    cfg = tiny_run_config(tmp_path, rounds=2)
    scraped: set[str] = set()
    reports = Coordinator(cfg, on_round=lambda report: scraped.update(_scrape_series(wait=report.round == 1))).run()
    assert [r.round for r in reports] == [0, 1]
    assert [r.policy_version for r in reports] == [1, 2]
    for r in reports:
        assert r.feedback.get("used/preference", 0) >= 8
        assert r.reward_model["pairs_total"] >= 8
        assert len(r.ppo) == 2 and r.kl is not None
        assert 0.0 <= r.win_rate <= 1.0
        assert set(r.stage_seconds) >= {"publish", "feedback", "reward_model", "ppo", "push_weights", "evaluate"}
    # watermarks chain: every record is used once, none skipped
    assert reports[0].watermark_from == 0 and reports[1].watermark_from == reports[0].watermark_to
    run_dir = tmp_path / "run"
    assert run_dir.stat().st_mode & 0o777 == 0o700  # checkpoints and reports: the owner's alone
    assert (run_dir / "report.png").stat().st_size > 1000
    # each round's evaluation: the rule judge's figure with its interval, and the eval files
    for r in reports:
        rule = r.evaluation["rule"]
        assert rule["win_rate"] == r.win_rate and rule["n"] == 4 and rule["ci95"][0] <= r.win_rate <= rule["ci95"][1]
        evaluated = run_dir / "eval" / f"round-{r.round:04d}"
        assert json.loads((evaluated / "eval.json").read_text())["judges"]["rule"]["n"] == 4
        assert (evaluated / "eval.md").exists() and (evaluated / "eval.png").stat().st_size > 1000
    assert len(json.loads((run_dir / "report.json").read_text())["rounds"]) == 2
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "round-0001"
    _check_observability(run_dir, scraped, reports)

    # resume with one more round: it starts at round 2, from the checkpoint's watermark
    resumed_cfg = RunConfig.model_validate({**cfg.model_dump(), "coordinator": {**cfg.coordinator.model_dump(), "rounds": 3}})
    more = Coordinator(resumed_cfg, run_dir, resume=True).run()
    assert [r.round for r in more] == [2]
    assert more[0].watermark_from == reports[1].watermark_to
    assert more[0].policy_version == 3
    rounds = json.loads((run_dir / "report.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]

    # a new run on the same store: task ids of its own, none of the earlier run's feedback
    other_cfg = RunConfig.model_validate({**cfg.model_dump(), "coordinator": {**cfg.coordinator.model_dump(), "rounds": 1,
                                                                              "run_dir": str(tmp_path / "other")}})
    other = Coordinator(other_cfg).run()
    assert other[0].watermark_from == more[0].watermark_to
    first_ids = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert json.loads((tmp_path / "other" / "run.json").read_text())["run_id"] != first_ids


@pytest.mark.slow
def test_a_lost_trainer_worker_restarts_the_round_from_the_checkpoint(ray_session, tmp_path):
    import ray

    from actors.coordinator import Coordinator

    class KillsAWorker(Coordinator):
        killed = False

        def ppo_iterations(self, r, rm_report=None):
            if r == 1 and not self.killed:
                KillsAWorker.killed = True
                ray.kill(self.trainers.workers[1])  # a trainer process dies mid-round
            return super().ppo_iterations(r, rm_report)

    cfg = tiny_run_config(tmp_path, rounds=2)
    reports = KillsAWorker(cfg).run()
    assert KillsAWorker.killed
    assert [r.round for r in reports] == [0, 1]  # round 1 was redone
    assert reports[1].watermark_from == reports[0].watermark_to  # from the checkpoint: nothing reused or skipped
    assert reports[1].policy_version > reports[0].policy_version
    saved = json.loads((tmp_path / "run" / "report.json").read_text())["rounds"]
    assert [r["round"] for r in saved] == [0, 1]
