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


def test_a_run_across_nodes_refuses_a_node_local_sqlite_store():
    from actors.placement import check_store_reach
    from rlhf.config import ConfigError

    with pytest.raises(ConfigError, match=r"feedback.service.store: 'sqlite:///hitl-data/feedback.db' is a file on one node.*"
                                          r"3 nodes.*postgresql://"):
        check_store_reach("sqlite:///hitl-data/feedback.db", nodes=3, embedded=True)
    with pytest.raises(ConfigError, match="feedback.service.store"):
        check_store_reach("feedback.db", nodes=2, embedded=True)  # a bare path is SQLite too
    check_store_reach("sqlite:///hitl-data/feedback.db", nodes=1, embedded=True)  # one node: one file
    check_store_reach("postgresql://hitl@db:5432/hitl", nodes=3, embedded=True)
    check_store_reach("sqlite:///x.db", nodes=3, embedded=False)  # an external service owns its store


def test_a_profile_asking_for_more_gpus_than_the_cluster_has_fails_before_starting():
    from actors.config import RunConfig
    from actors.placement import check_cluster_gpus
    from rlhf.config import ConfigError, load_config

    cfg = load_config("configs/cluster-gpu-8b.yaml", RunConfig)  # 16 trainer ranks, 1 reward model, 2 engines
    check_cluster_gpus(cfg, 24.0)
    with pytest.raises(ConfigError, match=r"cluster: the roles ask for 19 GPUs \(cluster.trainer.num_gpus x processes = 16, "
                                          r"cluster.reward_model.num_gpus x processes = 1, generation.num_gpus x processes = 2\)"
                                          r" and this Ray cluster has 8"):
        check_cluster_gpus(cfg, 8.0)
    check_cluster_gpus(RunConfig(), 0.0)  # a CPU profile asks for none
