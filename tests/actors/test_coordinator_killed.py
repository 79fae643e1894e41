"""The coordinator process killed mid-round (SIGKILL of `hitl run`), then `hitl run --resume`:
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
def test_killing_the_coordinator_mid_round_then_resume_completes_the_run(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    cfg = tiny_run_config(tmp_path, rounds=3)
    data = json.loads(cfg.model_dump_json())
    data["cluster"]["address"] = address
    data["cluster"]["namespace"] = "hitl-killed"
    data["coordinator"]["progress"] = True  # one line per stage on stderr: how the test sees the round
    config = tmp_path / "config.json"
    config.write_text(json.dumps(data))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    first = subprocess.Popen(_hitl("run", str(config)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_for_line(first, "round 2/3 | stage reward_model", timeout_s=600)  # round 1 under way
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "round-0000"
    assert not (run_dir / "reports" / "round-0001.json").exists()

    resumed = subprocess.run(_hitl("run", "--resume", str(run_dir)), capture_output=True, text=True, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rounds = json.loads((run_dir / "report.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # the watermark ranges chain: round k reads exactly (end of round k-1, its own end]
    for before, after in zip(rounds, rounds[1:]):
        assert after["watermark_from"] == before["watermark_to"]
    # the reward model holds each round's curated items once: the killed round's were not kept
    assert rounds[-1]["reward_model"]["pairs_total"] == sum(r["feedback"].get("used/preference", 0) for r in rounds)
    # the killed attempt's feedback for round 1 was read by the redone round, none skipped
    from services.feedback.store import open_store

    store = open_store(cfg.feedback.service.store)
    try:
        records = store.read_after(0, limit=100_000, projects=[cfg.feedback.project])
    finally:
        store.close()
    round1 = [s for s in records if "-r1-t" in s.record.task_id]
    assert round1 and all(rounds[1]["watermark_from"] < s.seq <= rounds[1]["watermark_to"] for s in round1)
    assert [r["policy_version"] for r in rounds] == sorted({r["policy_version"] for r in rounds})
