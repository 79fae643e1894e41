"""Python client of the feedback service.

    client = FeedbackClient("127.0.0.1:50051", token="s3cret")
    results = client.submit(records)        # unary calls, batched, retried
    report = client.stream(records)         # one stream, resumed after breaks
    for task in client.pull_tasks("my-project", "alice", max_tasks=10): ...

Retries: UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED and overload
(RESOURCE_EXHAUSTED with a `retry-after-ms` hint) are retried with jittered
exponential backoff; every other error is raised. Resending is safe because
the server deduplicates on `feedback_id`.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import grpc

from hitl.feedback.v1 import feedback_pb2 as pb
from hitl.feedback.v1 import feedback_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}


class FeedbackClientError(RuntimeError):
    """A call failed for good (or kept failing past the retry budget)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


@dataclass
class Backoff:
    """Jittered exponential backoff; `give_up_after_s` bounds time without progress."""

    initial_s: float = 0.05
    max_s: float = 2.0
    give_up_after_s: float = 60.0

    def delays(self) -> Iterator[float]:
        delay = self.initial_s
        while True:
            yield delay * (0.5 + random.random() / 2)
            delay = min(self.max_s, delay * 2)


@dataclass
class StreamReport:
    """What a `stream` call achieved."""

    results: list[pb.RecordResult] = field(default_factory=list)  # one per record, in input order
    batches: int = 0
    reconnects: int = 0

    def count(self, status: "pb.RecordResult.Status") -> int:
        return sum(1 for r in self.results if r.status == status)


def retry_hint_s(err: grpc.RpcError) -> float | None:
    """The server's `retry-after-ms` hint, if the error carries one."""
    try:
        trailers = err.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - not every RpcError is a Call
        return None
    for key, value in trailers:
        if key == "retry-after-ms":
            try:
                return int(value) / 1000.0
            except ValueError:
                return None
    return None


def is_transient(err: grpc.RpcError) -> bool:
    code = err.code() if hasattr(err, "code") else None
    if code in _TRANSIENT:
        return True
    # overload is transient; an oversized message (no hint) is not
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_hint_s(err) is not None


