"""The PPO trainer group: N Ray actors, one torch.distributed group, a DeepSpeed engine each.

    group = PPOTrainerGroup(run_cfg, placement, reward_model_actor)   # [1] actors in a placement group
    metrics = group.step(prompts)                                     # [2] one PPO iteration on all ranks
    version_tensors = group.export_weights()                          # [3] adapters (LoRA) or full state dict
    report = group.sft(demonstrations)                                # SFT on corrections, all ranks (rlhf.sft)
    group.save_checkpoint(path); group.load_checkpoint(path)          # [4] collective

[1] Rank 0 reports its node IP and a free port; every worker then joins the
    process group through the usual env vars (MASTER_ADDR/PORT, RANK,
    WORLD_SIZE), gloo on CPU and NCCL on GPU, and builds its `PPOTrainer`.
[2] Every rank receives the same global prompt list and takes its share.
    Rewards come from the reward-model actor (scored in batches).
[3] Under ZeRO-3 the parameters are gathered on every rank (a collective),
    rank 0 returns them.
"""

from __future__ import annotations

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

    def setup(self, master_addr: str, master_port: int, reward_actor, backend: str) -> int:
        """Join the process group and build the trainer; collective across the group."""

        from rlhf.models import build_critic, load_policy
        from rlhf.ppo.trainer import PPOTrainer, init_distributed
        from rlhf.threads import set_torch_threads

        cfg = self.spec
        gpu = bool(ray.get_gpu_ids())
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
        policy, tokenizer = load_policy(cfg.model, cfg.lora)
        critic = build_critic(cfg.critic, policy, cfg.model, tokenizer) if cfg.ppo.uses_critic else None

        def reward_fn(prompts: list[str], responses: list[str]):
            return ray.get(reward_actor.score.remote(prompts, responses))

        self.trainer = PPOTrainer(policy, tokenizer, reward_fn, cfg.ppo, cfg.deepspeed, critic)
        self.sft_cfg = cfg.sft
        return self.rank

    def sft(self, demonstrations: list) -> dict[str, Any]:
        """The SFT step on this rank's engine (collective: every rank gets the same list)."""
        from dataclasses import asdict

        from rlhf.sft import run_sft

        return asdict(run_sft(self.trainer, demonstrations, self.sft_cfg))

    def step(self, prompts: list[str]) -> dict[str, float]:
        return self.trainer.step(prompts)

    def export_weights(self) -> dict[str, Any] | None:
        """Adapters under LoRA, else the full state dict; gathered under ZeRO-3; rank 0 returns them."""
        import torch

        trainer = self.trainer
        policy = trainer.policy
        lora = trainer.is_peft
        if lora:
            names = {n for n, _ in policy.named_parameters() if "lora_" in n}
        else:
            names = {n for n, _ in policy.named_parameters()}
        params = [p for n, p in policy.named_parameters() if n in names]
        if trainer.ds_cfg.zero_stage == 3 and trainer.dist.world_size > 1:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                tensors = self._collect(policy, lora)
        else:
            tensors = self._collect(policy, lora)
        if self.rank != 0:
            return None
        return {"tensors": {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}, "adapters_only": lora}

    @staticmethod
    def _collect(policy, lora: bool) -> dict:
        if lora:
            from peft import get_peft_model_state_dict

            return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(policy).items()}
        return {k: v.detach().cpu().clone() for k, v in policy.state_dict().items()}

    def save_checkpoint(self, directory: str) -> None:
        self.trainer.save_checkpoint(directory)

    def load_checkpoint(self, directory: str) -> int:
        self.trainer.load_checkpoint(directory)
        return self.trainer.iteration

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


class PPOTrainerGroup:
    """Drives the workers; every method is collective over the group."""

    def __init__(self, cfg, placement, reward_actor, setup_timeout_s: float = 600.0):
        self.cfg = cfg
        n = cfg.cluster.trainer.workers
        spec = cfg.trainer_spec()
        self.workers = [
            PPOWorker.options(**placement.trainer_worker_options(rank), name=None).remote(rank, n, spec) for rank in range(n)
        ]
        master_addr, master_port = ray.get(self.workers[0].address.remote(), timeout=setup_timeout_s)
        ray.get(
            [w.setup.remote(master_addr, master_port, reward_actor, cfg.cluster.trainer.backend) for w in self.workers],
            timeout=setup_timeout_s,
        )

    def step(self, prompts: list[str]) -> dict[str, float]:
        return ray.get([w.step.remote(prompts) for w in self.workers])[0]

    def export_weights(self) -> dict[str, Any]:
        return ray.get([w.export_weights.remote() for w in self.workers])[0]

    def sft(self, demonstrations: list) -> dict[str, Any]:
        """Supervised fine-tuning on demonstrations on every rank's engine; rank 0's report."""
        return ray.get([w.sft.remote(demonstrations) for w in self.workers])[0]

    def save_checkpoint(self, directory: str) -> None:
        ray.get([w.save_checkpoint.remote(directory) for w in self.workers])

    def load_checkpoint(self, directory: str) -> int:
        return ray.get([w.load_checkpoint.remote(directory) for w in self.workers])[0]

    def nodes(self) -> list[str]:
        return ray.get([w.node.remote() for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
