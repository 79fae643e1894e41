"""One simulated multi-node cluster for every test in tests/cluster: the scenarios the
collected tests need run once, in a process of their own (tests/cluster/simulated.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCENARIO_OF_MODULE = {"test_multinode_loop": "loop", "test_node_loss": "node_loss"}


@pytest.fixture(scope="session")
def cluster_runs(request, tmp_path_factory) -> dict:
    """The results of the scenarios of the collected cluster tests (run on first use)."""
    wanted = []
    for item in request.session.items:
        scenario = SCENARIO_OF_MODULE.get(item.module.__name__.rsplit(".", 1)[-1])
        if scenario and scenario not in wanted:
            wanted.append(scenario)
    wanted.sort(key=list(SCENARIO_OF_MODULE.values()).index)  # node_loss removes a node: last
    workdir = tmp_path_factory.mktemp("cluster")
    out = workdir / "results.json"
    proc = subprocess.run([sys.executable, "-m", "tests.cluster.simulated", *wanted, "--out", str(out), "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=2400)
    if not out.exists():
        pytest.fail(f"the simulated cluster did not start (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    results = json.loads(out.read_text())
    results["log"] = proc.stderr[-6000:]
    return results


def scenario(results: dict, name: str) -> dict:
    run = results[name]
    assert "error" not in run, f"{run['error']}\n{results['log']}"
    return run
