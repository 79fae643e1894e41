"""The adapters' durable outbox: a delivery is answered only once its records are on disk
here, and a forwarder moves them to the feedback service whenever it can.

Why: Label Studio never redelivers a webhook, and Argilla stops after 3 tries, so a
delivery answered with an error during a feedback-service outage is a judgement lost. The
outbox turns "the service is down" into "the service is late".

    outbox(seq, project, feedback_id, record, size, queued_at, attempts, last_error, next_try_at)
    dead_letter(seq, project, feedback_id, record, record_json, queued_at, rejected_at, field, reason)

One SQLite file (WAL, `synchronous=FULL`: a commit is fsynced before the webhook is
answered), created 0600 in a directory created 0700 (it holds people's judgements), locked
by one adapter process at a time (`<file>.lock`). A record leaves `outbox` only when the
service answered ACCEPTED or DUPLICATE for it (stored, now or before: the service
deduplicates on `feedback_id`, so a crash between its answer and the delete costs one
resend, never a second copy); a REJECTED record moves to `dead_letter` with the service's
field and reason, as resending it can never succeed. Any other failure (unreachable,
unauthenticated, overloaded) keeps the records and retries with backoff. A call the service
refuses as a whole for something a record carries (PERMISSION_DENIED for its project or
annotator, INVALID_ARGUMENT) is retried one record at a time, so that one such record waits
alone (with a backoff of its own, `next_try_at`) instead of holding up every record behind it.

A redelivery (same project and feedback_id) while the first copy waits is kept once; if its
content differs, the newer copy replaces the older (as a new row, so that a send of the
older one in flight cannot settle it): the service then decides, as it would have.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc
from google.protobuf import json_format

from hitl.feedback.v1 import feedback_pb2 as pb
from services.exposure import ExposureError, check_secret_file
from services.feedback.client import FeedbackClient, FeedbackClientError

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL,
    feedback_id TEXT NOT NULL,
    record BLOB NOT NULL,
    size INTEGER NOT NULL,
    queued_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    next_try_at REAL NOT NULL DEFAULT 0,
    UNIQUE (project, feedback_id)
);
CREATE TABLE IF NOT EXISTS dead_letter (
    seq INTEGER PRIMARY KEY,
    project TEXT NOT NULL,
    feedback_id TEXT NOT NULL,
    record BLOB NOT NULL,
    record_json TEXT NOT NULL,
    queued_at REAL NOT NULL,
    rejected_at REAL NOT NULL,
    field TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""
_DONE = (pb.RecordResult.STATUS_ACCEPTED, pb.RecordResult.STATUS_DUPLICATE)


class OutboxError(RuntimeError):
    """The outbox cannot be opened (locked by another adapter, unsafe file, not SQLite)."""


class OutboxFull(RuntimeError):
    """The outbox holds its maximum: the delivery is refused (503) rather than dropped later."""

    def __init__(self, depth: int, limit: int):
        super().__init__(f"the outbox holds {depth} records (at most {limit}): the feedback service is behind")
        self.depth = depth
        self.limit = limit


@dataclass(frozen=True)
class Queued:
    """A record waiting in the outbox."""

    seq: int
    record: pb.FeedbackRecord
    queued_at: float
    attempts: int = 0


@dataclass(frozen=True)
class DeadLetter:
    """A record the service rejected, with its reason; kept for a person to look at."""

    seq: int
    feedback_id: str
    record: pb.FeedbackRecord
    field: str
    reason: str
    rejected_at: float


@dataclass(frozen=True)
class Settled:
    """What one forwarded batch came to."""

    stored: int  # ACCEPTED or DUPLICATE: deleted from the outbox
    rejected: int  # moved to dead_letter
    kept: int  # no usable answer: stays for the next try


def _private_file(path: Path) -> None:
    """Create `path` (and missing parents) for its owner alone: parents 0700, the file 0600.
    An existing file that others may read is refused, as the store refuses it."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    if path.exists():
        try:
            check_secret_file(path, "outbox (--outbox)")
        except ExposureError as err:
            raise OutboxError(str(err)) from None
    else:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


