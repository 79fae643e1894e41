"""Whole rounds on a simulated 4-node cluster (tests/cluster/simulated.py): trainers, engines,
the reward model and the feedback service each on a node of their own, the PostgreSQL store,
checkpoints through an object-store URI, weights over the sync group."""

import pytest

from tests.cluster.conftest import scenario

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.distributed]


def test_every_role_runs_on_its_own_node(cluster_runs):
    run = scenario(cluster_runs, "loop")
    nodes, where = run["nodes"], run["where"]
    assert set(where["trainers"]) == {nodes["trainer"]} and len(where["trainers"]) == 2
    assert where["engines"] == [nodes["serving"]] * 2
    assert where["reward_model"] == [nodes["reward"]]
    assert where["feedback"] == where["driver"] == nodes["head"]  # pinned where its port is
    assert len({nodes["trainer"], nodes["serving"], nodes["reward"], nodes["head"]}) == 4
    assert where["reward_model_devices"] == ["cpu"]  # simulated GPUs: placed as on a GPU, computed on the CPU


def test_rounds_complete_with_rollouts_from_the_engines_and_weights_over_the_sync_group(cluster_runs):
    run = scenario(cluster_runs, "loop")
    reports = run["reports"]
    assert [r["round"] for r in reports] == [0, 1] and run["recoveries"] == []
    assert [r["policy_version"] for r in reports] == [1, 2]
    assert reports[1]["watermark_from"] == reports[0]["watermark_to"] > 0
    assert all(r["ppo_iterations"] == 2 for r in reports)
    # every rollout row was sampled by an engine, every engine took a share: the trainers never generated
    engines = run["engines"]
    assert sum(e["rollout_rows"] for e in engines) == 2 * 2 * run["samples_per_iteration"]
    assert all(e["rollout_rows"] > 0 and e["generated_rows"] > 0 for e in engines)
    # each version crossed the sync group (gloo) to both engines, and they serve the last one
    assert [e["sync_pushes"] for e in engines] == [2, 2] and all(e["sync_error"] is None for e in engines)
    assert run["served_versions"] == [2, 2]
    # round 1's rollouts were drawn by the version pushed at the end of round 0
    assert run["rollout_versions"] == [1, 1]
    assert run["latest"] == "round-0001"  # checkpoints went to the object-store URI
