"""A run's checkpointed reward model, loaded in this process (no Ray).

The loop's reward-model actor saves into `checkpoints/round-NNNN/reward_model/` the tensors
training changed (`trained.safetensors`: adapters or weights, the head, the centring
offset); loading builds a fresh reward model from the run's `reward` and `model` sections and
copies them in, as the actor's `load` does.
"""

from __future__ import annotations

from pathlib import Path

from rlhf.models import ModelConfig
from rlhf.reward.config import RewardConfig
from rlhf.storage import CheckpointStorage
from rlhf.templates import DEFAULT_TEMPLATE, PromptTemplate

TRAINED = "trained.safetensors"


def load_checkpointed_reward_model(storage: CheckpointStorage, rel: str, reward: RewardConfig, policy_model: ModelConfig,
                                   template: PromptTemplate = DEFAULT_TEMPLATE):
    """The reward model of `rel` (e.g. `round-0004/reward_model`), in eval mode, rendering its
    inputs with the run's `template`."""
    from safetensors.torch import load_file

    from rlhf.reward.model import build_reward_model

    with storage.reading(rel) as local:
        path = Path(local) / TRAINED
        if not path.exists():
            raise FileNotFoundError(f"{storage.location(rel)}: no {TRAINED} (not a reward-model checkpoint)")
        tensors = load_file(str(path))
    model = build_reward_model(reward, policy_model, template)
    unknown = set(tensors) - set(model.state_dict())
    if unknown:
        raise ValueError(f"{storage.location(rel)}: tensors the reward model does not have: {sorted(unknown)[:3]}")
    model.load_state_dict(tensors, strict=False)
    model.eval()
    return model
