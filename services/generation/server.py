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
import json
import logging
import time
import uuid
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from rlhf.models import LoraConfig, ModelConfig
from rlhf.templates import PromptTemplate
from services.generation.config import GenerationConfig
from services.generation.engine import GenerateRequest, GenerateResult, StaleWeights
from services.generation.engines import EngineGroup, StreamDelta
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
    template: PromptTemplate = PromptTemplate()
    """The run's prompt template: chat requests are rendered as the run rendered its prompts."""

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
        engines = EngineGroup.start(self.model, self.lora if self.lora.enabled else None, g, [replica_options(g)] * g.replicas,
                                    template=self.template)
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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None



class CompletionBody(_Body):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)


app = FastAPI(title="hitl generation server")


class ApiError(Exception):
    """A refused request, answered in the OpenAI error shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "authentication_error" if self.status == 401 else "invalid_request_error"
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}},
                            status_code=self.status, headers=headers)


@app.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return err.response()


@app.exception_handler(RecursionError)
async def _too_deep(request: Request, err: RecursionError) -> JSONResponse:
    return ApiError(400, "the request body nests too deeply", code="invalid_body").response()


class HttpGuard:
    """What every HTTP request passes before its body is read: the API key (when the server has
    keys) and the declared body size."""

    def __init__(self, cfg: GenerationConfig):
        from services.exposure import read_api_keys

        self.keys = read_api_keys(cfg.api_keys_file, "generation.api_keys_file") if cfg.api_keys_file else ()
        self.max_body_bytes = cfg.max_body_bytes

    def check(self, request: Request) -> None:
        from services.exposure import key_matches

        if self.keys:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not key_matches(token.strip(), self.keys):
                raise ApiError(401, "a valid API key is required (Authorization: Bearer <key>)", code="invalid_api_key")
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None:
                raise ApiError(411, "the request needs a Content-Length header", code="length_required")
            if not length.isdigit() or int(length) > self.max_body_bytes:
                raise ApiError(413, f"the request body is over {self.max_body_bytes} bytes", code="body_too_large")


@app.middleware("http")
async def _guard(request: Request, call_next):
    guard: HttpGuard | None = getattr(request.app.state, "guard", None)
    if guard is None:  # the replica has not finished starting
        return ApiError(503, "the server is starting", code="starting").response()
    try:
        guard.check(request)
    except ApiError as err:
        return err.response()
    return await call_next(request)


@serve.deployment(name="GenerationServer")
@serve.ingress(app)
class GenerationServer:
    """The ingress: routes requests to the engines; no model here."""

    def __init__(self, engines: "EngineGroup | EngineSpec", model_name: str, cfg: GenerationConfig | None = None):
        cfg = cfg or GenerationConfig()
        guard = HttpGuard(cfg)  # a bad keys file fails the replica before any engine starts
        if isinstance(engines, EngineSpec):  # on its own (services/generation/app.py): its engines are its children
            engines = engines.start()
        self.engines = engines
        self.model_name = model_name
        self.cfg = cfg
        app.state.guard = guard
        self._inflight = [0] * len(engines.engines)
        self._replica = uuid.uuid4().hex[:8]

    # -- handle API ---------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Answer one request on the least busy engine (batched there with concurrent ones)."""
        return await self._on_engine(lambda e: e.generate.remote(request))

    async def generate_stream(self, request: GenerateRequest):
        """One request's answers as they are written: `StreamDelta`s, then the `GenerateResult`."""
        i = min(range(len(self._inflight)), key=self._inflight.__getitem__)
        self._inflight[i] += 1
        try:
            async for ref in self.engines.engines[i].generate_stream.remote(request):
                yield await ref
        finally:
            self._inflight[i] -= 1

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

    def _check(self, body: "_Body") -> None:
        """Refuse a request outside the server's bounds, or for another model."""
        if body.model is not None and body.model != self.model_name:
            raise ApiError(404, f"model {body.model!r} does not exist here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if body.max_tokens is not None and body.max_tokens > self.cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens: at most {self.cfg.max_tokens_limit}, got {body.max_tokens}", param="max_tokens")

    @app.post("/v1/completions")
    async def completions(self, body: CompletionBody) -> dict:
        self._check(body)
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if not prompts:
            raise ApiError(400, "prompt: must not be empty", param="prompt")
        if len(prompts) > self.cfg.max_prompts:
            raise ApiError(400, f"prompt: at most {self.cfg.max_prompts} prompts per request, got {len(prompts)}", param="prompt")
        longest = max(len(p) for p in prompts)
        if longest > self.cfg.max_prompt_chars:
            raise ApiError(400, f"prompt: at most {self.cfg.max_prompt_chars} characters, got {longest}", param="prompt")
        requests = [GenerateRequest(prompt=p, max_new_tokens=body.max_tokens, temperature=body.temperature,
                                    top_p=body.top_p, n=body.n, seed=body.seed) for p in prompts]
        if body.stream:
            if len(requests) > 1:
                raise ApiError(400, "prompt: a streamed completion takes one prompt", param="prompt")
            return self._sse(requests[0], body, "text_completion")
        results = await self._answer(requests)
        choices = [
            {"index": i * body.n + j, "text": text, "finish_reason": reason, "logprobs": None}
            for i, r in enumerate(results)
            for j, (text, reason) in enumerate(zip(r.texts, r.finish_reasons))
        ]
        return self._envelope("text_completion", choices, results)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatBody) -> dict:
        self._check(body)
        if len(body.messages) > self.cfg.max_messages:
            raise ApiError(400, f"messages: at most {self.cfg.max_messages}, got {len(body.messages)}", param="messages")
        chars = sum(len(m.content) for m in body.messages)
        if chars > self.cfg.max_prompt_chars:
            raise ApiError(400, f"messages: at most {self.cfg.max_prompt_chars} characters in all, got {chars}", param="messages")
        request = GenerateRequest(messages=tuple((m.role, m.content) for m in body.messages), max_new_tokens=body.max_tokens,
                                  temperature=body.temperature, top_p=body.top_p, n=body.n, seed=body.seed)
        if body.stream:
            return self._sse(request, body, "chat.completion.chunk")
        [result] = await self._answer([request])
        choices = [
            {"index": j, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            for j, (text, reason) in enumerate(zip(result.texts, result.finish_reasons))
        ]
        return self._envelope("chat.completion", choices, [result])

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "policy_version": await self.policy_version()}]}

    def _sse(self, request: GenerateRequest, body: "_Body", kind: str) -> StreamingResponse:
        """Server-sent events as OpenAI's streaming API sends them: a chunk per piece of text
        (chat: the role first), a last chunk per choice with its finish reason, with
        `stream_options.include_usage` a chunk with the usage, then `[DONE]`."""
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        chat = kind == "chat.completion.chunk"

        def event(choices: list[dict], **extra) -> str:
            chunk = {"id": cid, "object": kind, "created": created, "model": self.model_name, "choices": choices, **extra}
            return f"data: {json.dumps(chunk)}\n\n"

        def choice(index: int, text: str | None, reason: str | None = None, role: bool = False) -> dict:
            if not chat:
                return {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
            delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
            return {"index": index, "delta": delta, "finish_reason": reason}

        async def events():
            if chat:
                yield event([choice(j, None, role=True) for j in range(request.n)])
            try:
                async for item in self.generate_stream(request):
                    if isinstance(item, StreamDelta):
                        yield event([choice(item.choice, item.text)])
                        continue
                    result: GenerateResult = item
                    yield event([choice(j, None, reason) for j, reason in enumerate(result.finish_reasons)],
                                policy_version=result.policy_version)
                    if body.stream_options is not None and body.stream_options.include_usage:
                        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                                 "total_tokens": result.prompt_tokens + result.completion_tokens}
                        yield event([], usage=usage)
            except Exception as err:  # noqa: BLE001 - the stream has begun (200): the error is its last event
                log.warning("a streamed request failed: %s", err)
                yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error'}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

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


