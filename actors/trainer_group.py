"""The PPO trainer group: N Ray actors, one torch.distributed group, a DeepSpeed engine each.

    group = PPOTrainerGroup(run_cfg, placement, reward_model_group, engines)   # [1] actors in a placement group
    metrics = group.step(prompts)                                     # [2] one PPO iteration on all ranks
    group.join_sync(host, port, world, backend, layout)               # [3] rank 0 joins the weight-sync group
    group.push_weights(version)                                       #     and pushes a version to the engines
    version_tensors = group.export_weights()                          #     (or hands the tensors to the caller)
    report = group.sft(demonstrations)                                # SFT on corrections, all ranks (rlhf.sft)
    group.save_checkpoint(storage, rel); group.load_checkpoint(storage, rel)   # [4] collective (rlhf/storage.py)

[1] Rank 0 reports its node IP and a free port; every worker then joins the
    process group through the usual env vars (MASTER_ADDR/PORT, RANK,
    WORLD_SIZE), gloo on CPU and NCCL on GPU, and builds its `PPOTrainer`.
[2] Every rank receives the same global prompt list and takes its share. Its rollouts
    come from the engine group (`services.generation.engines.EngineGroup.rollout`, every
    engine at once; trainers never generate under ZeRO), its rewards from the reward model.
[3] Adapters under LoRA, else the full state dict; under ZeRO-3 the parameters are gathered
    on every rank (a collective) and rank 0 sends them over the sync group (`rlhf/sync.py`)
    in the engines' layout, or returns them. Every call waits at most `call_timeout_s`.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import ray

from actors.config import TrainerSpec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote
class PPOWorker:
    def __init__(self, rank: int, world_size: int, spec: TrainerSpec):
        self.rank = rank
        self.world_size = world_size
        self.spec = spec
        self.trainer = None

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master_addr: str, master_port: int, reward_model, backend: str, engines=None) -> int:
        """Join the process group and build the trainer; collective across the group. With
        `engines`, rollouts are sampled there."""
        from rlhf.devices import role_device
        from rlhf.models import build_critic, load_policy
        from rlhf.ppo.trainer import PPOTrainer, init_distributed, zero3_loading
        from rlhf.threads import set_torch_threads

        cfg = self.spec
        gpu = role_device(len(ray.get_gpu_ids()), cfg.simulate_gpus).type == "cuda"
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
        )
        if not gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        set_torch_threads(cfg.group.torch_threads, ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
        init_distributed(None if backend == "auto" else backend)
        # ZeRO-3 over several ranks: every model loads partitioned, never whole on a rank; without
        # LoRA the reference is loaded apart (a deep copy of shards would be one rank's shard)
        self._zero3 = zero3_loading(cfg.deepspeed, cfg.ppo, self.world_size, "cuda" if gpu else "cpu")
        policy, tokenizer = load_policy(cfg.model, cfg.lora)
        reference = load_policy(cfg.model, None)[0] if self._zero3 is not None and not cfg.lora.enabled else None
        critic = build_critic(cfg.critic, policy, cfg.model, tokenizer) if cfg.ppo.uses_critic else None

        def reward_fn(prompts: list[str], responses: list[str]):
            return reward_model.score(prompts, responses)

        rollout_fn = engines.rollout if engines is not None else None
        self.trainer = PPOTrainer(policy, tokenizer, reward_fn, cfg.ppo, cfg.deepspeed, critic, rollout_fn=rollout_fn,
                                  reference=reference, template=cfg.template)
        self.sft_cfg = cfg.sft
        self.po_cfg = cfg.po
        self.sync = None
        return self.rank

    # -- the weight-sync group ------------------------------------------------------------

    def join_sync(self, host: str, port: int, world: int, backend: str, layout, timeout_s: float) -> None:
        """Rank 0 joins the sync group (as its rank 0); the other ranks have nothing to join."""
        from rlhf.sync import SyncGroup

        if self.rank == 0:
            self.sync = SyncGroup.join(host, port, 0, world, layout, backend, timeout_s, "hitl-sync", self.trainer.dist.device)

    def push_weights(self, version: int) -> float:
        """Send `version` to the engines over the sync group (collective over the trainer ranks:
        ZeRO-3 gathers); rank 0 returns the seconds until every engine applied it."""
        import time

        if self.rank == 0 and self.sync is None:
            raise RuntimeError("push_weights before join_sync")
        started = time.perf_counter()
        with self._update_tensors() as tensors:  # live parameters: packed straight into the sync buffers
            if self.rank == 0:
                self.sync.send(version, tensors)
        return time.perf_counter() - started if self.rank == 0 else 0.0

    def sft(self, demonstrations: list) -> dict[str, Any]:
        """The SFT step on this rank's engine (collective: every rank gets the same list)."""
        from dataclasses import asdict

        from rlhf.sft import run_sft

        return asdict(run_sft(self.trainer, demonstrations, self.sft_cfg))

    def preference_optimisation(self, examples: list) -> dict[str, Any]:
        """DPO, IPO or KTO (`po.loss`) on this rank's engine (collective: every rank gets the same list)."""
        from dataclasses import asdict

        from rlhf.po import run_preference_optimisation

        return asdict(run_preference_optimisation(self.trainer, examples, self.po_cfg))

    def step(self, prompts: list[str]) -> dict[str, float]:
        from services.telemetry import trainer_metrics, trainer_values

        metrics = self.trainer.step(prompts)
        grad_norm = self.trainer.policy_engine.get_global_grad_norm()
        trainer_metrics().record(trainer_values(metrics, None if grad_norm is None else float(grad_norm), self.world_size,
                                                self.trainer.cfg.samples_per_iteration), rank=self.rank)
        return metrics

    def export_weights(self) -> dict[str, Any] | None:
        """Adapters under LoRA, else the full state dict; gathered under ZeRO-3; rank 0 returns
        float32 copies of them."""
        import torch

        with self._update_tensors() as tensors:
            if self.rank != 0:
                return None
            copies = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype, copy=True) for k, v in tensors.items()}
        return {"tensors": copies, "adapters_only": self.trainer.is_peft}

    @contextlib.contextmanager
    def _update_tensors(self):
        """The tensors a weight update carries, by the names the engines use: the LoRA adapters
        (peft's state-dict names) or the full state dict. Live views of the parameters, valid
        inside the block; under ZeRO-3 with several ranks they are gathered for its duration
        (a collective: every rank enters the block)."""
        trainer = self.trainer
        policy = trainer.policy
        lora = trainer.is_peft
        gather = contextlib.nullcontext()
        if trainer.ds_cfg.zero_stage == 3 and trainer.dist.world_size > 1:
            import deepspeed

            params = [p for p in policy.parameters() if not lora or p.requires_grad]  # any PEFT kind's trained part
            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with gather:
            if lora:
                from peft import get_peft_model_state_dict

                yield dict(get_peft_model_state_dict(policy))
            else:
                yield dict(policy.state_dict())

    def save_policy(self, storage, rel: str, version: int) -> None:
        """The served policy's tensors (adapters or full weights) at `rel`, written by rank 0
        (collective: ZeRO-3 gathers); a generation server on its own loads them."""
        from rlhf.storage import write_policy

        with self._update_tensors() as tensors:
            if self.rank == 0:
                write_policy(storage, rel, version, tensors, self.trainer.is_peft)

    def save_checkpoint(self, storage, rel: str) -> None:
        """This rank's files into `rel` of the checkpoint storage (rlhf/storage.py)."""
        with storage.writing(rel) as local:
            self.trainer.save_checkpoint(local)

    def load_checkpoint(self, storage, rel: str) -> int:
        with storage.reading(rel) as local:
            self.trainer.load_checkpoint(local)
        return self.trainer.iteration

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def rollout_version(self) -> int | None:
        return self.trainer.last_rollout_version


