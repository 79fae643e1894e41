"""The generation server: an OpenAI-compatible Ray Serve ingress in front of the engine group.

    handle = start_generation_server(model_cfg, lora_cfg, gen_cfg)   # [1] engines + Serve app
    result = handle.generate.remote(GenerateRequest(prompt="Hi")).result()
    curl -s localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

[1] `engines.EngineGroup` holds the model copies (Ray actors, placed by the caller); Serve
    runs `ingress_replicas` copies of `GenerationServer`, which hold no model: each request
    goes to the engine with the fewest requests in flight from this replica, where it is
    batched with everything else that engine serves (labeling tasks, rollouts, evaluation).
[2] Weights reach the engines over the sync group (`rlhf/sync.py`), or, with
    `weight_sync: object_store`, through the `WeightBroadcaster` below: the trainer side
    packs the tensors into one buffer plus an index (`packing.py`) and publishes (version,
    packed); every engine long-polls it and swaps the tensors in under its model lock;
    `publish_weights` returns once every engine serves the new version.
[3] Atomicity: each engine holds one lock over each batch and each swap, so every answer is
    written by exactly the version it reports in `policy_version`.
"""

# no `from __future__ import annotations`: FastAPI reads the route signatures at runtime
import asyncio
import logging
import time
import uuid
from typing import Any

import ray
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from rlhf.models import LoraConfig, ModelConfig
from services.generation.config import GenerationConfig
from services.generation.engine import GenerateRequest, GenerateResult, StaleWeights
from services.generation.engines import EngineGroup
from services.generation.packing import PackedTensors, pack_tensors

log = logging.getLogger(__name__)

APP_NAME = "hitl-generation"
BROADCASTER_NAME = "hitl-weight-broadcaster"
INLINE_BYTES = 64 * 1024
"""Packed updates up to this size travel inside the broadcaster's calls (Ray inlines small
arguments and results) instead of through the object store: no store round trips."""


# -- engines started by the ingress itself (a server on its own) ----------------------


class EngineSpec(BaseModel):
    """What a generation server on its own starts (services/generation/app.py): its engines,
    and the served policy of a run's checkpoint to load into them."""

    model_config = ConfigDict(frozen=True)

    model: ModelConfig
    lora: LoraConfig
    generation: GenerationConfig
    checkpoints: str | None = None
    """A run's checkpoint storage (path or URI): the policy of its LATEST checkpoint is served."""

    def start(self) -> EngineGroup:
        """The engines (children of the calling actor), serving the checkpoint's policy."""
        from rlhf.storage import CheckpointStorage, read_policy
        from services.generation.engine import WeightUpdate

        update = None
        if self.checkpoints:  # read first: a missing checkpoint fails before any engine starts
            storage = CheckpointStorage(self.checkpoints)
            latest = (storage.read_text("LATEST") or "").strip()
            if not latest:
                raise FileNotFoundError(f"{storage.location('LATEST')}: no checkpoint to serve")
            version, tensors, adapters_only = read_policy(storage, f"{latest}/policy")
            update = WeightUpdate(version, tensors, adapters_only)
            log.info("serving policy version %d from %s", version, storage.location(latest))
        g = self.generation
        engines = EngineGroup.start(self.model, self.lora if self.lora.enabled else None, g, [replica_options(g)] * g.replicas)
        if update is not None:
            ray.get([e.update_weights.remote(update) for e in engines.engines])
        return engines


# -- weight broadcast ([2]) ---------------------------------------------------------


