"""Supervised fine-tuning on human corrections (demonstrations), on the PPO trainer's own
DeepSpeed engine: loss on response tokens only.

    from rlhf.sft import Demonstration, SFTConfig, run_sft
    report = run_sft(ppo_trainer, [Demonstration(prompt, corrected_text)], SFTConfig(enabled=True))
    report.loss_before, report.loss_after
"""

from rlhf.sft.config import BestOfNConfig, SFTConfig
from rlhf.sft.data import Demonstration, SFTBatch, make_batch, prompt_ids, response_ids
from rlhf.sft.trainer import SFTReport, mean_nll, run_sft

__all__ = [
    "BestOfNConfig",
    "Demonstration",
    "SFTBatch",
    "SFTConfig",
    "SFTReport",
    "make_batch",
    "mean_nll",
    "prompt_ids",
    "response_ids",
    "run_sft",
]