class Outbox:
    """The outbox file; every method is thread-safe (handlers and the forwarder call it
    from worker threads, so the event loop never waits on an fsync)."""

    def __init__(self, path: str | os.PathLike, max_records: int = 100_000):
        self.path = Path(path).expanduser()
        self.max_records = max_records
        _private_file(self.path)
        self._lockfile = self._lock()
        try:
            self._conn = self._connect()
        except sqlite3.DatabaseError as err:
            self._unlock()
            raise OutboxError(f"outbox (--outbox): {self.path}: {err}") from None
        self._mutex = threading.Lock()

    def _lock(self):
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        handle = os.fdopen(fd, "r+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise OutboxError(f"outbox (--outbox): another adapter uses {self.path}") from None
        return handle

    def _unlock(self) -> None:
        fcntl.flock(self._lockfile.fileno(), fcntl.LOCK_UN)
        self._lockfile.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        return conn

    def close(self) -> None:
        with self._mutex:
            self._conn.close()
            self._unlock()

    # -- writing --------------------------------------------------------------------------

    def put(self, records: Sequence[pb.FeedbackRecord]) -> int:
        """Durably queue `records` (one fsynced transaction) and return the outbox's depth.
        A record already queued (same project and feedback_id: a redelivery) is kept once,
        the newer content winning. OutboxFull when they would not fit: nothing of the
        delivery is queued then."""
        now = time.time()
        rows = [(r.project, r.feedback_id, r.SerializeToString(deterministic=True)) for r in records]
        with self._mutex:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                depth = self._depth()
                if depth + len(rows) > self.max_records:
                    raise OutboxFull(depth, self.max_records)
                self._conn.executemany("DELETE FROM outbox WHERE project = ? AND feedback_id = ? AND record != ?", rows)
                self._conn.executemany(
                    "INSERT OR IGNORE INTO outbox (project, feedback_id, record, size, queued_at) VALUES (?, ?, ?, ?, ?)",
                    [(project, fid, blob, len(blob), now) for project, fid, blob in rows])
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return self._depth()

    def settle(self, batch: Sequence[Queued], results: Sequence[pb.RecordResult | None]) -> Settled:
        """Apply the service's answers to a forwarded batch in one transaction: stored records
        are deleted, rejected ones move to dead_letter, the rest stay (attempt counted)."""
        if len(results) != len(batch):  # the service answers one result per record, in order
            results = [None] * len(batch)
        stored = rejected = kept = 0
        now = time.time()
        with self._mutex:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for q, result in zip(batch, results):
                    if result is not None and result.feedback_id != q.record.feedback_id:
                        result = None  # not this record's answer
                    if result is not None and result.status in _DONE:
                        self._conn.execute("DELETE FROM outbox WHERE seq = ?", (q.seq,))
                        stored += 1
                    elif result is not None and result.status == pb.RecordResult.STATUS_REJECTED:
                        self._bury(q, result, now)
                        rejected += 1
                    else:
                        self._conn.execute("UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?",
                                           ("no answer for this record", q.seq))
                        kept += 1
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return Settled(stored, rejected, kept)

    def _bury(self, q: Queued, result: pb.RecordResult, now: float) -> None:
        if self._conn.execute("DELETE FROM outbox WHERE seq = ?", (q.seq,)).rowcount == 0:
            # a redelivery with new content replaced it while it was being sent: the newer copy decides
            log.info("record %s was rejected (%s: %s) but a newer copy waits", q.record.feedback_id, result.field, result.reason)
            return
        self._conn.execute(
            "INSERT OR REPLACE INTO dead_letter (seq, project, feedback_id, record, record_json, queued_at, rejected_at, field, reason) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (q.seq, q.record.project, q.record.feedback_id, q.record.SerializeToString(deterministic=True),
             json_format.MessageToJson(q.record, indent=None), q.queued_at, now, result.field, result.reason))
        log.error("feedback service rejected record %s (project %s, task %s): %s: %s; kept in %s, table dead_letter",
                  q.record.feedback_id, q.record.project, q.record.task_id, result.field, result.reason, self.path)

    def note_failure(self, batch: Sequence[Queued], error: str, retry_after_s: Sequence[float] | None = None) -> None:
        """Count a failed try on each record of the batch (they stay queued); with
        `retry_after_s`, each is not taken again before its delay has passed."""
        now = time.time()
        delays = retry_after_s or [0.0] * len(batch)
        with self._mutex:
            self._conn.executemany("UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_try_at = ? WHERE seq = ?",
                                   [(error[:500], now + d, q.seq) for q, d in zip(batch, delays)])

    # -- reading --------------------------------------------------------------------------

    def take(self, max_records: int, max_bytes: int) -> list[Queued]:
        """The oldest records due for a try, at most `max_records` and `max_bytes` of them (at
        least one): a batch the service accepts as one message."""
        with self._mutex:
            rows = self._conn.execute(
                "SELECT seq, record, size, queued_at, attempts FROM outbox WHERE next_try_at <= ? ORDER BY seq LIMIT ?",
                (time.time(), max_records)).fetchall()
        batch, total = [], 0
        for seq, blob, size, queued_at, attempts in rows:
            if batch and total + size > max_bytes:
                break
            batch.append(Queued(seq, pb.FeedbackRecord.FromString(blob), queued_at, attempts))
            total += size
        return batch

    def _depth(self) -> int:
        return self._conn.execute("SELECT count(*) FROM outbox").fetchone()[0]

    def depth(self) -> int:
        with self._mutex:
            return self._depth()

    def next_due_s(self) -> float | None:
        """Seconds until the next record is due for a try (0: now); None when none is queued."""
        with self._mutex:
            at = self._conn.execute("SELECT min(next_try_at) FROM outbox").fetchone()[0]
        return None if at is None else max(0.0, at - time.time())

    def dead_letter_count(self) -> int:
        with self._mutex:
            return self._conn.execute("SELECT count(*) FROM dead_letter").fetchone()[0]

    def dead_letters(self) -> list[DeadLetter]:
        with self._mutex:
            rows = self._conn.execute(
                "SELECT seq, feedback_id, record, field, reason, rejected_at FROM dead_letter ORDER BY seq").fetchall()
        return [DeadLetter(seq, fid, pb.FeedbackRecord.FromString(blob), field, reason, at)
                for seq, fid, blob, field, reason, at in rows]


