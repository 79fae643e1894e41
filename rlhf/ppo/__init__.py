"""PPO-family RLHF on DeepSpeed: config, pure advantage/loss math, experience batches,
rollouts and the trainer. Heavy modules (DeepSpeed, transformers) are imported where used."""

from rlhf.ppo.config import DeepSpeedConfig, PPOConfig, deepspeed_config_dict

__all__ = ["DeepSpeedConfig", "PPOConfig", "deepspeed_config_dict"]
