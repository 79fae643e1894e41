"""A small SFT step for the multi-process test; one JSON line with the report.

    DS_ACCELERATOR=cpu python tests/rlhf/sft/run_sft.py --zero 2 --accumulation 2
(under N processes, set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT per process)
"""

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402

from rlhf.ppo import DeepSpeedConfig, PPOConfig  # noqa: E402
from rlhf.sft import SFTConfig, run_sft  # noqa: E402
from tests.rlhf.ppo.helpers import make_trainer  # noqa: E402
from tests.rlhf.sft.demos import DEMOS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--accumulation", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ppo = PPOConfig(advantage_estimator="grpo", rollout_batch_size=4, group_size=2, max_new_tokens=4, minibatch_size=8, seed=0)
    ds = DeepSpeedConfig(zero_stage=args.zero, gradient_accumulation_steps=args.accumulation)
    trainer = make_trainer(ppo, ds)
    report = run_sft(trainer, DEMOS[:5], SFTConfig(enabled=True, lr=1e-2, epochs=2, batch_size=4))
    if trainer.dist.rank == 0:
        print("REPORT " + json.dumps(asdict(report)), flush=True)


if __name__ == "__main__":
    main()
