"""The generation server on a real local Ray cluster with Ray Serve."""

import concurrent.futures as cf
import json
import urllib.request

import pytest
import torch

from rlhf.models import LoraConfig, ModelConfig
from services.generation.config import GenerationConfig, SamplingDefaults
from services.generation.engine import GenerateRequest, PolicyEngine

MODEL = ModelConfig(source="tiny")
LORA = LoraConfig(enabled=True)
PORT = 8791
PROMPT = GenerateRequest(prompt="The quick brown fox", temperature=0.0, max_new_tokens=8, n=2)


@pytest.fixture(scope="module")
def gen_server(ray_session):
    from ray import serve

    from services.generation.server import start_engines, start_generation_server

    serve.shutdown()  # an earlier test's Serve instance may hold other HTTP options
    cfg = GenerationConfig(replicas=2, num_cpus=0.5, http_port=PORT, max_batch_size=8, batch_wait_timeout_s=0.05,
                           weight_sync="object_store", sampling=SamplingDefaults(max_new_tokens=8, temperature=0.0))
    engines = start_engines(MODEL, LORA, cfg)
    handle = start_generation_server(MODEL, LORA, cfg, engines=engines)
    yield handle
    serve.delete("hitl-generation")
    engines.shutdown()


def post(path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def test_handle_answers_with_its_version(gen_server):
    result = gen_server.generate.remote(GenerateRequest(prompt="Hello", max_new_tokens=4)).result()
    assert len(result.texts) == 1 and result.completion_tokens <= 4
    assert result.policy_version == gen_server.policy_version.remote().result()


def test_openai_routes(gen_server):
    comp = post("/v1/completions", {"prompt": ["Hello", "World"], "max_tokens": 4, "n": 2})
    assert comp["object"] == "text_completion" and len(comp["choices"]) == 4
    assert [c["index"] for c in comp["choices"]] == [0, 1, 2, 3]
    assert "policy_version" in comp and comp["usage"]["completion_tokens"] <= 16
    chat = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 4})
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    with pytest.raises(urllib.error.HTTPError) as err:
        post("/v1/chat/completions", {"messages": []})
    assert err.value.code == 422


def engine_stats(handle) -> dict[str, dict]:
    """The counters of every engine, by engine name."""
    return {e["engine"]: e for e in handle.stats.remote().result()["engines"]}


def test_concurrent_requests_are_batched(gen_server):
    before = engine_stats(gen_server)
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: gen_server.generate.remote(GenerateRequest(prompt=f"Count {i}", max_new_tokens=4)).result(), range(16)))
    assert len(results) == 16 and all(r.texts for r in results)
    after = engine_stats(gen_server)
    served = sum(after[r]["requests"] - before[r]["requests"] for r in after)
    batches = sum(after[r]["batches"] - before[r]["batches"] for r in after)
    assert served == 16 and 1 <= batches < served  # several of the 16 requests shared a batch
    assert all(after[name]["requests"] > before[name]["requests"] for name in after)  # both engines served


def test_weight_updates_are_atomic_under_concurrent_requests(gen_server):
    """Every answer is wholly written by the version it names, across two swaps."""
    from services.generation.server import publish_weights

    reference = PolicyEngine(MODEL, LORA)
    expected = {}
    base = reference.weights()
    start = gen_server.policy_version.remote().result()
    expected[start] = reference.generate([PROMPT], SamplingDefaults())[0].texts
    updates = {}
    for step, scale in ((1, 1.5), (2, 3.0)):
        g = torch.Generator().manual_seed(step)
        updates[start + step] = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
        probe = PolicyEngine(MODEL, LORA)
        from services.generation.engine import WeightUpdate

        probe.load_weights(WeightUpdate(start + step, updates[start + step], adapters_only=True))
        expected[start + step] = probe.generate([PROMPT], SamplingDefaults())[0].texts
    assert len({tuple(v) for v in expected.values()}) == 3  # the versions answer differently

    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(lambda: gen_server.generate.remote(PROMPT).result()) for _ in range(24)]
        for version in sorted(updates):
            publish_weights(version, updates[version], adapters_only=True, replicas=2, timeout_s=120)
        futures += [pool.submit(lambda: gen_server.generate.remote(PROMPT).result()) for _ in range(8)]
        results = [f.result() for f in futures]
    for r in results:
        assert r.texts == expected[r.policy_version], f"version {r.policy_version} answered with another version's text"
    assert results[-1].policy_version == start + 2


def _perturbed_with_answer(seed, scale, version):
    from services.generation.engine import WeightUpdate

    probe = PolicyEngine(MODEL, LORA)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in probe.weights().items()}
    probe.load_weights(WeightUpdate(version, tensors, adapters_only=True))
    return tensors, probe.generate([PROMPT], SamplingDefaults())[0].texts


def _replica_versions(gen_server):
    return {name: e["policy_version"] for name, e in engine_stats(gen_server).items()}


def test_large_updates_travel_through_the_object_store(gen_server, monkeypatch):
    """Above INLINE_BYTES the packed tensors go by ObjectRef; both replicas apply them exactly."""
    import ray

    from services.generation import server

    puts = []
    real_put = ray.put
    monkeypatch.setattr(server, "INLINE_BYTES", 0)
    monkeypatch.setattr(server.ray, "put", lambda value, **kw: puts.append(value) or real_put(value, **kw))
    version = gen_server.policy_version.remote().result() + 1
    tensors, expected = _perturbed_with_answer(11, 2.0, version)
    server.publish_weights(version, tensors, adapters_only=True, replicas=2, timeout_s=120)
    assert len(puts) == 1 and isinstance(puts[0], server.PackedTensors)
    assert set(_replica_versions(gen_server).values()) == {version}
    for _ in range(4):
        result = gen_server.generate.remote(PROMPT).result()
        assert result.policy_version == version and result.texts == expected


def test_publish_follows_a_broadcaster_that_was_replaced(gen_server):
    """The publisher's cached handle and the replicas' handle both find the broadcaster's successor."""
    import ray

    from services.generation.server import get_broadcaster, publish_weights

    version = gen_server.policy_version.remote().result() + 1
    tensors, expected = _perturbed_with_answer(12, 2.0, version)
    ray.kill(get_broadcaster())
    publish_weights(version, tensors, adapters_only=True, replicas=2, timeout_s=120)
    assert set(_replica_versions(gen_server).values()) == {version}
    assert gen_server.generate.remote(PROMPT).result().texts == expected
