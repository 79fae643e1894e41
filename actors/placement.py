"""Where every role runs, decided in one place.

The coordinator asks `Placement` for the options of each role; no other code
builds placement groups or resource requests. [1] the trainer group gets one
placement group with a bundle per worker (PACK/SPREAD from config); [2] the
reward model either joins that group (colocated) or gets its own resources;
[3] generation replicas take their resources from `generation` (Serve places
them); [4] the feedback service host and the coordinator are light actors.
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
                bundles.append(_bundle(self.cfg.reward_model))
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

    def reward_model_options(self) -> dict[str, Any]:
        """[2]"""
        if not self.cfg.colocate_reward_with_trainer:
            return actor_options(self.cfg.reward_model)
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {
            **actor_options(self.cfg.reward_model),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.trainer_group(), placement_group_bundle_index=self.cfg.trainer.workers
            ),
        }

    def generation_options(self, gen) -> dict[str, Any]:
        """[3] Ray actor options of each generation replica (Serve places the replicas)."""
        from services.generation.server import replica_options

        return replica_options(gen)

    def feedback_options(self) -> dict[str, Any]:
        """[4]"""
        return actor_options(self.cfg.feedback)

    def coordinator_options(self) -> dict[str, Any]:
        """[4]"""
        return actor_options(self.cfg.coordinator)

    def release(self) -> None:
        if self._trainer_pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._trainer_pg)
            self._trainer_pg = None