# --------------------------------------------------------------------------- forwarding


@dataclass(frozen=True)
class ForwardPolicy:
    """How the forwarder batches and backs off. A batch stays under the service's default
    4 MiB message limit; the backoff keeps an outage from becoming a busy loop."""

    batch_records: int = 200
    batch_bytes: int = 2 * 1024 * 1024
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    idle_poll_s: float = 5.0  # a safety net: a wake-up is what normally starts a send


class Forwarder:
    """Moves queued records to the feedback service, oldest first, until cancelled."""

    def __init__(self, outbox: Outbox, client: FeedbackClient, policy: ForwardPolicy | None = None):
        self.outbox = outbox
        self.client = client
        self.policy = policy or ForwardPolicy()
        self.last_error: str | None = None
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """New records were queued: send them now (unless backing off after a failure)."""
        self._wake.set()

    async def run(self) -> None:
        delay = self.policy.initial_backoff_s
        while True:
            try:
                if await self.forward_once() == 0:
                    await self._idle()
            except Exception as err:  # noqa: BLE001 - a forwarder that dies would strand the outbox unnoticed
                self.last_error = str(err) or type(err).__name__
                wait = delay * (0.5 + random.random() / 2)
                log.warning("forwarding to the feedback service failed: %s; %s records wait in the outbox; next try in %.1f s",
                            self.last_error, await self._depth_for_log(), wait, exc_info=not isinstance(err, FeedbackClientError))
                await asyncio.sleep(wait)
                delay = min(self.policy.max_backoff_s, delay * 2)
                continue
            delay = self.policy.initial_backoff_s

    async def _depth_for_log(self) -> str:
        try:
            return str(await asyncio.to_thread(self.outbox.depth))
        except sqlite3.Error as err:
            return f"? ({err})"

    async def _idle(self) -> None:
        """Wait for a wake-up, the next deferred record's time, or the poll interval."""
        self._wake.clear()
        due_in = await asyncio.to_thread(self.outbox.next_due_s)
        if due_in == 0:  # queued between the take and the clear
            return
        try:
            await asyncio.wait_for(self._wake.wait(), min(self.policy.idle_poll_s, due_in or self.policy.idle_poll_s))
        except asyncio.TimeoutError:
            pass

    async def forward_once(self) -> int:
        """Send one batch and settle it; the number of records it held (0: none due).
        FeedbackClientError when the service did not answer (the batch stays queued)."""
        batch = await asyncio.to_thread(self.outbox.take, self.policy.batch_records, self.policy.batch_bytes)
        if not batch:
            return 0
        try:
            await self._send(batch)
        except FeedbackClientError as err:
            if not refuses_a_record(err):
                await asyncio.to_thread(self.outbox.note_failure, batch, str(err))
                raise
            await self._isolate(batch, err)
        self.last_error = None
        return len(batch)

    async def _send(self, batch: list[Queued]) -> None:
        results = await asyncio.to_thread(self.client.submit, [q.record for q in batch])
        settled = await asyncio.to_thread(self.outbox.settle, batch, results)
        if settled.kept:
            raise FeedbackClientError(f"{settled.kept} records of a batch got no answer")
        log.info("forwarded %d records (%d rejected)", settled.stored + settled.rejected, settled.rejected)

    async def _isolate(self, batch: list[Queued], err: FeedbackClientError) -> None:
        """The service refused a whole call for something a record carries: send the records
        one by one, so that those it refuses wait alone (each with its own backoff). When it
        refuses all of them, the cause is not one record (a token without the project, say):
        FeedbackClientError, and the forwarder backs off as for an outage."""
        if len(batch) == 1:
            await self._defer(batch[0], err)
            raise err
        refused = 0
        for q in batch:
            try:
                await self._send([q])
            except FeedbackClientError as one:
                if not refuses_a_record(one):
                    await asyncio.to_thread(self.outbox.note_failure, [q], str(one))
                    raise
                await self._defer(q, one)
                refused += 1
        if refused == len(batch):
            raise err

    async def _defer(self, q: Queued, err: FeedbackClientError) -> None:
        delay = min(self.policy.max_backoff_s, self.policy.initial_backoff_s * 2 ** min(q.attempts, 30))
        r = q.record
        log.error("feedback service refused record %s (project %s, annotator %s): %s; it stays in the outbox, next try in %.0f s",
                  r.feedback_id, r.project, r.annotator_id, err, delay)
        await asyncio.to_thread(self.outbox.note_failure, [q], str(err), [delay])


# whole-call refusals that come from what a record carries, not from the service's state
RECORD_CODES = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE}


def refuses_a_record(err: FeedbackClientError) -> bool:
    return err.code in RECORD_CODES
