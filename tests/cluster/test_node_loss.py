"""A node lost mid-round on a simulated cluster (tests/cluster/simulated.py): the run replaces
its compute roles on the nodes there are now and redoes the round from its last checkpoint;
no feedback is used twice or skipped."""

import pytest

from tests.cluster.conftest import scenario

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.distributed]


def test_the_run_completes_from_its_checkpoint_after_losing_the_trainers_node(cluster_runs):
    run = scenario(cluster_runs, "node_loss")
    assert run["removed"] == run["nodes"]["trainer"] == run["before"]["trainers"][0]
    assert len(run["recoveries"]) == 1 and run["recoveries"][0]["round"] == 1
    reports = run["reports"]
    assert [r["round"] for r in reports] == [0, 1]
    assert reports[1]["policy_version"] > reports[0]["policy_version"]
    # the trainers were rebuilt on the replacement node; the other roles kept their nodes
    after = run["after"]
    assert set(after["trainers"]) == {run["replacement"]}
    assert after["engines"] == [run["nodes"]["serving"]] * 2 and after["reward_model"] == [run["nodes"]["reward"]]
    assert all(e["sync_error"] is None for e in run["engines"])


def test_no_feedback_is_reused_or_skipped_across_the_loss(cluster_runs):
    run = scenario(cluster_runs, "node_loss")
    r0, r1 = run["reports"]
    assert r0["watermark_from"] == 0 and r1["watermark_from"] == r0["watermark_to"]
    # the rounds' ranges cover the stored records up to the last watermark, each once
    used = [s for s in run["stored_seqs"] if s <= r1["watermark_to"]]
    in_r0 = [s for s in used if r0["watermark_from"] < s <= r0["watermark_to"]]
    in_r1 = [s for s in used if r1["watermark_from"] < s <= r1["watermark_to"]]
    assert in_r0 and in_r1 and sorted(in_r0 + in_r1) == used
    # the reward model (on a node that stayed) was restored too: round 1's items trained once, not twice
    trained_in_r1 = sum(n for k, n in r1["used"].items() if k in ("used/preference", "used/ranking"))
    assert trained_in_r1 > 0 and r1["pairs_total"] == r0["pairs_total"] + trained_in_r1
    assert run["latest"] == "round-0001"
