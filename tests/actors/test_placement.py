"""Roles land where the config says, on a simulated multi-node cluster with declared GPUs."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_roles_land_on_the_configured_nodes():
    proc = subprocess.run([sys.executable, "-m", "tests.actors.multinode_placement"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # four trainer workers, spread over the two trainer nodes, one GPU each
    assert set(out["trainer_at"]) == set(out["trainer_nodes"])
    assert sorted(out["per_trainer_node"].values()) == [2, 2]
    assert all(len(g) == 1 for g in out["trainer_gpus"])
    # the reward model and the generation replica on the serving node
    assert out["reward_at"] == out["serving_node"] and len(out["reward_gpus"]) == 1
    assert out["generation_at"] == out["serving_node"]
