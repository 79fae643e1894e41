"""Group commit: batches from every concurrent call share one durable transaction.

Calls hand their records to `GroupCommitter.submit`, which validates and
encodes them on the event loop (`store.prepare`); one writer loop takes
everything queued (up to `max_group_records`), writes it to the store in a
single transaction on a dedicated thread, and resolves each caller's future
with its own outcomes. While one transaction is being fsynced, the next group
gathers, so the cost of durability is paid once per group, not once per call.
A caller's future resolves only after its records are committed: acks never
run ahead of durability.
"""

from __future__ import annotations

import asyncio
import operator
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Sequence

from hitl.feedback.v1 import feedback_pb2 as pb

from services.feedback.metrics import FeedbackMetrics
from services.feedback.store import FeedbackStore, Outcome, Status


_INDEX = re.compile(r"\[[^\]]*\]")


def _field_paths(descriptor, prefix: str = "", depth: int = 0) -> set[str]:
    """Every field path of a message type, `[]` standing for any index or map key."""
    paths: set[str] = set()
    for f in descriptor.fields:
        path = f"{prefix}{f.name}"
        paths.add(path)
        if f.message_type is not None and depth < 4:
            if f.message_type.GetOptions().map_entry:
                paths.add(f"{path}[]")
                continue
            inner = f"{path}[]." if f.is_repeated else f"{path}."
            paths.add(f"{inner}unknown_fields")
            paths |= _field_paths(f.message_type, inner, depth + 1)
    return paths


_REASONS = frozenset(_field_paths(pb.FeedbackRecord.DESCRIPTOR) | {"judgement", "unknown_fields", ""})


def reason_label(field: str) -> str:
    """The `reason` label of a rejected record: its field's path from a fixed set.

    Rejection fields can quote what the client sent (a metadata key, an
    index); as label values they would mint a Prometheus series per distinct
    input. Indices and keys collapse to `[]`, and anything still outside the
    schema's own paths is `other`, so the label takes finitely many values.
    """
    path = _INDEX.sub("[]", field)
    return path if path in _REASONS else "other"
_judgement = operator.methodcaller("WhichOneof", "judgement")
_status_name = operator.attrgetter("status._name_")  # the member's name; a plain attribute, unlike Enum.name
_status = operator.itemgetter(0)  # Outcome.status
_rejection = operator.attrgetter("rejection")
_row_kind = operator.itemgetter(2)  # the kind of a prepared row (see store.prepare)
_records_of = operator.attrgetter("records")
_prepared_of = operator.attrgetter("prepared")


class Overloaded(RuntimeError):
    """Too many records are waiting for commit; retry after `retry_after_s`."""

    def __init__(self, pending: int, retry_after_s: float):
        super().__init__(f"{pending} records are waiting for commit")
        self.retry_after_s = retry_after_s


class CommitterClosed(RuntimeError):
    """The committer is shutting down and takes no new records."""


@dataclass
class _Request:
    records: Sequence[pb.FeedbackRecord]
    prepared: list  # store.prepare(records): validated, serialised and hashed, one item per record
    future: asyncio.Future = field(repr=False)


