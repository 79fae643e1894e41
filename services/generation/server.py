"""The generation server: a Ray Serve deployment over the current policy.

    handle = start_generation_server(model_cfg, lora_cfg, gen_cfg)   # [1] Serve app
    result = handle.generate.remote(GenerateRequest(prompt="Hi")).result()
    curl -s localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

[1] Serve runs `replicas` copies of `GenerationServer`; concurrent requests to
    one replica are batched by `batching.Batcher` (up to `max_batch_size`; a batch
    stays open while requests keep arriving less than `batch_idle_s` apart, at most
    `batch_wait_timeout_s`).
[2] Weights: the trainer side packs the tensors into one buffer plus an index
    (`packing.py`) and publishes (version, packed) to the named
    `WeightBroadcaster` actor: an ObjectRef, or the packed tensors themselves
    when they are small. Every replica long-polls it, fetches the buffer and
    swaps the tensors in under its batch lock; its next poll reports the
    version it serves, and `publish_weights` returns once every replica serves
    the new version. Under LoRA only adapter tensors travel.
[3] Atomicity: one asyncio lock covers each batch and each swap, so every
    answer is written by exactly the version it reports in `policy_version`.
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
from rlhf.threads import set_torch_threads
from services.generation.batching import BatchPolicy, Batcher
from services.generation.config import GenerationConfig
from services.generation.engine import GenerateRequest, GenerateResult, PolicyEngine, StaleWeights, WeightUpdate
from services.generation.packing import PackedTensors, pack_tensors, unpack_tensors

log = logging.getLogger(__name__)

APP_NAME = "hitl-generation"
BROADCASTER_NAME = "hitl-weight-broadcaster"
INLINE_BYTES = 64 * 1024
"""Packed updates up to this size travel inside the broadcaster's calls (Ray inlines small
arguments and results) instead of through the object store: no store round trips."""
APPLY_ON_LOOP_BYTES = 4 * 2**20
"""Updates up to this size are copied in on the replica's event loop (a few ms at most)
instead of a worker thread: a thread hand-off costs more than the copy."""


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
    def __init__(self, model_cfg: dict, lora_cfg: dict | None, gen_cfg: dict, broadcaster_namespace: str | None = None):
        self.cfg = GenerationConfig(**gen_cfg)
        set_torch_threads(self.cfg.torch_threads, ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
        lora = LoraConfig(**lora_cfg) if lora_cfg else None
        self.engine = PolicyEngine(ModelConfig(**model_cfg), lora, self.cfg.max_prompt_tokens)
        self.model_name = model_cfg.get("path") or model_cfg.get("source", "policy")
        self._lock = asyncio.Lock()
        self._batcher = Batcher(self._run_batch, BatchPolicy(
            max_batch_size=self.cfg.max_batch_size, max_wait_s=self.cfg.batch_wait_timeout_s, idle_s=self.cfg.batch_idle_s))
        self._replica = uuid.uuid4().hex[:8]
        self._broadcaster_namespace = broadcaster_namespace
        self._broadcaster = get_broadcaster(broadcaster_namespace)
        self._poller = asyncio.get_running_loop().create_task(self._follow_weights())

    # -- handle API ---------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Answer one request (batched with concurrent ones)."""
        return await self._batcher.submit(request)

    async def generate_many(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Answer several requests as one batch (same version for all)."""
        async with self._lock:
            return await asyncio.to_thread(self.engine.generate, requests, self.cfg.sampling)

    async def policy_version(self) -> int:
        return self.engine.version

    async def node(self) -> str:
        """The Ray node this replica runs on."""
        return ray.get_runtime_context().get_node_id()

    async def stats(self) -> dict:
        """This replica's counters: requests and batches served (by the batcher), the seconds its
        batches stayed open in all, and its version."""
        s = self._batcher.stats
        return {"replica": self._replica, "requests": s.requests, "batches": s.batches, "batch_wait_s": s.wait_s, "closed": dict(s.closed),
                "policy_version": self.engine.version}

    async def update_weights(self, update: WeightUpdate) -> int:
        """Swap weights on this replica (tests and single-replica use; clusters use the broadcaster)."""
        async with self._lock:
            return await asyncio.to_thread(self.engine.load_weights, update)

    async def _run_batch(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        async with self._lock:  # [3]
            return await asyncio.to_thread(self.engine.generate, requests, self.cfg.sampling)

    async def _follow_weights(self) -> None:
        while True:
            try:
                # reports the version served and waits for a newer one, in one call
                version, payload, adapters_only = await self._broadcaster.wait_newer.remote(self.engine.version, 30.0, self._replica)
                if payload is None:
                    continue
                packed = await payload[0] if isinstance(payload, list) else payload
                async with self._lock:
                    if packed.nbytes <= APPLY_ON_LOOP_BYTES:
                        self._apply(version, packed, adapters_only)
                    else:
                        await asyncio.to_thread(self._apply, version, packed, adapters_only)
                del payload, packed  # let go of the object-store buffer now, not at the next update
            except asyncio.CancelledError:
                raise
            except StaleWeights:
                continue
            except Exception as e:  # noqa: BLE001 - keep serving the old version; try again
                log.exception("weight update failed on replica %s", self._replica)
                await asyncio.sleep(1.0)
                if isinstance(e, ray.exceptions.RayActorError):  # the broadcaster was killed: follow its successor
                    self._broadcaster = get_broadcaster(self._broadcaster_namespace)

    def _apply(self, version: int, packed: PackedTensors, adapters_only: bool) -> int:
        """Unpack (checks the index against the buffer) and load (checks names and shapes), then copy."""
        return self.engine.load_weights(WeightUpdate(version, unpack_tensors(packed), adapters_only))

    def __del__(self) -> None:
        for task in (getattr(self, "_poller", None), getattr(self, "_batcher", None)):
            if task is not None:
                task.cancel() if isinstance(task, asyncio.Task) else task.close()

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
        return {"object": "list", "data": [{"id": str(self.model_name), "object": "model", "policy_version": self.engine.version}]}

    async def _answer(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        if len(requests) == 1:
            return [await self._batcher.submit(requests[0])]
        return await self.generate_many(requests)

    def _envelope(self, kind: str, choices: list[dict], results: list[GenerateResult]) -> dict:
        versions = {r.policy_version for r in results}
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(r.completion_tokens for r in results)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": str(self.model_name),
            "policy_version": versions.pop(),  # one batch, one version
            "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }


# -- starting it and pushing weights ----------------------------------------------------


def replica_options(cfg: GenerationConfig) -> dict[str, Any]:
    """Ray actor options of one replica (the placement module asks for the same)."""
    options: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    if cfg.resources:
        options["resources"] = dict(cfg.resources)
    return options


def build_app(model_cfg: ModelConfig, lora_cfg: LoraConfig | None, cfg: GenerationConfig, broadcaster_namespace: str | None = None):
    options = replica_options(cfg)
    deployment = GenerationServer.options(
        num_replicas=cfg.replicas, ray_actor_options=options, max_ongoing_requests=cfg.max_ongoing_requests
    )
    return deployment.bind(
        model_cfg.model_dump(mode="json"),
        lora_cfg.model_dump(mode="json") if lora_cfg else None,
        cfg.model_dump(mode="json"),
        broadcaster_namespace,
    )


_publish_handle: "tuple[tuple[str, str], Any] | None" = None  # ((job, node), broadcaster handle)


def _publisher(fresh: bool = False):
    """The broadcaster's handle, kept per driver and cluster: a named-actor lookup is a call to the GCS."""
    global _publish_handle
    context = ray.get_runtime_context()
    key = (context.get_job_id(), context.get_node_id())
    if fresh or _publish_handle is None or _publish_handle[0] != key:
        _publish_handle = (key, get_broadcaster())
    return _publish_handle[1]


def start_generation_server(model_cfg: ModelConfig, lora_cfg: LoraConfig | None, cfg: GenerationConfig, http: bool = True):
    """Deploy the server on the connected Ray cluster; returns its DeploymentHandle."""
    if http:
        serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port})
    _publisher(fresh=True)  # creates the broadcaster (or finds it) before the replicas look for it
    # replicas look the broadcaster up in this driver's namespace: Serve may have been started
    # by another job (an earlier run on a long-lived cluster), whose namespace is not ours
    namespace = ray.get_runtime_context().namespace
    return serve.run(build_app(model_cfg, lora_cfg, cfg, broadcaster_namespace=namespace), name=APP_NAME,
                     route_prefix=cfg.route_prefix if http else None)


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
