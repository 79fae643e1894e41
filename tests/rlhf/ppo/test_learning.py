"""Learning: a tiny random model and a rule reward (the share of the letter 'e' in the
response); PPO (GAE), GRPO and RLOO each raise the mean reward clearly within a few dozen
iterations. Seeded: the same run gives the same numbers.

The tiny model's vocabulary is SmolLM2's 49k tokens and its random logits are near uniform,
so sampling uses top_k=20: the policy then sees each candidate often enough to learn within
the test's budget. (Log-probs are of the full distribution, as in the trainer.)
"""

import pytest

from rlhf.ppo import PPOConfig
from tests.rlhf.ppo.helpers import make_trainer, prompts_for


def _config(estimator: str, **kw) -> PPOConfig:
    group = 2 if estimator == "gae" else 4
    base = dict(
        advantage_estimator=estimator, rollout_batch_size=8, group_size=group, max_new_tokens=8,
        minibatch_size=8 * group, ppo_epochs=2, policy_lr=1e-2, critic_lr=3e-3, top_k=20,
        kl_coef=0.0, lam=1.0, seed=0,
    )
    return PPOConfig(**{**base, **kw})


def _rewards(trainer, steps: int) -> list[float]:
    return [trainer.step(prompts_for(i, trainer.cfg.rollout_batch_size))["reward"] for i in range(steps)]


@pytest.mark.slow
@pytest.mark.parametrize("estimator,steps", [("gae", 20), ("grpo", 15), ("rloo", 15)])
def test_mean_reward_rises(estimator, steps):
    trainer = make_trainer(_config(estimator))
    rewards = _rewards(trainer, steps)
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > 1.5 * first, rewards


@pytest.mark.slow
def test_training_is_deterministic():
    a = make_trainer(_config("grpo", kl_coef=0.05))
    b = make_trainer(_config("grpo", kl_coef=0.05))
    for i in range(2):
        ma, mb = a.step(prompts_for(i, 8)), b.step(prompts_for(i, 8))
        drop = [k for k in ma if k.startswith("time_")]  # wall-clock timings
        for k in drop:
            ma.pop(k), mb.pop(k)
        assert ma == mb


def test_value_head_critic_trains_in_the_policy_engine():
    trainer = make_trainer(_config("gae", value_loss_coef=1.0), critic_kind="value_head", lora=True)
    assert trainer.critic_engine is None and trainer.critic_is_head
    head = trainer.policy_engine.module.head.linear.weight
    before = head.detach().clone()
    metrics = trainer.step(prompts_for(0, 8))
    assert metrics["value_loss"] > 0 and "explained_variance" in metrics
    assert not head.detach().equal(before)  # the head got gradients from the joint loss