def http_options(cfg: GenerationConfig) -> dict[str, Any]:
    """Serve's HTTP options: the address, and TLS when the config has a certificate."""
    options: dict[str, Any] = {"host": cfg.http_host, "port": cfg.http_port}
    if cfg.tls_cert_file:
        options.update(ssl_certfile=cfg.tls_cert_file, ssl_keyfile=cfg.tls_key_file)
    return options


def build_app(engines: "EngineGroup | EngineSpec", model_name: str, cfg: GenerationConfig):
    deployment = GenerationServer.options(
        num_replicas=cfg.ingress_replicas, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=cfg.max_ongoing_requests
    )
    return deployment.bind(engines, model_name, cfg)


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
                  options: list[dict[str, Any]] | None = None, simulated_gpus: bool = False,
                  template: PromptTemplate | None = None) -> EngineGroup:
    """The engine group (`cfg.replicas` engines, each with Ray actor `options[i]`, rendering chat
    requests with the run's `template`); with `weight_sync: object_store` they follow the weight
    broadcaster."""
    if cfg.weight_sync == "object_store":
        _publisher(fresh=True)  # creates the broadcaster (or finds it) before the engines look for it
    engines = EngineGroup.start(model_cfg, lora_cfg, cfg, options or [replica_options(cfg)] * cfg.replicas, simulated_gpus,
                                template=template)
    if cfg.weight_sync == "object_store":
        engines.follow_broadcaster()
    return engines


def start_generation_server(model_cfg: ModelConfig, lora_cfg: LoraConfig | None, cfg: GenerationConfig, http: bool = True,
                            engines: EngineGroup | None = None):
    """Deploy the ingress on the connected Ray cluster (starting the engines unless given);
    returns its DeploymentHandle."""
    if http:
        if cfg.api_keys_file:  # a missing or unsafe keys file stops here, before anything starts
            from services.exposure import read_api_keys

            read_api_keys(cfg.api_keys_file, "generation.api_keys_file")
        serve.start(http_options=http_options(cfg))
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