class GroupCommitter:
    def __init__(
        self,
        store: FeedbackStore,
        writer: ThreadPoolExecutor,
        metrics: FeedbackMetrics | None = None,
        max_group_records: int = 4096,
        max_pending_records: int = 100_000,
    ):
        self._store = store
        self._writer = writer  # single thread: every store write goes through it
        self._metrics = metrics
        self._max_group = max_group_records
        self._max_pending = max_pending_records
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue()
        self._pending = 0
        self._space = asyncio.Condition()
        self._closed = False
        self._loop_task: asyncio.Task | None = None
        self._last_commit_s = 0.005
        self._accepted_counters: dict[str, object] = {}  # kind -> its records{result="accepted"} child

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="group-committer")

    async def submit(self, records: Sequence[pb.FeedbackRecord], wait: bool, blobs: Sequence | None = None) -> list[Outcome]:
        """Commit records; returns one outcome per record once they are durable.

        With `wait=False` an overloaded committer raises Overloaded at once;
        with `wait=True` the caller waits for room (stream back-pressure).
        """
        if self._closed:
            raise CommitterClosed("the service is shutting down")
        n = len(records)
        if not self.has_room(n):
            if not wait:
                raise Overloaded(self._pending, self.retry_after_s())
            async with self._space:
                await self._space.wait_for(lambda: self._closed or self.has_room(n))
        return await self.enqueue(records, blobs)

    def has_room(self, n: int) -> bool:
        """Whether n more records may be queued now (always, when nothing is pending)."""
        return self._pending + n <= self._max_pending or self._pending == 0

    def enqueue(self, records: Sequence[pb.FeedbackRecord], blobs: Sequence | None = None) -> asyncio.Future:
        """Queue records for the next group at once, room or not; the future gets their outcomes once durable.

        `submit` without the wait: the caller checks `has_room` first (a stream
        does, and falls back to `submit` when there is none). Raises
        CommitterClosed when shutting down. `blobs`: the records' bytes as they
        arrived, if at hand (see `store.prepare`).
        """
        if self._closed:
            raise CommitterClosed("the service is shutting down")
        # Validation, serialisation and hashing need no database: they run here, on the
        # event loop, while the writer thread is busy with the previous group's
        # transaction, and the writer only runs the SQL.
        prepared = self._store.prepare(records) if blobs is None else self._store.prepare(records, blobs)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending += len(records)
        self._queue.put_nowait(_Request(records, prepared, future))
        return future

    def retry_after_s(self) -> float:
        """A wait after which the current backlog has likely been written."""
        groups = max(1, self._pending // self._max_group)
        return min(5.0, max(0.05, groups * self._last_commit_s))

    async def close(self) -> None:
        """Finish everything queued, then stop taking records."""
        self._closed = True
        async with self._space:
            self._space.notify_all()
        self._queue.put_nowait(None)
        if self._loop_task is not None:
            await self._loop_task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            group = [first]
            size = len(first.records)
            while size < self._max_group and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stopping = True
                    break
                group.append(nxt)
                size += len(nxt.records)
            await self._commit(loop, group, size)

    async def _commit(self, loop: asyncio.AbstractEventLoop, group: list[_Request], size: int) -> None:
        if len(group) == 1:
            records, prepared = group[0].records, group[0].prepared
        else:
            records = list(chain.from_iterable(map(_records_of, group)))
            prepared = list(chain.from_iterable(map(_prepared_of, group)))
        started = time.perf_counter()
        try:
            outcomes = await loop.run_in_executor(self._writer, self._store.write_prepared, prepared)
        except Exception as err:  # noqa: BLE001 - every waiting caller learns of it
            for req in group:
                if not req.future.done():
                    req.future.set_exception(err)
        else:
            self._last_commit_s = time.perf_counter() - started
            self._observe(records, outcomes, self._last_commit_s, prepared)
            if len(group) == 1:
                if not group[0].future.done():
                    group[0].future.set_result(outcomes)
            else:
                start = 0
                for req in group:
                    end = start + len(req.records)
                    if not req.future.done():
                        req.future.set_result(outcomes[start:end])
                    start = end
        finally:
            self._pending -= size
            async with self._space:
                self._space.notify_all()

    def _observe(self, records: list[pb.FeedbackRecord], outcomes: list[Outcome], seconds: float, prepared: list | None = None) -> None:
        """Metrics of a committed group; `prepared` (the group's `store.prepare` items) saves reading the records."""
        if self._metrics is None:
            return
        self._metrics.commit_seconds.observe(seconds)
        self._metrics.commit_records.observe(len(records))
        # One counter update per label set of the group, not one per record; the
        # tally runs in C (map/zip/Counter) because it sees every record.
        if prepared is not None and outcomes and all(map(operator.is_, map(_status, outcomes), repeat(Status.ACCEPTED))):
            # The common group, all accepted: each prepared item is a row, which holds the
            # record's kind; no record is read again.
            counters = self._accepted_counters
            for kind, n in Counter(map(_row_kind, prepared)).items():
                counter = counters.get(kind)
                if counter is None:
                    counter = counters[kind] = self._metrics.records.labels(kind, Status.ACCEPTED.value, "")
                counter.inc(n)  # type: ignore[attr-defined]
            return
        tally = Counter(zip(map(_judgement, records), map(_status_name, outcomes), map(_rejection, outcomes)))
        for (kind, status_name, rejection), n in tally.items():
            reason = ""
            if status_name == "REJECTED" and rejection is not None:
                reason = reason_label(rejection.field)
            self._metrics.records.labels(kind or "none", Status[status_name].value, reason).inc(n)
