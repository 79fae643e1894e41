"""`hitl generation serve`: a run's latest policy served on its own, probed over HTTP, stopped
with Ctrl-C; bad sources and open configurations refused before anything starts."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from rlhf.storage import CheckpointStorage, write_policy

SECTIONS = {"model": {"source": "tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64},
            "lora": {"enabled": False}, "generation": {"replicas": 1, "num_cpus": 0.25, "max_batch_size": 4}}


def _hitl(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hitl.cli", *args], capture_output=True, text=True, timeout=120, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_source_that_is_neither_a_run_nor_a_config_is_refused(tmp_path):
    done = _hitl("generation", "serve", str(tmp_path))
    assert done.returncode == 2 and "not a run directory (no config.json)" in done.stderr


def test_an_open_configuration_is_refused_before_anything_starts(tmp_path):
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump({**SECTIONS, "generation": {**SECTIONS["generation"], "http_host": "0.0.0.0"}}))
    done = _hitl("generation", "serve", str(path))
    assert done.returncode == 2 and "api_keys_file" in done.stderr and "Ray" not in done.stderr


@pytest.mark.slow
@pytest.mark.ray  # starts a Ray of its own, in the child process
def test_it_serves_a_runs_latest_policy_until_interrupted(tmp_path):
    from services.generation.engine import PolicyEngine
    from rlhf.models import ModelConfig

    run_dir = tmp_path / "run-0001"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({**SECTIONS, "ppo": {"rollout_batch_size": 4}}))
    tensors = {k: v + 0.5 for k, v in PolicyEngine(ModelConfig(**SECTIONS["model"]), None).weights().items()}
    storage = CheckpointStorage(str(run_dir / "checkpoints"))
    write_policy(storage, "round-0004/policy", 4, tensors, adapters_only=False)
    storage.write_text("LATEST", "round-0004\n")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hitl.cli", "generation", "serve", str(run_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, models = time.monotonic() + 240, None
        while models is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
                    models = json.loads(resp.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        assert models is not None, proc.stderr.read() if proc.poll() is not None else "no answer in time"
        assert models["data"][0]["policy_version"] == 4
        body = json.dumps({"prompt": "Hi", "max_tokens": 3, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        assert answer["policy_version"] == 4 and answer["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