@ray.remote(num_cpus=0)
class WeightBroadcaster:
    """Holds the newest published weights; replicas long-poll it and report the version they serve."""

    def __init__(self) -> None:
        self._version = 0
        # [ObjectRef] (wrapped so Ray does not resolve it) or the PackedTensors themselves
        self._payload: "list[Any] | PackedTensors | None" = None
        self._adapters_only = False
        self._changed = asyncio.Event()
        self._applied: dict[str, int] = {}
        self._applied_changed = asyncio.Condition()

    async def publish(self, version: int, payload: Any, adapters_only: bool, replicas: int = 0, timeout_s: float = 300.0) -> int:
        """Make `version` the newest; with `replicas`, wait until that many serve it (returns how many do)."""
        if version <= self._version:
            raise StaleWeights(f"version {version} is not newer than {self._version}")
        self._version, self._payload, self._adapters_only = version, payload, adapters_only
        self._changed.set()
        self._changed = asyncio.Event()
        return await self.wait_applied(version, replicas, timeout_s) if replicas else 0

    async def wait_newer(self, version: int, timeout_s: float, replica: str | None = None) -> tuple[int, Any, bool]:
        """The newest (version, payload, adapters_only) once it is newer than `version`.

        With `replica`, first records that this replica serves `version`: the report of one
        update and the poll for the next are one call.
        """
        if replica is not None:
            await self.applied(replica, version)
        if self._version <= version:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        if self._version <= version:
            return version, None, False
        return self._version, self._payload, self._adapters_only

    async def applied(self, replica: str, version: int) -> None:
        self._applied[replica] = version
        async with self._applied_changed:
            self._applied_changed.notify_all()

    async def wait_applied(self, version: int, replicas: int, timeout_s: float) -> int:
        """Wait until `replicas` replicas serve `version` (or newer); returns how many do."""

        def count() -> int:
            return sum(1 for v in self._applied.values() if v >= version)

        if count() >= replicas:
            return count()
        async with self._applied_changed:
            try:
                await asyncio.wait_for(self._applied_changed.wait_for(lambda: count() >= replicas), timeout_s)
            except asyncio.TimeoutError:
                pass
        return count()

    async def versions(self) -> dict[str, int]:
        return dict(self._applied)

    async def forget(self, replica: str) -> None:
        self._applied.pop(replica, None)


def get_broadcaster(namespace: str | None = None):
    return WeightBroadcaster.options(name=BROADCASTER_NAME, namespace=namespace, get_if_exists=True).remote()


# -- OpenAI-compatible request bodies ------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None


class CompletionBody(_Body):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)


app = FastAPI(title="hitl generation server")