class PPOTrainerGroup:
    """Drives the workers; every method is collective over the group."""

    def __init__(self, cfg, placement, reward_model, engines=None, setup_timeout_s: float = 600.0):
        self.cfg = cfg
        self.timeout_s = cfg.coordinator.call_timeout_s
        n = cfg.cluster.trainer.workers
        spec = cfg.trainer_spec()
        self.workers = [
            PPOWorker.options(**placement.trainer_worker_options(rank), name=None).remote(rank, n, spec) for rank in range(n)
        ]
        master_addr, master_port = ray.get(self.workers[0].address.remote(), timeout=setup_timeout_s)
        ray.get(
            [w.setup.remote(master_addr, master_port, reward_model, cfg.cluster.trainer.backend, engines) for w in self.workers],
            timeout=setup_timeout_s,
        )

    def _all(self, refs: list) -> list:
        return ray.get(refs, timeout=self.timeout_s)

    def step(self, prompts: list[str]) -> dict[str, float]:
        return self._all([w.step.remote(prompts) for w in self.workers])[0]

    def export_weights(self) -> dict[str, Any]:
        return self._all([w.export_weights.remote() for w in self.workers])[0]

    def sync_address(self) -> tuple[str, int]:
        """Where rank 0 will host the sync group's store (its node, a free port)."""
        return ray.get(self.workers[0].address.remote(), timeout=self.timeout_s)

    def join_sync(self, host: str, port: int, world: int, backend: str, layout, timeout_s: float = 300.0) -> list:
        """Start rank 0's join; the caller waits on these refs together with the engines'."""
        return [self.workers[0].join_sync.remote(host, port, world, backend, layout, timeout_s)]

    def push_weights(self, version: int) -> float:
        """`version` to every engine over the sync group; seconds until all of them serve it."""
        return self._all([w.push_weights.remote(version) for w in self.workers])[0]

    def sft(self, demonstrations: list) -> dict[str, Any]:
        """Supervised fine-tuning on demonstrations on every rank's engine; rank 0's report."""
        return self._all([w.sft.remote(demonstrations) for w in self.workers])[0]

    def preference_optimisation(self, examples: list) -> dict[str, Any]:
        """DPO, IPO or KTO on every rank's engine; rank 0's report."""
        return self._all([w.preference_optimisation.remote(examples) for w in self.workers])[0]

    def save_checkpoint(self, storage, rel: str) -> None:
        self._all([w.save_checkpoint.remote(storage, rel) for w in self.workers])

    def save_policy(self, storage, rel: str, version: int) -> None:
        self._all([w.save_policy.remote(storage, rel, version) for w in self.workers])

    def load_checkpoint(self, storage, rel: str) -> int:
        return self._all([w.load_checkpoint.remote(storage, rel) for w in self.workers])[0]

    def nodes(self) -> list[str]:
        return self._all([w.node.remote() for w in self.workers])

    def rollout_versions(self) -> list[int | None]:
        """The engine version that sampled each rank's last rollouts."""
        return self._all([w.rollout_version.remote() for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
