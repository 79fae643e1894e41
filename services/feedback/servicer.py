"""The gRPC servicer: translates messages, checks auth and scope, delegates.

The logic lives in plain objects (`GroupCommitter`, the store); this class only
maps wire messages to them and their failures to gRPC status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import operator
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from typing import AsyncIterator, Iterable, Sequence

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from hitl.feedback.v1 import feedback_pb2 as pb
from hitl.feedback.v1 import feedback_pb2_grpc as pb_grpc

from services.feedback.auth import ANONYMOUS, Principal, TokenAuth
from services.feedback.budget import ByteBudget
from services.feedback.committer import CommitterClosed, GroupCommitter, Overloaded
from services.feedback.config import FeedbackServiceConfig
from services.feedback.metrics import FeedbackMetrics
from services.feedback.records import Rejection, wire_records
from services.feedback.store import FeedbackStore, Outcome, Status

log = logging.getLogger(__name__)

_STATUS = {
    Status.ACCEPTED: pb.RecordResult.STATUS_ACCEPTED,
    Status.DUPLICATE: pb.RecordResult.STATUS_DUPLICATE,
    Status.REJECTED: pb.RecordResult.STATUS_REJECTED,
}
_ACCEPTED = pb.RecordResult.STATUS_ACCEPTED
_outcome_status = operator.itemgetter(0)
_outcome_seq = operator.itemgetter(1)
_feedback_id = operator.attrgetter("feedback_id")
MAX_TASKS_PER_PULL = 1000


def add_results(results, records: Sequence[pb.FeedbackRecord], outcomes: Sequence[Outcome]) -> None:
    """Append one RecordResult per record, in order, to `results` (a response's repeated field).

    Built in place (no intermediate messages to copy) and with identity tests
    on the status: this runs once per record on the event loop. When every
    record was accepted (the common batch), ids and seqs are read in C-level
    passes and the loop only adds.
    """
    add = results.add
    if all(map(operator.is_, map(_outcome_status, outcomes), repeat(Status.ACCEPTED))):
        for feedback_id, seq in zip(map(_feedback_id, records), map(_outcome_seq, outcomes)):
            add(feedback_id=feedback_id, status=_ACCEPTED, seq=seq)
        return
    for record, outcome in zip(records, outcomes):
        status = outcome.status
        if status is Status.ACCEPTED:
            add(feedback_id=record.feedback_id, status=_ACCEPTED, seq=outcome.seq)
        elif outcome.rejection is None:
            add(feedback_id=record.feedback_id, status=_STATUS[status], seq=outcome.seq)
        else:
            add(
                feedback_id=record.feedback_id,
                status=_STATUS[status],
                seq=outcome.seq,
                field=outcome.rejection.field,
                reason=outcome.rejection.reason,
            )


class WireRequest:
    """A parsed request message (its attributes read through) and the bytes it was parsed from.

    The server's request deserializers for SubmitFeedback and StreamFeedback
    return these (`wire_request_parser`), so that each record's bytes as sent
    can be stored without serialising the record again (`records.wire_records`).
    """

    __slots__ = ("message", "data")

    def __init__(self, message, data: bytes):
        self.message = message
        self.data = data

    def __getattr__(self, name: str):
        return getattr(self.message, name)


class Malformed:
    """A request message whose bytes do not parse: the handler answers INVALID_ARGUMENT.

    gRPC's own handling of a deserializer that raises is poor for a stream (the
    handler's request iterator just ends, so the call finished OK and the
    batches after the bad one went unread and unacked): the parser returns
    this instead, and the handler names the message in its error.
    """

    __slots__ = ("type_name", "error", "size")

    def __init__(self, type_name: str, error: Exception, size: int):
        self.type_name = type_name
        self.error = error
        self.size = size

    def describe(self) -> str:
        return f"{self.size} bytes that do not parse as {self.type_name} ({type(self.error).__name__}: {self.error})"


def request_parser(message_type):
    """A request deserializer that answers a `Malformed` for bytes that do not parse (gRPC's own
    handling of a raising deserializer answers UNKNOWN)."""
    parse = message_type.FromString
    name = message_type.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError as err:
            return Malformed(name, err, len(data))

    return deserialize


def wire_request_parser(message_type):
    """A request deserializer that keeps the request's bytes next to the parsed message
    (a `Malformed` for bytes that do not parse)."""
    parse = message_type.FromString
    name = message_type.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> WireRequest | Malformed:
        try:
            return WireRequest(parse(data), data)
        except DecodeError as err:
            return Malformed(name, err, len(data))

    return deserialize


def _blobs(request, field_number: int):
    """The records' bytes as they arrived, when the request kept them (else None: serialise them)."""
    if type(request) is not WireRequest:
        return None
    return wire_records(request.data, field_number)


