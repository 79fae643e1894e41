"""Models of the RLHF core: the policy (tiny random, Hugging Face, GGUF or the embedded
SmolLM2-135M-Instruct), its tokenizer, LoRA adapters, the reference policy and the critic.

    from rlhf.models import ModelConfig, LoraConfig, load_policy, reference_model
    model, tokenizer = load_policy(ModelConfig(source="tiny"), LoraConfig(enabled=True))
    ref = reference_model(model)
"""

from rlhf.models.config import CriticConfig, LoraConfig, ModelConfig
from rlhf.models.critic import (
    Critic,
    PolicyValueOutput,
    SeparateCritic,
    ValueHead,
    ValueHeadCritic,
    build_critic,
    load_backbone,
)
from rlhf.models.gguf_cache import GgufSource, gguf_source, smollm2_gguf_path
from rlhf.models.loading import (
    LoadedPolicy,
    PolicyModel,
    apply_lora,
    backbone_of,
    checkpointing_active,
    build_tiny_model,
    load_causal_lm,
    load_policy,
    load_tokenizer,
    position_ids_from_mask,
    unwrap_peft,
)
from rlhf.models.reference import ReferenceModel, reference_model

__all__ = [
    "Critic",
    "CriticConfig",
    "GgufSource",
    "LoadedPolicy",
    "LoraConfig",
    "ModelConfig",
    "PolicyModel",
    "PolicyValueOutput",
    "ReferenceModel",
    "SeparateCritic",
    "ValueHead",
    "ValueHeadCritic",
    "apply_lora",
    "backbone_of",
    "build_critic",
    "build_tiny_model",
    "checkpointing_active",
    "gguf_source",
    "load_backbone",
    "load_causal_lm",
    "load_policy",
    "load_tokenizer",
    "position_ids_from_mask",
    "reference_model",
    "smollm2_gguf_path",
    "unwrap_peft",
]
