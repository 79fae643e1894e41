"""The Bradley–Terry reward model: a scalar head on a causal LM's backbone, trained on
pairwise human preferences (ties, both-bad, strength, annotator weights, rankings), scoring
(prompt, response) batches for PPO.

    from rlhf.reward import build_reward_model, train_reward_model
    model = build_reward_model(cfg.reward, cfg.model)
    report = train_reward_model(model, records)
    scores = model.score(prompts, responses)          # (B,)
"""

from rlhf.reward.config import RewardConfig
from rlhf.reward.data import (
    PairSplit,
    TokenBatch,
    TrainingPair,
    chat_text,
    encode,
    split_by_prompt,
    training_pairs,
)
from rlhf.reward.loss import bradley_terry_loss, pair_accuracy_counts
from rlhf.reward.model import RewardModel, build_reward_model, last_token_index, load_reward_model
from rlhf.reward.trainer import (
    PairMetrics,
    RewardTrainingReport,
    evaluate_pairs,
    evaluate_preferences,
    fit,
    train_reward_model,
)

__all__ = [
    "PairMetrics",
    "PairSplit",
    "RewardConfig",
    "RewardModel",
    "RewardTrainingReport",
    "TokenBatch",
    "TrainingPair",
    "bradley_terry_loss",
    "build_reward_model",
    "chat_text",
    "encode",
    "evaluate_pairs",
    "evaluate_preferences",
    "fit",
    "last_token_index",
    "load_reward_model",
    "pair_accuracy_counts",
    "split_by_prompt",
    "train_reward_model",
]
