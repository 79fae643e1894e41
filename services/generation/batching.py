"""Dynamic batching that waits as long as requests keep coming, and no longer.

    batcher = Batcher(run, BatchPolicy(max_batch_size=32, max_wait_s=0.1, idle_s=0.01))
    result = await batcher.submit(request)      # from many coroutines at once

One batch runs at a time. While it runs, new requests queue up; when it ends, the next batch
takes what is queued and then keeps collecting. It closes as soon as it is full, or
`max_wait_s` after it opened, or when no request has arrived for `idle_s` *and* it holds the
expected number: the previous batch's requests (the callers just answered are the likeliest
to come back) plus those that arrived while it ran (callers that were waiting). A fixed wait (Ray Serve's `serve.batch`) has to pick between two losses:
short, and clients that come back a few milliseconds after their answer miss the batch and
make the next one small; long, and a lone client pays the whole wait on every request. The
previous batch's size and the idle gap tell the cases apart: a lone client's batch had one
request and its next one has nobody behind it; of 32 clients, those answered come back a few
milliseconds apart on a busy machine (up to a tenth of a second or more), and the others are
already queued. When callers leave, one batch waits `max_wait_s` and the next expects fewer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Req = TypeVar("Req")
Res = TypeVar("Res")


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    """Most requests in one batch."""
    max_wait_s: float
    """Longest a batch stays open after its first request."""
    idle_s: float
    """A batch closes when no request has arrived for this long."""


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    wait_s: float = 0.0  # summed time batches stayed open
    closed: dict[str, int] = field(default_factory=lambda: {"full": 0, "idle": 0, "max_wait": 0})
    """Why batches closed: full, no arrival for `idle_s` (with the expected size reached), or `max_wait_s`."""


@dataclass(frozen=True)
class Failed:
    """A result that fails its own request only: `run` returns it in that request's place and
    the rest of the batch is answered."""

    error: BaseException


class Batcher(Generic[Req, Res]):
    """Feeds concurrent `submit` calls to `run(list[Req]) -> list[Res]`, one batch at a time.

    `run` must return one result per request, in order; a `Failed` in a request's place fails
    that request alone, an exception fails every request of its batch (and only those). Must
    be created inside the event loop it serves.
    """

    def __init__(self, run: Callable[[list[Req]], Awaitable[list[Res]]], policy: BatchPolicy) -> None:
        self._run = run
        self.policy = policy
        self.stats = BatchStats()
        self._previous = 1  # size of the last batch: how many callers are likely to come back
        self._running = False
        self._arrived_while_running = 0  # requests queued while the last batch ran
        self._queue: asyncio.Queue[tuple[Req, asyncio.Future[Res]]] = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._serve())

    async def submit(self, request: Req) -> Res:
        if self._worker.done():
            raise RuntimeError("the batcher is closed")
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((request, future))
        if self._running:
            self._arrived_while_running += 1
        return await future

    def close(self) -> None:
        self._worker.cancel()

    async def _collect(self) -> list[tuple[Req, asyncio.Future[Res]]]:
        batch = [await self._queue.get()]
        opened = time.monotonic()
        limit, policy = self.policy.max_batch_size, self.policy
        expected = min(limit, self._previous + self._arrived_while_running)
        reason = "full"
        while len(batch) < limit:
            while len(batch) < limit and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            left = opened + policy.max_wait_s - time.monotonic()
            if len(batch) >= limit:
                break
            if left <= 0:
                reason = "max_wait"
                break
            # below the expected size, wait for the next arrival as long as the batch may stay open
            wait = min(policy.idle_s, left) if len(batch) >= expected else left
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), wait))
            except asyncio.TimeoutError:
                reason = "idle" if wait < left else "max_wait"
                break
        self.stats.wait_s += time.monotonic() - opened
        self.stats.closed[reason] += 1
        self._previous = len(batch)
        return batch

    async def _serve(self) -> None:
        while True:
            batch = await self._collect()
            live = [(r, f) for r, f in batch if not f.done()]  # callers that gave up are skipped
            if not live:
                continue
            self.stats.batches += 1
            self.stats.requests += len(live)
            self._running, self._arrived_while_running = True, 0
            try:
                results = await self._run([r for r, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batch of {len(live)} requests returned {len(results)} results")
            except asyncio.CancelledError:
                for _, f in live:
                    if not f.done():
                        f.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - the batch's callers get the error
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            finally:
                self._running = False
            for (_, f), result in zip(live, results):
                if f.done():
                    continue
                if isinstance(result, Failed):
                    f.set_exception(result.error)
                else:
                    f.set_result(result)