def batched(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class FeedbackClient:
    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        root_certificates: bytes | str | Path | None = None,
        client_cert: bytes | str | Path | None = None,
        client_key: bytes | str | Path | None = None,
        server_name: str | None = None,
        batch_size: int = 200,
        timeout_s: float = 30.0,
        backoff: Backoff | None = None,
        channel_options: Sequence[tuple[str, object]] = (),
    ):
        self.target = target
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.backoff = backoff or Backoff()
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024), *channel_options]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if root_certificates is not None or client_cert is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_pem(root_certificates),
                private_key=_pem(client_key),
                certificate_chain=_pem(client_cert),
            )
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.FeedbackServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "FeedbackClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- unary ----------------------------------------------------------------

    def submit(self, records: Iterable[pb.FeedbackRecord]) -> list[pb.RecordResult]:
        """Submit records in batches of `batch_size`; one result per record, in order."""
        results: list[pb.RecordResult] = []
        for chunk in batched(records, self.batch_size):
            request = pb.SubmitFeedbackRequest(records=chunk)
            response = self._call(lambda: self._stub.SubmitFeedback(request, timeout=self.timeout_s, metadata=self._metadata))
            results.extend(response.results)
        return results

    def stats(self, project: str = "") -> pb.Stats:
        return self._call(lambda: self._stub.GetStats(pb.GetStatsRequest(project=project), timeout=self.timeout_s, metadata=self._metadata))

    def pull_tasks(
        self,
        project: str,
        annotator_id: str,
        max_tasks: int = 1,
        lease_seconds: int = 0,
        follow: bool = False,
        timeout_s: float | None = None,
    ) -> Iterator[pb.LabelingTask]:
        """Lease and yield up to max_tasks tasks (see PullTasks in the .proto)."""
        request = pb.PullTasksRequest(
            project=project, annotator_id=annotator_id, max_tasks=max_tasks, lease_seconds=lease_seconds, follow=follow
        )
        call = self._stub.PullTasks(request, timeout=timeout_s if follow else (timeout_s or self.timeout_s), metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as err:
            raise FeedbackClientError(f"PullTasks failed: {err.code().name}: {err.details()}", err.code()) from None
        finally:
            call.cancel()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the channel connects (e.g. after starting a server)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def _call(self, fn: Callable):
        delays = self.backoff.delays()
        deadline = time.monotonic() + self.backoff.give_up_after_s
        while True:
            try:
                return fn()
            except grpc.RpcError as err:
                if not is_transient(err) or time.monotonic() > deadline:
                    raise FeedbackClientError(f"{err.code().name}: {err.details()}", err.code()) from None
                wait = retry_hint_s(err) or next(delays)
                log.debug("transient %s; retrying in %.2fs", err.code().name, wait)
                time.sleep(wait)

    # -- streaming --------------------------------------------------------------

    def stream(
        self,
        records: Iterable[pb.FeedbackRecord],
        window: int = 32,
        on_ack: Callable[[pb.BatchAck], None] | None = None,
    ) -> StreamReport:
        """Send records over one StreamFeedback stream, resuming after breaks.

        Up to `window` batches are in flight. When the stream breaks, a new one
        is opened and every unacked batch is resent (with its sequence number)
        before new ones: nothing is lost, and the server's idempotency keys keep
        anything that was committed but not acked from being stored twice.
        """
        return _ResumableStream(self, records, window, on_ack).run()


class _ResumableStream:
    def __init__(self, client: FeedbackClient, records: Iterable[pb.FeedbackRecord], window: int, on_ack):
        self._client = client
        self._source = enumerate(batched(records, client.batch_size), start=1)
        self._window = window
        self._on_ack = on_ack
        self._cond = threading.Condition()
        self._unacked: OrderedDict[int, list[pb.FeedbackRecord]] = OrderedDict()
        self._exhausted = False
        self._attempt = 0
        self._results: dict[int, list[pb.RecordResult]] = {}
        self.report = StreamReport()

    def run(self) -> StreamReport:
        delays = self._client.backoff.delays()
        last_progress = time.monotonic()
        give_up = self._client.backoff.give_up_after_s
        while True:
            acked_before = len(self._results)
            hint: float | None = None
            try:
                self._one_stream()
            except grpc.RpcError as err:
                code = err.code()
                if code not in _TRANSIENT and not is_transient(err):
                    raise FeedbackClientError(f"StreamFeedback failed: {code.name}: {err.details()}", code) from None
                why, hint = f"{code.name}: {err.details()}", retry_hint_s(err)
            else:
                with self._cond:
                    done = self._exhausted and not self._unacked
                if done:
                    break
                why, code = "the server ended the stream with batches unacked", None
            # Resume after a pause, as after any transient failure: a server that keeps ending
            # streams early must not be called again in a tight loop.
            if len(self._results) > acked_before:
                last_progress = time.monotonic()
                delays = self._client.backoff.delays()
            if time.monotonic() - last_progress > give_up:
                raise FeedbackClientError(f"StreamFeedback: no batch acknowledged for {give_up:g}s; last failure: {why}", code) from None
            self.report.reconnects += 1
            time.sleep(hint or next(delays))
        for seq in sorted(self._results):
            self.report.results.extend(self._results[seq])
        self.report.batches = len(self._results)
        return self.report

    def _requests(self, attempt: int) -> Iterator[pb.FeedbackBatch]:
        with self._cond:
            resend = list(self._unacked.items())
        for seq, records in resend:
            yield pb.FeedbackBatch(sequence=seq, records=records)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: attempt != self._attempt or len(self._unacked) < self._window)
                if attempt != self._attempt:
                    return
                nxt = next(self._source, None)
                if nxt is None:
                    self._exhausted = True
                    return
                seq, records = nxt
                self._unacked[seq] = records
            yield pb.FeedbackBatch(sequence=seq, records=records)

    def _one_stream(self) -> None:
        with self._cond:
            self._attempt += 1
            attempt = self._attempt
        responses = self._client._stub.StreamFeedback(self._requests(attempt), metadata=self._client._metadata)
        try:
            for ack in responses:
                with self._cond:
                    records = self._unacked.pop(ack.sequence, None)
                    self._cond.notify_all()
                if records is None:
                    continue  # an ack for a batch acked on an earlier stream
                self._results[ack.sequence] = list(ack.results)
                if self._on_ack is not None:
                    self._on_ack(ack)
        finally:
            with self._cond:
                self._attempt += 1  # releases this attempt's request generator
                self._cond.notify_all()
            responses.cancel()


def _pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def results_summary(results: Sequence[pb.RecordResult]) -> dict[str, int]:
    names = {
        pb.RecordResult.STATUS_ACCEPTED: "accepted",
        pb.RecordResult.STATUS_DUPLICATE: "duplicate",
        pb.RecordResult.STATUS_REJECTED: "rejected",
    }
    summary = {"accepted": 0, "duplicate": 0, "rejected": 0}
    for r in results:
        summary[names.get(r.status, "rejected")] += 1
    return summary