@serve.deployment(name="GenerationServer")
@serve.ingress(app)
class GenerationServer:
    """The ingress: routes requests to the engines; no model here."""

    def __init__(self, engines: "EngineGroup | EngineSpec", model_name: str):
        if isinstance(engines, EngineSpec):  # on its own (services/generation/app.py): its engines are its children
            engines = engines.start()
        self.engines = engines
        self.model_name = model_name
        self._inflight = [0] * len(engines.engines)
        self._replica = uuid.uuid4().hex[:8]

    # -- handle API ---------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Answer one request on the least busy engine (batched there with concurrent ones)."""
        return await self._on_engine(lambda e: e.generate.remote(request))

    async def generate_many(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Answer several requests as one batch on one engine (same version for all)."""
        return await self._on_engine(lambda e: e.generate_many.remote(requests))

    async def policy_version(self) -> int:
        """The version every engine serves (the oldest, while an update is on its way)."""
        return min(await asyncio.gather(*[e.policy_version.remote() for e in self.engines.engines]))

    async def stats(self) -> dict:
        """This ingress replica and every engine's counters."""
        engines = await asyncio.gather(*[e.stats.remote() for e in self.engines.engines])
        return {"replica": self._replica, "engines": list(engines)}

    async def node(self) -> str:
        """The Ray node this ingress replica runs on."""
        return ray.get_runtime_context().get_node_id()

    async def _on_engine(self, call):
        i = min(range(len(self._inflight)), key=self._inflight.__getitem__)
        self._inflight[i] += 1
        try:
            return await call(self.engines.engines[i])
        finally:
            self._inflight[i] -= 1

    # -- HTTP (OpenAI-compatible) ---------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, body: CompletionBody) -> dict:
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if not prompts:
            raise HTTPException(400, "prompt: must not be empty")
        requests = [GenerateRequest(prompt=p, max_new_tokens=body.max_tokens, temperature=body.temperature,
                                    top_p=body.top_p, n=body.n, seed=body.seed) for p in prompts]
        results = await self._answer(requests)
        choices = [
            {"index": i * body.n + j, "text": text, "finish_reason": reason, "logprobs": None}
            for i, r in enumerate(results)
            for j, (text, reason) in enumerate(zip(r.texts, r.finish_reasons))
        ]
        return self._envelope("text_completion", choices, results)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatBody) -> dict:
        request = GenerateRequest(messages=tuple((m.role, m.content) for m in body.messages), max_new_tokens=body.max_tokens,
                                  temperature=body.temperature, top_p=body.top_p, n=body.n, seed=body.seed)
        [result] = await self._answer([request])
        choices = [
            {"index": j, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            for j, (text, reason) in enumerate(zip(result.texts, result.finish_reasons))
        ]
        return self._envelope("chat.completion", choices, [result])

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "policy_version": await self.policy_version()}]}

    async def _answer(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        if len(requests) == 1:
            return [await self.generate(requests[0])]
        return await self.generate_many(requests)

    def _envelope(self, kind: str, choices: list[dict], results: list[GenerateResult]) -> dict:
        versions = {r.policy_version for r in results}
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(r.completion_tokens for r in results)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "policy_version": versions.pop(),  # one batch, one version
            "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }


# -- starting it and pushing weights ----------------------------------------------------


def replica_options(cfg: GenerationConfig) -> dict[str, Any]:
    """Ray actor options of one engine (the placement module asks for the same)."""
    options: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    if cfg.resources:
        options["resources"] = dict(cfg.resources)
    return options


def build_app(engines: "EngineGroup | EngineSpec", model_name: str, cfg: GenerationConfig):
    deployment = GenerationServer.options(
        num_replicas=cfg.ingress_replicas, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=cfg.max_ongoing_requests
    )
    return deployment.bind(engines, model_name)


_publish_handle: "tuple[tuple[str, str], Any] | None" = None  # ((job, node), broadcaster handle)


def _publisher(fresh: bool = False):
    """The broadcaster's handle, kept per driver and cluster: a named-actor lookup is a call to the GCS."""
    global _publish_handle
    context = ray.get_runtime_context()
    key = (context.get_job_id(), context.get_node_id())
    if fresh or _publish_handle is None or _publish_handle[0] != key:
        _publish_handle = (key, get_broadcaster())
    return _publish_handle[1]


def start_engines(model_cfg: ModelConfig, lora_cfg: LoraConfig | None, cfg: GenerationConfig,
                  options: list[dict[str, Any]] | None = None, simulated_gpus: bool = False) -> EngineGroup:
    """The engine group (`cfg.replicas` engines, each with Ray actor `options[i]`); with
    `weight_sync: object_store` they follow the weight broadcaster."""
    if cfg.weight_sync == "object_store":
        _publisher(fresh=True)  # creates the broadcaster (or finds it) before the engines look for it
    engines = EngineGroup.start(model_cfg, lora_cfg, cfg, options or [replica_options(cfg)] * cfg.replicas, simulated_gpus)
    if cfg.weight_sync == "object_store":
        engines.follow_broadcaster()
    return engines


def start_generation_server(model_cfg: ModelConfig, lora_cfg: LoraConfig | None, cfg: GenerationConfig, http: bool = True,
                            engines: EngineGroup | None = None):
    """Deploy the ingress on the connected Ray cluster (starting the engines unless given);
    returns its DeploymentHandle."""
    if http:
        serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port})
    engines = engines if engines is not None else start_engines(model_cfg, lora_cfg, cfg)
    model_name = str(model_cfg.path or model_cfg.source)
    return serve.run(build_app(engines, model_name, cfg), name=APP_NAME, route_prefix=cfg.route_prefix if http else None)


def publish_weights(version: int, tensors: dict, adapters_only: bool, replicas: int, timeout_s: float = 300.0) -> float:
    """Send new weights to every replica; returns the seconds until all of them serve `version`."""
    started = time.perf_counter()
    packed = pack_tensors(tensors)
    payload = packed if packed.nbytes + 64 * len(packed.index) <= INLINE_BYTES else [ray.put(packed)]
    try:
        done = ray.get(_publisher().publish.remote(version, payload, adapters_only, replicas, timeout_s))
    except ray.exceptions.ActorDiedError:  # a cached handle of a broadcaster since killed: look it up again
        done = ray.get(_publisher(fresh=True).publish.remote(version, payload, adapters_only, replicas, timeout_s))
    if done < replicas:
        raise TimeoutError(f"only {done} of {replicas} replicas took weights version {version} within {timeout_s:g}s")
    return time.perf_counter() - started
