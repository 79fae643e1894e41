"""The policy engine without Ray: batching, chat template, versioned weight swaps."""

import pytest
import torch

from rlhf.models import LoraConfig, ModelConfig
from services.generation.config import SamplingDefaults
from services.generation.engine import GenerateRequest, PolicyEngine, StaleWeights, WeightUpdate

GREEDY = SamplingDefaults(max_new_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def lora_engine():
    return PolicyEngine(ModelConfig(source="tiny"), LoraConfig(enabled=True))


def perturbed(weights, scale):
    g = torch.Generator().manual_seed(7)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in weights.items()}


def test_batch_answers_match_one_by_one(lora_engine):
    prompts = ["Hello", "Tell me a joke about cats", "2+2="]
    alone = [lora_engine.generate([GenerateRequest(prompt=p)], GREEDY)[0].texts for p in prompts]
    together = [r.texts for r in lora_engine.generate([GenerateRequest(prompt=p) for p in prompts], GREEDY)]
    assert together == alone  # left padding does not change greedy answers


def test_n_answers_and_usage(lora_engine):
    [r] = lora_engine.generate([GenerateRequest(prompt="Hi", n=3, temperature=1.0, seed=3)], GREEDY)
    assert len(r.texts) == 3 and len(r.finish_reasons) == 3
    assert r.completion_tokens <= 18 and r.prompt_tokens >= 1
    assert r.policy_version == lora_engine.version


def test_chat_requests_use_the_template(lora_engine):
    text = lora_engine.prompt_text(GenerateRequest(messages=(("user", "What is 2+2?"),)))
    assert "What is 2+2?" in text and text != "What is 2+2?"
    assert text.rstrip().endswith("assistant")  # SmolLM2's template opens the answer


def test_lora_update_changes_answers_and_version():
    engine = PolicyEngine(ModelConfig(source="tiny"), LoraConfig(enabled=True))
    before = engine.generate([GenerateRequest(prompt="Hello there")], GREEDY)[0]
    update = WeightUpdate(1, perturbed(engine.weights(), 2.0), adapters_only=True)
    assert all("lora_" in k for k in update.tensors)  # only adapters travel
    assert engine.load_weights(update) == 1
    after = engine.generate([GenerateRequest(prompt="Hello there")], GREEDY)[0]
    assert after.policy_version == 1 and after.texts != before.texts
    with pytest.raises(StaleWeights):
        engine.load_weights(WeightUpdate(1, update.tensors, adapters_only=True))
    with pytest.raises(ValueError, match="adapter-only"):
        engine.load_weights(WeightUpdate(2, update.tensors, adapters_only=False))


def test_full_update():
    engine = PolicyEngine(ModelConfig(source="tiny"), None)
    weights = engine.weights()
    assert not any("lora_" in k for k in weights)
    engine.load_weights(WeightUpdate(5, perturbed(weights, 0.5), adapters_only=False))
    assert engine.version == 5
    assert not torch.equal(engine.weights()["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])


def test_requests_need_exactly_one_input():
    with pytest.raises(ValueError):
        GenerateRequest()
    with pytest.raises(ValueError):
        GenerateRequest(prompt="a", messages=(("user", "b"),))
    with pytest.raises(ValueError, match="n:"):
        GenerateRequest(prompt="a", n=0)
