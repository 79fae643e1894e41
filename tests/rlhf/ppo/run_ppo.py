"""A small PPO run for the multi-process and resume tests; one JSON line of metrics per step.

    DS_ACCELERATOR=cpu python tests/rlhf/ppo/run_ppo.py --zero 2 --steps 3
(under N processes, set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT per process)
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402

from rlhf.ppo import DeepSpeedConfig, PPOConfig  # noqa: E402
from rlhf.models import ModelConfig  # noqa: E402
from tests.rlhf.ppo.helpers import TINY, make_trainer, prompts_for  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--estimator", default="gae")
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--start", type=int, default=0, help="first step (after --load)")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--critic", default="separate")
    ap.add_argument("--minibatch", type=int, default=16)
    ap.add_argument("--save-at", type=int, default=-1)
    ap.add_argument("--save-dir", default="")
    ap.add_argument("--load-dir", default="")
    ap.add_argument("--model-dir", default="", help="a saved model to load (source hf) instead of building the tiny one")
    args = ap.parse_args()

    torch.set_num_threads(1)
    ppo = PPOConfig(
        advantage_estimator=args.estimator, rollout_batch_size=8, group_size=2, max_new_tokens=6,
        minibatch_size=args.minibatch, ppo_epochs=2, policy_lr=3e-3, critic_lr=3e-3, top_k=20,
        kl_coef=0.05, kl_controller="adaptive", kl_target=1.0, kl_horizon=100, lr_warmup_steps=3, seed=0,
    )
    model = ModelConfig(source="hf", path=args.model_dir) if args.model_dir else TINY
    trainer = make_trainer(ppo, DeepSpeedConfig(zero_stage=args.zero), lora=args.lora, critic_kind=args.critic, model=model)
    if args.load_dir:
        trainer.load_checkpoint(args.load_dir)
    for step in range(args.start, args.steps):
        if step == args.save_at:
            trainer.save_checkpoint(args.save_dir)
        metrics = trainer.step(prompts_for(step, ppo.rollout_batch_size))
        if trainer.dist.rank == 0:
            print("METRICS " + json.dumps({"step": step, **metrics}), flush=True)


if __name__ == "__main__":
    main()
