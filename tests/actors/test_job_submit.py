"""`ray job submit --working-dir . -- hitl run CONFIG` against a separately started Ray head."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.actors.test_loop import tiny_run_config

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_up(address: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=3):
            return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_job_submit_runs_a_round_on_a_running_cluster(tmp_path):
    ray_bin = Path(sys.executable).with_name("ray")
    gcs, dashboard = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_DASHBOARD_STARTUP_TIMEOUT_S"] = "600"  # the job API needs the dashboard; it starts slowly on a busy 2-core machine
    env["RAY_AUTH_MODE"] = "disabled"  # a throwaway cluster on loopback: no token to hand around
    ray_tmp = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=8", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
         # ports of their own, so that another Ray on this machine cannot take the job agent's
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--temp-dir={ray_tmp}"],
        env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        cfg = tiny_run_config(tmp_path, rounds=1)
        data = json.loads(cfg.model_dump_json())
        data["cluster"]["address"] = "auto"
        data["generation"]["http_port"] = free_port()
        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump(data))
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 600
        while not dashboard_up(address):
            assert head.poll() is None, "ray start --head exited:\n" + (tmp_path / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the dashboard (job API) did not come up"
            time.sleep(2)
        while True:  # the API answers before the node's job agent is up; it says "try again later"
            job = subprocess.run(
                [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                 "hitl", "run", str(config)],
                env=env, capture_output=True, text=True, timeout=900,
            )
            if "No available agent" not in job.stderr + job.stdout or time.monotonic() > deadline:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        summary = next(json.loads(l) for l in job.stdout.splitlines() if l.startswith("{") and '"run_dir"' in l)
        assert summary["rounds"] == 1
        report = json.loads((tmp_path / "run" / "report.json").read_text())
        assert len(report["rounds"]) == 1 and report["rounds"][0]["feedback"]["used/preference"] >= 8
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
        head_log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
