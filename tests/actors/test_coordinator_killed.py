"""The coordinator process killed mid-step of continuous mode (SIGKILL of `hitl run`), then `hitl run --resume`:
the run completes from the last checkpoint, and every feedback record is used once.

Both `hitl run` processes join the test session's Ray cluster (as `ray job submit` would),
so the test needs no second local Ray on the machine.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.actors.test_loop import tiny_run_config


def _hitl(*args: str) -> list[str]:
    return [sys.executable, "-c", "from hitl.cli import main; main()", *args]


def _wait_for_line(proc: subprocess.Popen, wanted: str, timeout_s: float) -> list[str]:
    """Read the process's merged output until a line containing `wanted` (or fail)."""
    deadline, seen = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if wanted in line:
            return seen
    raise AssertionError(f"no line with {wanted!r} from hitl run (exit {proc.poll()}); last output:\n{''.join(seen[-30:])}")


@pytest.mark.slow
def test_killing_the_coordinator_mid_step_of_continuous_mode_then_resume_completes_the_run(ray_session, tmp_path):
    """Continuous mode, the margin selection policy, tasks retired as soon as a newer version
    is served: the coordinator is killed in its second step and resumed; every judgement of
    the run is consumed by exactly one step, and the run's report shows it as people saw it."""
    address = ray_session.get_runtime_context().gcs_address
    cfg = tiny_run_config(tmp_path, rounds=3, mode="continuous",
                          continuous={"open_tasks": 4, "publish_batch": 4, "min_feedback_per_step": 8, "max_policy_lag": 0,
                                      "min_steps": 5},
                          selection={"policy": "margin", "candidates": 3, "random_share": 0.25})
    data = json.loads(cfg.model_dump_json())
    data["cluster"]["address"] = address
    data["cluster"]["namespace"] = "hitl-killed"
    data["coordinator"]["progress"] = True  # one line per stage on stderr: how the test sees the step
    # people's pace, and short leases: the killed process's annotators leave leased tasks behind
    for a in data["annotators"]["annotators"]:
        a.update(think_time_s=0.2, batch=2, lease_seconds=5)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(data))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    first = subprocess.Popen(_hitl("run", str(config)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_for_line(first, "round step 2 | stage reward_model", timeout_s=600)  # step 1 under way
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "round-0000"
    assert not (run_dir / "reports" / "round-0001.json").exists()

    resumed = subprocess.run(_hitl("run", "--resume", str(run_dir)), capture_output=True, text=True, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    steps = json.loads((run_dir / "report.json").read_text())["rounds"]
    assert [r["round"] for r in steps] == list(range(len(steps))) and len(steps) == 5
    # at most 3 steps of 8 judgements: the last steps train on with no new feedback (min_steps)
    last = steps[-1]
    assert last["watermark_from"] == last["watermark_to"] and last["feedback_to_policy_s"] is None
    assert len(last["ppo"]) == 2 and last["reward_model"].get("skipped") == "no usable records"
    # the watermark ranges chain from the run's start: step k reads exactly (end of step k-1, its own end]
    start = json.loads((run_dir / "run.json").read_text())["start_watermark"]
    assert steps[0]["watermark_from"] == start
    for before, after in zip(steps, steps[1:]):
        assert after["watermark_from"] == before["watermark_to"]
    # the reward model holds each step's curated items once: the killed step's were not kept
    trained = [r for r in steps if "pairs_total" in r["reward_model"]]
    assert trained[-1]["reward_model"]["pairs_total"] == sum(r["feedback"].get("used/preference", 0) for r in steps)
    from services.feedback.store import open_store

    store = open_store(cfg.feedback.service.store)
    try:
        records = store.read_after(start, limit=100_000, projects=[cfg.feedback.project])
        run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
        live_tasks = store.task_count(cfg.feedback.project, f"{run_id}c", include_retired=False)
        open_left = store.open_tasks(cfg.feedback.project, f"{run_id}c")
    finally:
        store.close()
    # every judgement of the run (the killed process's included) lies in exactly one step's range
    assert records and records[-1].seq == steps[-1]["watermark_to"]
    assert sum(r["watermark_to"] - r["watermark_from"] for r in steps) == len(records)
    assert live_tasks == 24 and not open_left  # the budget (3 x 8 tasks) judged, nothing left open
    assert [r["policy_version"] for r in steps] == sorted({r["policy_version"] for r in steps})
    # the run as people saw it: time, throughput, idle shares, versions, what the selection chose
    live = steps[-1]["live"]
    assert live["mode"] == "continuous" and live["task_budget"] == 24
    assert [r["live"]["elapsed_s"] for r in steps] == sorted(r["live"]["elapsed_s"] for r in steps)
    assert 0 < steps[0]["live"]["judgements"] < live["judgements"] <= len(records)
    # idle time ends with the last judgement: the steps after it do not add to it
    k = next(i for i, r in enumerate(steps) if r["watermark_to"] == last["watermark_to"])
    assert {r["live"]["idle_fraction"] for r in steps[k:]} == {steps[k]["live"]["idle_fraction"]}
    assert live["judgements_per_min"] > 0 and set(live["annotator_idle"]) == {"a1", "a2"}
    assert live["served_version"] == steps[-1]["policy_version"]
    reasons = live["selection"]["by_reason"]
    assert sum(reasons.values()) == live["selection"]["tasks"] >= 24
    assert set(reasons) <= {"margin", "random: held-out prompt", "random: share", "random: no reward model yet",
                            "random: one distinct answer", "random: reward model busy"}
    assert reasons.get("random: no reward model yet", 0) > 0  # before the first update
    assert "feedback" in steps[0]["stage_seconds"] and "publish" not in steps[0]["stage_seconds"]
    assert (run_dir / "report.png").stat().st_size > 1000
