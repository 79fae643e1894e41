"""Where every role runs, decided in one place.

The coordinator asks `Placement` for the options of each role; no other code
builds placement groups or resource requests. [1] the trainer group gets one
placement group with a bundle per worker (PACK/SPREAD from config); [2] the
reward model either joins that group (colocated) or gets its own resources;
[3] generation engines take their resources from `generation` (the Serve ingress
in front of them holds no model); [4] the feedback service host and the coordinator are light actors;
the feedback service is pinned to the driver's node (where its port and secrets are: the head
pod, behind the Kubernetes Service) unless `cluster.feedback.resources` names a node label.

`check_store_reach` refuses a run that spans nodes on a node-local SQLite file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.config import ClusterConfig, RoleResources


def _bundle(r: RoleResources) -> dict[str, float]:
    bundle = {"CPU": float(r.num_cpus)}
    if r.num_gpus:
        bundle["GPU"] = float(r.num_gpus)
    bundle.update({k: float(v) for k, v in r.resources.items()})
    return {k: v for k, v in bundle.items() if v > 0}


def check_store_reach(store_url: str, nodes: int, embedded: bool) -> None:
    """A SQLite file lives on one node: with several nodes the coordinator and the feedback
    service may each open their own, and the loop would wait forever for feedback stored in
    the other. Raises ConfigError naming the field and what to use instead."""
    from rlhf.config import ConfigError, ConfigIssue

    if nodes > 1 and embedded and not store_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("run config", (ConfigIssue(
            "feedback.service.store",
            f"{store_url!r} is a file on one node, and this Ray cluster has {nodes} nodes: use a store every node "
            "reaches, PostgreSQL (postgresql://USER@HOST:5432/DB, password in PGPASSWORD)"),))


def check_cluster_gpus(cfg, cluster_gpus: float) -> None:
    """The GPUs the roles ask for must be there: Ray would otherwise keep them pending, with
    no error, until the run's first deadline. Raises ConfigError naming each role's field."""
    from rlhf.config import ConfigError, ConfigIssue

    c, g = cfg.cluster, cfg.generation
    asks = {
        "cluster.trainer.num_gpus": c.trainer.workers * c.trainer.num_gpus,
        "cluster.reward_model.num_gpus": c.reward_model.replicas * c.reward_model.num_gpus,
        "generation.num_gpus": g.replicas * g.num_gpus,
    }
    wanted = sum(asks.values())
    if wanted > cluster_gpus + 1e-9:
        detail = ", ".join(f"{field} x processes = {n:g}" for field, n in asks.items() if n)
        raise ConfigError("run config", (ConfigIssue(
            "cluster", f"the roles ask for {wanted:g} GPUs ({detail}) and this Ray cluster has {cluster_gpus:g}"),))


def actor_options(r: RoleResources) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}
    if r.resources:
        options["resources"] = dict(r.resources)
    return options


@dataclass
class Placement:
    cfg: ClusterConfig
    _trainer_pg: Any = field(default=None, init=False)

    def trainer_group(self, timeout_s: float = 300.0):
        """[1] The trainer group's placement group (created once, waited for)."""
        import ray
        from ray.util.placement_group import placement_group

        if self._trainer_pg is None:
            t = self.cfg.trainer
            bundles = [_bundle(t) for _ in range(t.workers)]
            if self.cfg.colocate_reward_with_trainer:
                bundles.extend(_bundle(self.cfg.reward_model) for _ in range(self.cfg.reward_model.replicas))
            pg = placement_group(bundles, strategy=t.strategy, name="hitl-trainer-group")
            ray.get(pg.ready(), timeout=timeout_s)
            self._trainer_pg = pg
        return self._trainer_pg

    def trainer_worker_options(self, rank: int) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        t = self.cfg.trainer
        return {
            **actor_options(t),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.trainer_group(), placement_group_bundle_index=rank, placement_group_capture_child_tasks=True
            ),
        }

    def reward_model_options(self) -> list[dict[str, Any]]:
        """[2] Ray actor options of each reward-model replica."""
        rm = self.cfg.reward_model
        if not self.cfg.colocate_reward_with_trainer:
            return [actor_options(rm) for _ in range(rm.replicas)]
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return [
            {**actor_options(rm), "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.trainer_group(), placement_group_bundle_index=self.cfg.trainer.workers + i)}
            for i in range(rm.replicas)
        ]

    def engine_options(self, gen) -> list[dict[str, Any]]:
        """[3] Ray actor options of each generation engine (`gen.replicas` of them)."""
        from services.generation.server import replica_options

        return [replica_options(gen) for _ in range(gen.replicas)]

    def feedback_options(self) -> dict[str, Any]:
        """[4] The driver's node unless `cluster.feedback.resources` picks one by label."""
        options = actor_options(self.cfg.feedback)
        if not self.cfg.feedback.resources:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        return options

    def coordinator_options(self) -> dict[str, Any]:
        """[4]"""
        return actor_options(self.cfg.coordinator)

    def release(self) -> None:
        if self._trainer_pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._trainer_pg)
            self._trainer_pg = None
