"""Shared pieces of the PPO tests: a rule-based reward, tiny models, a trainer factory and a
subprocess launcher for multi-process runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from rlhf.models import CriticConfig, LoraConfig, ModelConfig, build_critic, load_policy
from rlhf.ppo import DeepSpeedConfig, PPOConfig

REPO = Path(__file__).resolve().parents[3]

PROMPTS = [
    "Tell me a story.",
    "What is the capital of France?",
    "Write a poem about the sea.",
    "How do plants grow?",
    "Explain gravity.",
    "Name three colours.",
    "Why is the sky blue?",
    "Count to five.",
]

TINY = ModelConfig(source="tiny", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, seed=0)


def letter_reward(letter: str = "e"):
    """Rule: the share of the response's characters that are ``letter`` (case-insensitive),
    scaled by 10. It rewards emitting tokens made of that letter, the more the better."""

    def reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
        out = [10.0 * r.lower().count(letter) / max(1, len(r)) for r in responses]
        return torch.tensor(out, dtype=torch.float32)

    return reward


def make_trainer(ppo: PPOConfig, ds: DeepSpeedConfig | None = None, lora: bool = False,
                 critic_kind: str = "separate", model: ModelConfig = TINY):
    from rlhf.ppo.trainer import PPOTrainer, init_distributed, zero3_loading

    ds = ds or DeepSpeedConfig()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    zero3 = reference = None
    if ds.zero_stage == 3 and world > 1:  # load partitioned, as the trainer group does
        init_distributed()
        zero3 = zero3_loading(ds, ppo, world, "cpu")
    policy, tokenizer = load_policy(model, LoraConfig(enabled=lora, rank=4, alpha=8.0))
    if zero3 is not None:  # every base weight is a shard here: no rank held the whole model
        base = [p for n, p in policy.named_parameters() if "lora_" not in n]
        assert all(hasattr(p, "ds_id") for p in base), "ZeRO-3 loading left a parameter whole"
        assert sum(p.ds_tensor.numel() for p in base) < sum(p.ds_numel for p in base)
        if not lora:
            reference, _ = load_policy(model, None)
    critic = None
    if ppo.uses_critic:
        critic = build_critic(CriticConfig(kind=critic_kind), policy, model, tokenizer)
    trainer = PPOTrainer(policy, tokenizer, letter_reward(), ppo, ds, critic, reference=reference)
    trainer.partitioned_loading = zero3  # kept alive with the models
    return trainer


def prompts_for(iteration: int, n: int) -> list[str]:
    return [PROMPTS[(iteration * n + i) % len(PROMPTS)] for i in range(n)]


def launch(script: str, args: list[str], world_size: int, port: int, timeout: int = 400) -> list[str]:
    """Run ``python script args`` as ``world_size`` gloo processes; stdout of each rank."""
    env_base = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = []
    for rank in range(world_size):
        env = {**env_base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, script, *args], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        if p.returncode != 0:
            for q in procs:
                q.kill()
            raise RuntimeError(f"rank exited with {p.returncode}:\n{err[-4000:]}")
        outs.append(out)
    return outs


def metric_lines(stdout: str) -> list[dict]:
    """The per-step metrics that run_ppo.py printed."""
    import json

    return [json.loads(line[len("METRICS "):]) for line in stdout.splitlines() if line.startswith("METRICS ")]
