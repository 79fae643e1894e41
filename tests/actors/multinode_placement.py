"""Run by test_placement.py in its own process: a 4-node Ray cluster made with
ray.cluster_utils.Cluster (declared GPUs and node labels), where the roles must land
where the run config says."""

import json
import sys
from collections import Counter

import ray
from ray.cluster_utils import Cluster

from actors.config import RunConfig
from actors.placement import Placement


@ray.remote(num_cpus=0)
class Probe:
    def node(self):
        return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    trainer_nodes = [cluster.add_node(num_cpus=4, num_gpus=2, resources={"trainer": 2}) for _ in range(2)]
    serving = cluster.add_node(num_cpus=4, num_gpus=2, resources={"serving": 2})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="placement-test")
    cfg = RunConfig.model_validate({
        "model": {"source": "tiny"},
        "ppo": {"rollout_batch_size": 4, "minibatch_size": 4},
        "cluster": {
            "trainer": {"workers": 4, "num_cpus": 1, "num_gpus": 1, "resources": {"trainer": 1}, "strategy": "SPREAD"},
            "reward_model": {"num_cpus": 1, "num_gpus": 1, "resources": {"serving": 1}},
        },
        "generation": {"replicas": 1, "num_cpus": 1, "num_gpus": 1, "resources": {"serving": 1}},
    })
    placement = Placement(cfg.cluster)
    trainers = [Probe.options(**placement.trainer_worker_options(r)).remote() for r in range(4)]
    reward = Probe.options(**placement.reward_model_options()[0]).remote()
    trainer_at = ray.get([t.node.remote() for t in trainers])
    reward_at = ray.get(reward.node.remote())

    from services.generation.server import start_engines

    engines = start_engines(cfg.model, cfg.lora, cfg.generation, placement.engine_options(cfg.generation), simulated_gpus=True)
    [generation_at] = engines.nodes()
    out = {
        "trainer_nodes": sorted(n.node_id for n in trainer_nodes),
        "serving_node": serving.node_id,
        "trainer_at": [n for n, _ in trainer_at],
        "trainer_gpus": [g for _, g in trainer_at],
        "reward_at": reward_at[0],
        "reward_gpus": reward_at[1],
        "generation_at": generation_at,
        "per_trainer_node": dict(Counter(n for n, _ in trainer_at)),
    }
    engines.shutdown()
    placement.release()
    ray.shutdown()
    cluster.shutdown()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