def _subset(blobs, keep: list[int]):
    return None if blobs is None else [blobs[i] for i in keep]


def _merge(verdicts: list[Outcome | None], outcomes: Sequence[Outcome]) -> list[Outcome]:
    """Outcomes in the records' order: each verdict where one was given, else the next committed outcome."""
    committed = iter(outcomes)
    return [v if v is not None else next(committed) for v in verdicts]


def _consume(future: asyncio.Future) -> None:
    """Retrieve a future's outcome, so that an unawaited failure is not logged as lost."""
    if not future.cancelled():
        future.exception()


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class FeedbackServicer(pb_grpc.FeedbackServiceServicer):
    def __init__(
        self,
        cfg: FeedbackServiceConfig,
        store: FeedbackStore,
        committer: GroupCommitter,
        writer: ThreadPoolExecutor,
        readers: ThreadPoolExecutor,
        auth: TokenAuth | None,
        metrics: FeedbackMetrics,
    ):
        self._cfg = cfg
        self._store = store
        self._committer = committer
        self._writer = writer
        self._readers = readers
        self._auth = auth
        self._metrics = metrics
        self._stopping = asyncio.Event()
        self._streams: Counter[str] = Counter()  # open StreamFeedback / following PullTasks calls per principal
        self._leases: dict[str, list[float]] = {}  # per principal: a heap of its granted leases' expiry times
        self._leasing: Counter[str] = Counter()  # per principal: leases asked of the store and not yet granted
        self._bytes = ByteBudget(cfg.max_bytes_per_second_per_principal, 4 * cfg.max_message_bytes)

    def begin_shutdown(self) -> None:
        """Following PullTasks streams end; calls in progress finish."""
        self._stopping.set()

    # -- helpers ------------------------------------------------------------

    async def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        if self._auth is None:
            return ANONYMOUS
        principal = self._auth.authenticate(context.invocation_metadata())
        if principal is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token (metadata 'authorization: Bearer <token>')")
        return principal

    async def _check_scope(self, context: grpc.aio.ServicerContext, principal: Principal, projects: Iterable[str]) -> None:
        denied = principal.first_denied(projects)
        if denied is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"token {principal.name!r} may not write or read project {denied!r}")

    async def _check_annotators(self, context: grpc.aio.ServicerContext, principal: Principal, annotator_ids: Iterable[str]) -> None:
        foreign = principal.first_foreign(annotator_ids)
        if foreign is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"token {principal.name!r} may not act as annotator {foreign!r}")

    @contextlib.contextmanager
    def _stream_slot(self, principal: Principal):
        """Count an open stream against the principal's budget; None when the budget is spent."""
        limit = principal.max_streams or self._cfg.max_streams_per_principal
        if self._streams[principal.name] >= limit:
            yield None
            return
        self._streams[principal.name] += 1
        try:
            yield limit
        finally:
            self._streams[principal.name] -= 1
            if not self._streams[principal.name]:
                del self._streams[principal.name]

    def _lease_room(self, principal: Principal, now: float) -> int:
        """How many more leases the principal may hold now: granted leases count until they
        expire, and leases being asked for now (reserved, `_reserve_leases`) count too."""
        held = self._leases.setdefault(principal.name, [])
        while held and held[0] <= now:
            heapq.heappop(held)
        if not held:
            del self._leases[principal.name]
        limit = principal.max_leases or self._cfg.max_leases_per_principal
        return limit - len(held) - self._leasing[principal.name]

    @contextlib.contextmanager
    def _reserve_leases(self, principal: Principal, n: int):
        """Hold `n` of the principal's lease room while the store leases (concurrent pulls of
        one token cannot each see the same room); what was granted is counted afterwards."""
        self._leasing[principal.name] += n
        try:
            yield
        finally:
            self._leasing[principal.name] -= n
            if not self._leasing[principal.name]:
                del self._leasing[principal.name]

    def _count_leases(self, principal: Principal, expiries: Iterable[float]) -> None:
        held = self._leases.setdefault(principal.name, [])
        for expiry in expiries:
            heapq.heappush(held, expiry)

    async def _lease_verdicts(self, context, principal: Principal, records: Sequence[pb.FeedbackRecord]) -> list[Outcome | None] | None:
        """For a principal that must lease first: per record, a rejection when its annotator was never
        handed its task, else None (go on); None when every record may go on."""
        try:
            return await self._unleased(principal, records)
        except Exception as err:  # noqa: BLE001 - the store is down: nothing of the call was acked
            log.warning("lease lookup failed: %s", err)
            context.set_trailing_metadata((("retry-after-ms", "1000"),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"store unavailable: {type(err).__name__}; retry")
        raise AssertionError("unreachable")

    async def _unleased(self, principal: Principal, records: Sequence[pb.FeedbackRecord]) -> list[Outcome | None] | None:
        if not principal.require_lease:
            return None
        pairs = {(r.task_id, r.annotator_id) for r in records}
        held = await asyncio.get_running_loop().run_in_executor(self._readers, self._store.leased_pairs, pairs)
        if len(held) == len(pairs):
            return None
        return [
            None if (r.task_id, r.annotator_id) in held
            else Outcome(Status.REJECTED, 0, Rejection("task_id", f"annotator {r.annotator_id!r} was never handed task {r.task_id!r}: lease it first (PullTasks)"))
            for r in records
        ]

    async def _check_batch_size(self, context: grpc.aio.ServicerContext, n: int) -> None:
        if n > self._cfg.max_batch_records:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a batch holds {n} records; the limit is {self._cfg.max_batch_records}: split it",
            )

    async def _commit(self, context: grpc.aio.ServicerContext, records, wait: bool, blobs=None) -> list[Outcome]:
        try:
            return await self._committer.submit(records, wait=wait, blobs=blobs)
        except Overloaded as err:
            self._metrics.refused.labels("overloaded").inc()
            context.set_trailing_metadata((("retry-after-ms", str(int(err.retry_after_s * 1000))),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded ({err}); retry later")
        except CommitterClosed as err:
            self._metrics.refused.labels("closed").inc()
            context.set_trailing_metadata((("retry-after-ms", "1000"),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except Exception as err:  # noqa: BLE001 - a store failure: nothing of this call was acked
            log.exception("store write failed")
            self._metrics.refused.labels("store").inc()
            context.set_trailing_metadata((("retry-after-ms", "1000"),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"store write failed: {type(err).__name__}; retry")
        raise AssertionError("unreachable")

    # -- RPCs ---------------------------------------------------------------

    async def SubmitFeedback(self, request: pb.SubmitFeedbackRequest, context) -> pb.SubmitFeedbackResponse:
        started = time.perf_counter()
        principal = await self._principal(context)
        if type(request) is Malformed:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.describe()}")
        size = len(request.data) if type(request) is WireRequest else request.ByteSize()
        wait = self._bytes.take(principal.name, size)
        if wait > 0:
            self._bytes.refund(principal.name, size)
            self._metrics.refused.labels("byte_budget").inc()
            context.set_trailing_metadata((("retry-after-ms", str(max(1, int(wait * 1000)))),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"token {principal.name!r} is over its byte budget ({self._cfg.max_bytes_per_second_per_principal} bytes/s); retry later")
        await self._check_scope(context, principal, {r.project for r in request.records})
        await self._check_annotators(context, principal, {r.annotator_id for r in request.records})
        await self._check_batch_size(context, len(request.records))
        records = list(request.records)
        blobs = _blobs(request, 1)
        verdicts = await self._lease_verdicts(context, principal, records) if records else None
        if verdicts is None:
            outcomes = await self._commit(context, records, wait=False, blobs=blobs) if records else []
        else:
            keep = [i for i, v in enumerate(verdicts) if v is None]
            kept = await self._commit(context, [records[i] for i in keep], wait=False, blobs=_subset(blobs, keep)) if keep else []
            outcomes = _merge(verdicts, kept)
        response = pb.SubmitFeedbackResponse()
        add_results(response.results, records, outcomes)
        self._metrics.ack_seconds.labels("SubmitFeedback").observe(time.perf_counter() - started)
        return response

    async def StreamFeedback(self, request_iterator: AsyncIterator[pb.FeedbackBatch], context) -> AsyncIterator[pb.BatchAck]:
        principal = await self._principal(context)
        with self._stream_slot(principal) as slot:
            if slot is None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"token {principal.name!r} has the most streams it may open at once; close one")
            async for ack in self._stream(request_iterator, context, principal):
                yield ack

    async def _stream(self, request_iterator, context, principal: Principal) -> AsyncIterator[pb.BatchAck]:
        inflight: asyncio.Queue = asyncio.Queue(maxsize=self._cfg.max_inflight_batches)
        reader = asyncio.create_task(self._read_stream(request_iterator, context, principal, inflight))
        observe = self._metrics.ack_seconds.labels("StreamFeedback").observe
        try:
            while True:
                item = await inflight.get()
                if item is None:
                    break
                if isinstance(item[0], grpc.StatusCode):
                    await context.abort(item[0], item[1])
                sequence, records, pending, started = item
                try:
                    outcomes = await pending if records else []
                except CommitterClosed as err:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
                except Exception as err:  # noqa: BLE001 - a store failure: this batch and those after it are not acked
                    log.exception("store write failed")
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"store write failed: {type(err).__name__}; resend unacked batches")
                ack = pb.BatchAck(sequence=sequence)
                add_results(ack.results, records, outcomes)
                observe(time.perf_counter() - started)
                yield ack
        finally:
            reader.cancel()
            # batches the stream no longer waits for: their failure (if any) needs no report
            while not inflight.empty():
                item = inflight.get_nowait()
                if item is not None and len(item) == 4 and isinstance(item[2], asyncio.Future):
                    item[2].add_done_callback(_consume)

    async def _read_stream(self, request_iterator, context, principal: Principal, inflight: asyncio.Queue) -> None:
        last: int | None = None
        committer = self._committer
        try:
            async for batch in request_iterator:
                started = time.perf_counter()
                if type(batch) is Malformed:
                    after = "the stream's first batch" if last is None else f"the batch after sequence {last}"
                    await inflight.put((grpc.StatusCode.INVALID_ARGUMENT, f"{after}: {batch.describe()}; it and what follows were not read: resend from it"))
                    return
                wait = self._bytes.take(principal.name, len(batch.data) if type(batch) is WireRequest else batch.ByteSize())
                if wait > 0:  # over budget: read this stream more slowly (flow control tells the sender)
                    self._metrics.throttled_seconds.inc(wait)
                    await asyncio.sleep(wait)
                if last is not None and batch.sequence <= last:
                    await inflight.put((grpc.StatusCode.INVALID_ARGUMENT, f"batch sequence {batch.sequence} does not increase (last was {last})"))
                    return
                last = batch.sequence
                denied = None if principal.all_projects else principal.first_denied({r.project for r in batch.records})
                if denied is not None:
                    await inflight.put((grpc.StatusCode.PERMISSION_DENIED, f"token {principal.name!r} may not write project {denied!r}"))
                    return
                foreign = principal.first_foreign({r.annotator_id for r in batch.records})
                if foreign is not None:
                    await inflight.put((grpc.StatusCode.PERMISSION_DENIED, f"batch {batch.sequence}: token {principal.name!r} may not act as annotator {foreign!r}"))
                    return
                if len(batch.records) > self._cfg.max_batch_records:
                    await inflight.put(
                        (grpc.StatusCode.RESOURCE_EXHAUSTED, f"batch {batch.sequence} holds {len(batch.records)} records; the limit is {self._cfg.max_batch_records}")
                    )
                    return
                records = list(batch.records)
                pending: asyncio.Future | None = None
                verdicts = None
                if records and principal.require_lease:
                    try:
                        verdicts = await self._unleased(principal, records)
                    except Exception as err:  # noqa: BLE001 - the store is down: this batch is not acked
                        await inflight.put((grpc.StatusCode.UNAVAILABLE, f"batch {batch.sequence}: store unavailable ({type(err).__name__}); resend unacked batches"))
                        return
                if verdicts is not None:
                    keep = [i for i, v in enumerate(verdicts) if v is None]
                    pending = asyncio.ensure_future(self._commit_kept(verdicts, [records[i] for i in keep], _subset(_blobs(batch, 2), keep)))
                elif records:
                    blobs = _blobs(batch, 2)
                    # The batch joins the group that is forming now; the ack side awaits its
                    # outcomes. Without room in the committer, a task waits for it
                    # (back-pressure: this stream's later batches wait behind it).
                    if committer.has_room(len(records)):
                        try:
                            pending = committer.enqueue(records, blobs)
                        except CommitterClosed as err:
                            pending = asyncio.get_running_loop().create_future()
                            pending.set_exception(err)
                    else:
                        pending = asyncio.ensure_future(committer.submit(records, wait=True, blobs=blobs))
                await inflight.put((batch.sequence, records, pending, started))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - the client went away; the handler ends
            log.debug("stream reader ended: %s", err)
        await inflight.put(None)

    async def _commit_kept(self, verdicts: list[Outcome | None], kept: list[pb.FeedbackRecord], blobs) -> list[Outcome]:
        outcomes = await self._committer.submit(kept, wait=True, blobs=blobs) if kept else []
        return _merge(verdicts, outcomes)

    async def PullTasks(self, request: pb.PullTasksRequest, context) -> AsyncIterator[pb.LabelingTask]:
        principal = await self._principal(context)
        if type(request) is Malformed:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.describe()}")
        if not request.project:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "project: required")
        if not request.annotator_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "annotator_id: required")
        for name in ("project", "annotator_id"):
            if "\x00" in getattr(request, name) or len(getattr(request, name).encode()) > 128:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: at most 128 bytes, no NUL characters")
        await self._check_scope(context, principal, [request.project])
        if request.max_tasks > MAX_TASKS_PER_PULL:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_tasks: at most {MAX_TASKS_PER_PULL}, got {request.max_tasks}")
        if request.lease_seconds > self._cfg.max_lease_seconds:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"lease_seconds: at most {self._cfg.max_lease_seconds:g}, got {request.lease_seconds}")
        await self._check_annotators(context, principal, [request.annotator_id])
        if not request.follow:
            async for task in self._pull(request, context, principal):
                yield task
            return
        with self._stream_slot(principal) as slot:
            if slot is None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"token {principal.name!r} has the most streams it may open at once; close one")
            async for task in self._pull(request, context, principal):
                yield task

    async def _pull(self, request: pb.PullTasksRequest, context, principal: Principal) -> AsyncIterator[pb.LabelingTask]:
        wanted = request.max_tasks or 1
        lease = float(request.lease_seconds or self._cfg.default_lease_seconds)
        loop = asyncio.get_running_loop()
        sent = 0
        while sent < wanted:
            room = self._lease_room(principal, time.time())
            if room <= 0:
                if sent:
                    break
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"token {principal.name!r} holds the most unexpired leases it may (max_leases); answer tasks or let leases run out",
                )
            asked = min(wanted - sent, room)
            try:
                with self._reserve_leases(principal, asked):
                    leased = await loop.run_in_executor(
                        self._writer, self._store.lease_tasks, request.project, request.annotator_id, asked, lease
                    )
                    self._count_leases(principal, (item.lease_expires_at for item in leased))
            except Exception as err:  # noqa: BLE001 - the store is down or stumbled: nothing was leased
                log.warning("lease failed: %s", err)
                context.set_trailing_metadata((("retry-after-ms", "1000"),))
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"store unavailable: {type(err).__name__}; retry")
            for item in leased:
                msg = item.task.to_proto()
                msg.lease_expires_at.CopyFrom(_timestamp(item.lease_expires_at))
                yield msg
                sent += 1
            if not request.follow or sent >= wanted:
                break
            if not leased:
                self._metrics.followers.inc()
                try:
                    await asyncio.wait_for(self._stopping.wait(), timeout=self._cfg.follow_poll_seconds)
                    break  # shutting down
                except asyncio.TimeoutError:
                    pass
                finally:
                    self._metrics.followers.dec()

    async def GetStats(self, request: pb.GetStatsRequest, context) -> pb.Stats:
        principal = await self._principal(context)
        if type(request) is Malformed:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.describe()}")
        if "\x00" in request.project:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "project: no NUL characters")
        if request.project:
            await self._check_scope(context, principal, [request.project])
            projects: list[str] | None = [request.project]
        else:
            projects = principal.scope()
        try:
            stats = await asyncio.get_running_loop().run_in_executor(self._readers, self._store.stats, projects)
        except Exception as err:  # noqa: BLE001 - the store is down or stumbled
            log.warning("stats failed: %s", err)
            context.set_trailing_metadata((("retry-after-ms", "1000"),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"store unavailable: {type(err).__name__}; retry")
        return pb.Stats(
            total_records=stats.total_records,
            by_kind=stats.by_kind,
            by_project=stats.by_project,
            by_annotator=stats.by_annotator,
            watermark=stats.watermark,
            open_tasks=stats.open_tasks,
        )
