"""The loop on a simulated multi-node cluster, run by tests/cluster in a process of its own
(one Ray cluster for every scenario asked for; the test session's own local Ray stays apart):

    python -m tests.cluster.simulated loop node_loss --out results.json

`ray.cluster_utils.Cluster`: a head node (this driver, the coordinator and the feedback
service) and one node per compute role, each declaring fake GPUs and a label resource:
`trainer` (two PPO ranks), `serving` (two generation engines), `reward` (the reward model).
`cluster.simulate_gpus` makes every role compute on the CPU while it is placed as on GPUs.
The store is PostgreSQL (a schema of its own per scenario), checkpoints go through an
object-store URI (pyarrow.fs), weights cross the sync group (gloo).

Scenarios, each writing what the tests assert on:
- `loop`: two whole rounds.
- `node_loss`: two rounds; in the second, after its feedback was read and the reward model
  updated, a replacement trainer node joins and the trainers' node is removed (its raylet
  and every process on it killed); the run must finish from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import uuid
from pathlib import Path

import ray
import yaml
from ray.cluster_utils import Cluster

from actors.config import RunConfig
from rlhf.config import parse_config
from tests.conftest import POSTGRES_URL

TRAINER_NODE = {"num_cpus": 2, "num_gpus": 2, "resources": {"trainer": 2}}
SERVING_NODE = {"num_cpus": 2, "num_gpus": 2, "resources": {"serving": 2}}
REWARD_NODE = {"num_cpus": 1, "num_gpus": 1, "resources": {"reward": 1}}


def run_config(store: str, run_dir: Path, rounds: int = 2) -> RunConfig:
    data = yaml.safe_load(Path("configs/tiny.yaml").read_text())
    data["deepspeed"] = {"zero_stage": 2, "bf16": False}
    data["ppo"].update(rollout_batch_size=4, minibatch_size=2)
    data.update(
        cluster={
            "simulate_gpus": True,
            "trainer": {"workers": 2, "num_cpus": 0.5, "num_gpus": 1, "resources": {"trainer": 1}, "strategy": "PACK",
                        "torch_threads": 1},
            "reward_model": {"num_cpus": 0.5, "num_gpus": 1, "resources": {"reward": 1}, "torch_threads": 1},
        },
        feedback={"service": {"store": store, "port": 0, "metrics_port": None}, "project": "cluster"},
        generation={"replicas": 2, "num_cpus": 0.5, "num_gpus": 1, "resources": {"serving": 1}, "http_port": 8793,
                    "max_batch_size": 8, "weight_sync": "group", "torch_threads": 1},
        coordinator={"rounds": rounds, "tasks_per_round": 8, "min_feedback_per_round": 8, "ppo_iterations_per_round": 2,
                     "eval_prompts": 4, "eval_max_new_tokens": 8, "run_dir": str(run_dir), "progress": False,
                     "storage": f"file://{run_dir}/bucket", "call_timeout_s": 300},
        annotators={"annotators": [{"annotator_id": "a1", "noise": 0.0, "seed": 1, "judge": {"rule": "concise"}},
                                   {"annotator_id": "a2", "noise": 0.2, "seed": 2, "judge": {"rule": "concise"}}]},
    )
    return parse_config(data, RunConfig)


def _schema_store() -> tuple[str, str]:
    schema = f"hitl_cluster_{uuid.uuid4().hex[:10]}"
    sep = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{sep}schema={schema}", schema


def _drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _where(coordinator) -> dict:
    """The node of every role, read while the run is up."""
    return {
        "trainers": coordinator.trainers.nodes(),
        "engines": coordinator.engines.nodes(),
        "reward_model": coordinator.reward_model.nodes(),
        "reward_model_devices": coordinator.reward_model.devices(),
        "feedback": ray.get(coordinator.feedback_actor.node.remote(), timeout=60),
        "driver": ray.get_runtime_context().get_node_id(),
    }


def _wait_until_dead(node_id: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"node {node_id} still alive {timeout_s:g}s after its removal")


def _reports(reports) -> list[dict]:
    return [{"round": r.round, "policy_version": r.policy_version, "watermark_from": r.watermark_from,
             "watermark_to": r.watermark_to, "ppo_iterations": len(r.ppo), "used": r.feedback,
             "pairs_total": r.reward_model.get("pairs_total"),
             "stage_seconds": r.stage_seconds} for r in reports]


def scenario_loop(cluster: Cluster, nodes: dict, workdir: Path) -> dict:
    from actors.coordinator import Coordinator

    seen: dict = {}

    class Observed(Coordinator):
        def evaluate(self):
            rate = super().evaluate()
            seen.setdefault("where", _where(self))
            seen["engines"] = self.engines.stats()
            seen["rollout_versions"] = self.trainers.rollout_versions()
            return rate

        def shutdown(self):
            seen["served_versions"] = self.engines.policy_versions()
            super().shutdown()

    store, schema = _schema_store()
    try:
        cfg = run_config(store, workdir / "loop")
        coordinator = Observed(cfg)
        reports = coordinator.run()
        return {"reports": _reports(reports), "recoveries": coordinator.recoveries, "nodes": nodes,
                "samples_per_iteration": cfg.ppo.samples_per_iteration, **seen,
                "latest": (workdir / "loop" / "bucket" / "LATEST").read_text().strip()}
    finally:
        _drop_schema(schema)


def scenario_node_loss(cluster: Cluster, nodes: dict, workdir: Path) -> dict:
    from actors.coordinator import Coordinator
    from services.feedback.store import open_store

    seen: dict = {"removed": None}

    class LosesANode(Coordinator):
        def ppo_iterations(self, r, rm_report=None):
            if r == 1 and seen["removed"] is None:
                seen["before"] = _where(self)
                replacement = cluster.add_node(**TRAINER_NODE)  # as an autoscaler or KubeRay would
                seen["replacement"] = replacement.node_id
                [lost] = [n for n in cluster.worker_nodes if n.node_id == nodes["trainer"]]
                cluster.remove_node(lost, allow_graceful=False)  # the trainers die with it, mid-round
                _wait_until_dead(lost.node_id)  # as the cluster sees it: its actors are marked dead too
                seen["removed"] = lost.node_id
                seen["removed_at"] = time.time()
            return super().ppo_iterations(r, rm_report)

        def evaluate(self):
            if seen["removed"] is not None:
                seen["after"] = _where(self)
                seen["engines"] = self.engines.stats()
            return super().evaluate()

    store, schema = _schema_store()
    try:
        cfg = run_config(store, workdir / "node_loss")
        coordinator = LosesANode(cfg)
        reports = coordinator.run()
        db = open_store(store)
        try:
            seqs = [s.seq for s in db.read_after(0, limit=100_000, projects=["cluster"])]
        finally:
            db.close()
        return {"reports": _reports(reports), "recoveries": coordinator.recoveries, "nodes": nodes, **seen,
                "stored_seqs": seqs, "latest": (workdir / "node_loss" / "bucket" / "LATEST").read_text().strip()}
    finally:
        _drop_schema(schema)


SCENARIOS = {"loop": scenario_loop, "node_loss": scenario_node_loss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head": 1}})
    nodes = {"head": cluster.head_node.node_id}
    results: dict = {}
    try:
        nodes["trainer"] = cluster.add_node(**TRAINER_NODE).node_id
        nodes["serving"] = cluster.add_node(**SERVING_NODE).node_id
        nodes["reward"] = cluster.add_node(**REWARD_NODE).node_id
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="hitl-cluster-test", log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
        for name in args.scenarios:
            started = time.perf_counter()
            try:
                results[name] = SCENARIOS[name](cluster, dict(nodes), Path(args.workdir))
            except Exception as err:  # noqa: BLE001 - reported to the test, which fails with it
                logging.exception("scenario %s", name)
                results[name] = {"error": f"{type(err).__name__}: {err}"}
            results[name]["seconds"] = round(time.perf_counter() - started, 1)
            Path(args.out).write_text(json.dumps(results, indent=2))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
