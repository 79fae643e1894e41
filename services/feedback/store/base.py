"""The feedback store: one SQL implementation over two real backends.

`SqlStore` holds every query; a `Dialect` supplies what differs between SQLite
and PostgreSQL (connections, DDL types, locking). All writes of one batch
happen in one transaction, so either every accepted record of the batch is
durable or none is (and none is acked).

Guarantees kept here:
* `(project, feedback_id)` is unique: a resent record is stored once.
* `seq` increases in commit order (writers are serialised: SQLite by its write
  lock, PostgreSQL by the store's own transaction-level advisory lock), so a reader that
  has seen everything up to watermark W never misses a record committed later
  with a smaller seq; `read_after(W)` is an index range scan, O(new records).
* Record counts by project, kind and annotator are maintained in the same
  transaction, so `stats()` costs O(groups), not O(records).
"""

from __future__ import annotations

import functools
import hashlib
import operator
import threading
import time
from collections import Counter, defaultdict
from itertools import repeat
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Protocol, Sequence, Union

from hitl.feedback.v1 import feedback_pb2 as pb

from services.exposure import redact_url
from services.feedback.records import (
    GoldAnswer,
    Limits,
    Rejection,
    StoredRecord,
    Task,
    check_against_task,
    check_record,
    check_task,
    plain_fields,
)

SCHEMA_VERSION = 2
_IN_CHUNK = 500  # ids per IN (...) list
_sha256 = hashlib.sha256



class PreparedRow(NamedTuple):
    """One record ready for `SqlStore.write_prepared` (see `SqlStore.prepare`). The first seven
    fields are the row's columns; the writer's passes over a whole group read fields by
    position with C-level accessors (`_KEY`, `_COLUMNS`, ...), so the order is part of the type."""

    project: str
    feedback_id: str
    kind: str
    task_id: str
    annotator_id: str
    content_hash: bytearray  # sha256 of `blob`
    blob: bytearray  # the record's stored serialisation
    record: pb.FeedbackRecord
    prompt_id: str | None  # read by `plain_fields`; None when prepare did not read the record's fields
    refs: frozenset[str] | None  # the candidate ids the record names; None as prompt_id (the writer then runs check_against_task)


_new_row = functools.partial(tuple.__new__, PreparedRow)  # PreparedRow(*fields) without its Python-level __new__

_ANSWERED_CACHE_PAIRS = 100_000  # (task, annotator) pairs known answered, kept in memory at most (~20 MB)


class StoreError(RuntimeError):
    """The store cannot serve the request (schema, connection, corruption)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached now (down, restarting, network); retry later.

    Nothing of the failed call was committed, or (a connection lost during its
    commit) it may have been: either way nothing was acknowledged, and a resend
    is deduplicated on (project, feedback_id).
    """


class _KeyExists(Exception):
    """An optimistic insert met a stored (project, feedback_id); see SqlStore._write_locked."""


class Status(Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


class Outcome(NamedTuple):
    """What happened to one record of a written batch.

    A named tuple rather than a dataclass: one is made per ingested record, and
    a tuple is several times cheaper to build than a frozen dataclass.
    """

    status: Status
    seq: int = 0  # store position, for ACCEPTED and DUPLICATE
    rejection: Rejection | None = None


Prepared = Union[Outcome, PreparedRow]
"""A record after `SqlStore.prepare`: its Outcome when it was rejected there, else its row."""


@dataclass(frozen=True)
class TaskOutcome:
    """What happened to one published task."""

    created: bool
    rejection: Rejection | None = None


@dataclass(frozen=True)
class LeasedTask:
    task: Task
    lease_expires_at: float  # seconds since the epoch


@dataclass(frozen=True)
class OpenTask:
    """A task that still wants judgements, and how many of them are leased now."""

    task: Task
    leased: int  # unanswered leases that have not expired
    created_at: float  # seconds since the epoch
    done: int = 0  # judgements already counted towards annotations_wanted

    @property
    def available(self) -> int:
        """Judgements an annotator could still pull for it now."""
        return max(0, self.task.annotations_wanted - self.leased - self.done)


@dataclass(frozen=True)
class StoreStats:
    total_records: int
    by_kind: dict[str, int]
    by_project: dict[str, int]
    by_annotator: dict[str, int]
    watermark: int
    open_tasks: int


class FeedbackStore(Protocol):
    """What the service needs of a store; both backends implement it."""

    url: str

    def write_batch(self, records: Sequence[pb.FeedbackRecord]) -> list[Outcome]: ...
    def prepare(self, records: Sequence[pb.FeedbackRecord], blobs: Sequence[Any] | None = None) -> list[Any]: ...
    def write_prepared(self, items: Sequence[Any]) -> list[Outcome]: ...
    def read_after(self, watermark: int, limit: int = 1000, projects: Iterable[str] | None = None) -> list[StoredRecord]: ...
    def watermark(self) -> int: ...
    def add_tasks(self, tasks: Sequence[Task]) -> list[TaskOutcome]: ...
    def lease_tasks(self, project: str, annotator_id: str, max_tasks: int, lease_seconds: float) -> list[LeasedTask]: ...
    def get_task(self, task_id: str) -> Task | None: ...
    def open_tasks(self, project: str, id_prefix: str = "") -> list[OpenTask]: ...
    def task_count(self, project: str, id_prefix: str = "", include_retired: bool = True) -> int: ...
    def retire_tasks(self, task_ids: Iterable[str]) -> int: ...
    def leased_pairs(self, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]: ...
    def gold_answers(self, projects: Iterable[str] | None = None) -> dict[str, GoldAnswer]: ...
    def stats(self, projects: Iterable[str] | None = None) -> StoreStats: ...
    def schema_version(self) -> int: ...
    def close(self) -> None: ...


class Dialect(Protocol):
    """What differs between the SQL backends."""

    name: str
    seq_column: str  # DDL of the auto-increasing primary key
    blob: str  # DDL type of binary columns
    real: str  # DDL type of float columns

    def connect(self) -> Any: ...
    def sql(self, statement: str) -> str: ...  # placeholder translation
    def begin_write(self, conn: Any) -> None: ...  # start a serialised write transaction
    def begin_read(self, conn: Any) -> None: ...
    def committed(self, conn: Any) -> None: ...  # after each committed write of feedback
    def close(self) -> None: ...  # the store closes: stop what the dialect runs of its own
    def is_broken(self, conn: Any) -> bool: ...  # the connection is lost (server restarted, network cut)
    # (statement, args) selecting (feedback_id, seq, content_hash) of these ids in project, probing the
    # unique (project, feedback_id) index once per id whatever the table's statistics say
    def find_feedback_ids(self, project: str, ids: list[str]) -> tuple[str, tuple]: ...
    # (statement, args) selecting (task_id, annotator_id, answered) of the leases of these
    # (task_id, annotator_id) pairs, one probe of the leases primary key per pair
    def find_leases(self, pairs: list[tuple[str, str]]) -> tuple[str, tuple]: ...
    # insert rows into `table` (keyed by `seq`) as one statement batch; returns their seqs in row order
    def insert_returning(self, cur: Any, table: str, statement: str, rows: list[tuple]) -> list[int]: ...
    # None, or: insert_returning, except that a row whose `unique` columns exist is skipped, and then
    # it returns None (the caller rolls back); see SqlStore._write_locked
    insert_new: Any


def _migrations(d: Dialect) -> dict[int, list[str]]:
    """Schema migrations by target version; each runs in one transaction."""
    return {
        1: [
            f"""CREATE TABLE feedback (
                seq {d.seq_column},
                project TEXT NOT NULL,
                feedback_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                task_id TEXT NOT NULL,
                annotator_id TEXT NOT NULL,
                content_hash {d.blob} NOT NULL,
                record {d.blob} NOT NULL,
                received_at {d.real} NOT NULL,
                UNIQUE (project, feedback_id)
            )""",
            """CREATE TABLE feedback_counts (
                project TEXT NOT NULL,
                kind TEXT NOT NULL,
                annotator_id TEXT NOT NULL,
                n BIGINT NOT NULL,
                PRIMARY KEY (project, kind, annotator_id)
            )""",
            f"""CREATE TABLE tasks (
                task_id TEXT PRIMARY KEY,
                project TEXT NOT NULL,
                prompt_id TEXT NOT NULL,
                task {d.blob} NOT NULL,
                annotations_wanted INTEGER NOT NULL,
                annotations_done INTEGER NOT NULL,
                is_open INTEGER NOT NULL,
                created_at {d.real} NOT NULL,
                created_order BIGINT NOT NULL
            )""",
            "CREATE INDEX tasks_open ON tasks (project, is_open, created_order)",
            f"""CREATE TABLE leases (
                task_id TEXT NOT NULL,
                annotator_id TEXT NOT NULL,
                expires_at {d.real} NOT NULL,
                answered INTEGER NOT NULL,
                PRIMARY KEY (task_id, annotator_id)
            )""",
            "CREATE INDEX leases_by_annotator ON leases (annotator_id, task_id)",
        ],
        # gold answers live apart from the task message that annotators are sent
        2: [
            """CREATE TABLE gold_answers (
                task_id TEXT PRIMARY KEY,
                project TEXT NOT NULL,
                better TEXT
            )""",
            "CREATE INDEX gold_answers_by_project ON gold_answers (project, task_id)",
        ],
    }


class _Reconnect:
    """Spacing of connection attempts while the database is down: 0.1 s, doubling up to 1 s.

    Shared by the store's threads, so a down database sees one attempt per
    delay, not one per call; the cap keeps the wait after the database
    returns short (writes resume within a second of it answering).
    """

    first_s = 0.1
    max_s = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._delay = 0.0
        self._not_before = 0.0

    def attempt(self, connect: Callable[[], Any], where: str) -> Any:
        with self._lock:
            wait = self._not_before - time.monotonic()
        if wait > 0:
            raise StoreUnavailable(f"store {where}: unreachable; next connection attempt in {wait:.1f}s")
        try:
            conn = connect()
        except StoreError:
            raise
        except Exception as err:  # noqa: BLE001 - the driver's own errors: refused, reset, starting up
            with self._lock:
                self._delay = min(self.max_s, max(self.first_s, self._delay * 2))
                self._not_before = time.monotonic() + self._delay
            raise StoreUnavailable(f"store {where}: cannot connect ({type(err).__name__}: {_first_line(err)})") from err
        with self._lock:
            self._delay = 0.0
            self._not_before = 0.0
        return conn


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


class SqlStore:
    """The store over a DB-API connection per thread; see the module docstring."""

    clock: Callable[[], float] = staticmethod(time.time)
    """Seconds since the epoch: when a record is received and when a lease runs out (tests
    replace it to move time instead of waiting)."""

    def __init__(self, url: str, dialect: Dialect, limits: Limits | None = None, task_cache_size: int = 100_000):
        self.url = url
        self._d = dialect
        self.limits = limits or Limits()
        self._local = threading.local()
        self._conns: list[Any] = []
        self._conns_lock = threading.Lock()
        self._task_cache: dict[str, Task] = {}
        self._task_cache_size = task_cache_size
        self._answered: set[tuple[str, str]] = set()  # pairs a committed write saw answered (see _mark_answered)
        self._reconnect = _Reconnect()
        self._migrate()

    # -- connections --------------------------------------------------------

    def _conn(self) -> Any:
        """This thread's connection; a lost one is dropped and opened again (with backoff).

        A database restart or fail-over breaks every open connection: the call
        that meets the break fails (nothing of it acknowledged), and the next
        call of the thread connects afresh. While the database stays down,
        attempts are spaced by a growing delay (`_Reconnect`), and calls in
        between fail at once with StoreUnavailable rather than each waiting on
        a connect.
        """
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._d.is_broken(conn):
            self._drop(conn)
            conn = None
        if conn is None:
            conn = self._reconnect.attempt(self._d.connect, redact_url(self.url))
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _drop(self, conn: Any) -> None:
        self._local.conn = None
        with self._conns_lock:
            if conn in self._conns:
                self._conns.remove(conn)
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - it is lost already
            pass

    def _rollback(self, conn: Any) -> None:
        """End the transaction; on a lost connection there is none left to end."""
        try:
            conn.rollback()
        except Exception:
            if not self._d.is_broken(conn):
                raise

    def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers now (the service's health check)."""
        conn = self._conn()
        try:
            cur = conn.cursor()
            cur.execute("SELECT 1")
            cur.fetchone()
        except Exception as err:
            if self._d.is_broken(conn):
                raise StoreUnavailable(f"store {redact_url(self.url)}: connection lost ({type(err).__name__})") from err
            raise
        finally:
            self._rollback(conn)

    def close(self) -> None:
        self._d.close()
        with self._conns_lock:
            for conn in self._conns:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
            self._conns.clear()
        self._local = threading.local()

    def _q(self, statement: str) -> str:
        return self._d.sql(statement)

    # -- schema -------------------------------------------------------------

    def _migrate(self) -> None:
        conn = self._conn()
        cur = conn.cursor()
        self._d.begin_write(conn)
        try:
            cur.execute("CREATE TABLE IF NOT EXISTS hitl_schema (version INTEGER NOT NULL)")
            cur.execute("SELECT version FROM hitl_schema")
            row = cur.fetchone()
            current = row[0] if row else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"store {redact_url(self.url)} has schema version {current}; this hitl knows up to {SCHEMA_VERSION}: upgrade hitl"
                )
            for version, statements in sorted(_migrations(self._d).items()):
                if version <= current:
                    continue
                for statement in statements:
                    cur.execute(statement)
            if row is None:
                cur.execute(self._q("INSERT INTO hitl_schema (version) VALUES (?)"), (SCHEMA_VERSION,))
            elif current < SCHEMA_VERSION:
                cur.execute(self._q("UPDATE hitl_schema SET version = ?"), (SCHEMA_VERSION,))
            conn.commit()
        except BaseException:
            self._rollback(conn)
            raise

    def schema_version(self) -> int:
        cur = self._conn().cursor()
        cur.execute("SELECT version FROM hitl_schema")
        version = cur.fetchone()[0]
        self._rollback(self._conn())
        return int(version)

    # -- feedback -----------------------------------------------------------

    def write_batch(self, records: Sequence[pb.FeedbackRecord]) -> list[Outcome]:
        """Validate and store records in one transaction; one outcome per record.

        The same as `write_prepared(prepare(records))`.
        """
        return self.write_prepared(self.prepare(records))

    def prepare(self, records: Sequence[pb.FeedbackRecord], blobs: Sequence[Any] | None = None) -> list[Prepared]:
        """Validate, serialise and hash records for `write_prepared`; one item per record.

        Everything here needs only the records, never the database, so it can
        run on any thread and before the write lock is taken: the service's
        committer prepares each batch on the event loop as it arrives, while
        the writer thread is busy with the previous group's transaction. An
        item is the record's `Outcome` when it was rejected here, else the row
        the store keeps: (project, feedback_id, kind, task_id, annotator_id,
        content hash, serialised record, the record, ...).

        `blobs`, when given, are the records' serialisations as they arrived
        (`records.wire_records`, one bytes-like per record, each of which
        parses to its record): they are stored as they are instead of
        serialising each record again. They need not be canonical: the
        content hash is the hash of the stored bytes, and a resend whose hash
        differs is compared with the stored record itself (`_resend`).
        """
        limits = self.limits
        items: list[Prepared] = []
        append = items.append
        if blobs is None or len(blobs) != len(records):
            blobs = [record.SerializeToString(deterministic=True) for record in records]
        for record, blob in zip(records, blobs):
            fields = plain_fields(record, limits, len(blob))
            if fields is None:
                rejection = check_record(record, limits)
                if rejection is not None:
                    append(Outcome(Status.REJECTED, 0, rejection))
                    continue
                # no prompt_id and candidate ids at hand: the writer runs the full task checks
                project, feedback_id, kind, task_id, annotator_id, prompt_id, refs = (
                    record.project, record.feedback_id, record.WhichOneof("judgement"), record.task_id, record.annotator_id, None, None
                )
            else:
                project, feedback_id, kind, task_id, annotator_id, prompt_id, refs = fields
            # The content hash is records.content_hash(record), without serialising twice. Both
            # go to the database as bytearrays: Python's sqlite3 binds str, int, float and
            # bytearray directly but looks for an adapter for every bytes parameter (a raised
            # and cleared AttributeError each time), which made up half of the insert's
            # binding cost.
            append(_new_row(
                (project, feedback_id, kind, task_id, annotator_id, bytearray(_sha256(blob).digest()), bytearray(blob), record, prompt_id, refs)
            ))
        return items

    def write_prepared(self, items: Sequence[Prepared]) -> list[Outcome]:
        """Store prepared records (`prepare`) in one transaction; one outcome per item, in order.

        Inside the write lock every step is one statement batch for the whole
        group, not one round trip per record.
        """
        if Outcome in set(map(type, items)):
            outcomes: list[Outcome | None] = [item if type(item) is Outcome else None for item in items]
            if all(o is not None for o in outcomes):
                return outcomes  # type: ignore[return-value]  # nothing to write
        else:
            outcomes = [None] * len(items)  # every item is a row (the common group)
        conn = self._conn()
        self._d.begin_write(conn)
        try:
            try:
                answered = self._write_locked(conn, items, outcomes, optimistic=self._d.insert_new is not None)
            except _KeyExists:
                # a record of the group was stored before (a resend): start over, with the lookup
                self._rollback(conn)
                self._d.begin_write(conn)
                answered = self._write_locked(conn, items, outcomes, optimistic=False)
            conn.commit()
        except BaseException:
            self._rollback(conn)
            raise
        self._d.committed(conn)
        if answered:
            self._remember_answered(answered)
        if None in outcomes:  # cannot happen: every row is stored, a duplicate or rejected
            return [o if o is not None else Outcome(Status.REJECTED, rejection=Rejection("", "not processed")) for o in outcomes]
        return outcomes  # type: ignore[return-value]

    def _write_locked(
        self, conn: Any, items: Sequence[Prepared], outcomes: list[Outcome | None], optimistic: bool = False
    ) -> set[tuple[str, str]]:
        """The writes of `write_prepared`; fills `outcomes` where it holds None, and returns the
        (task, annotator) pairs that are answered once the transaction commits.

        A group usually has no duplicate (stored before or within the group) and no record that
        fails its task's checks: `_fits_tasks` finds that out with C-level passes over the rows
        (map, itemgetter, all), and the group is then inserted as it is. Otherwise the records are
        taken one by one, and the full checks name what is wrong with each rejected record.

        `optimistic` (where the dialect has `insert_new`): such a group is inserted without
        looking its ids up first; the insert skips a row whose (project, feedback_id) exists and
        reports it, and then this raises _KeyExists before touching `outcomes`, for the caller to
        roll back and start over without `optimistic`. A resend is rare; the lookup, one index
        probe per record, was paid by every group.
        """
        cur = conn.cursor()
        pending = [i for i, o in enumerate(outcomes) if o is None]
        rows = items if len(pending) == len(items) else [items[i] for i in pending]
        keys = list(map(_KEY, rows))  # (project, feedback_id)
        unique = len(set(keys)) == len(keys)
        tasks = self._tasks(cur, set(map(_TASK_ID, rows)))
        fit = unique and _fits_tasks(rows, tasks)
        existing = {} if optimistic and fit else self._existing(cur, keys)
        now = self.clock()
        copies: list[int] = []  # in-batch duplicates of a record inserted here
        in_batch: dict[tuple[str, str], int] = {}
        if fit and not existing:
            to_insert, inserted = pending, rows
        else:
            optimistic = False
            to_insert = []
            task_of = tasks.get
            for i in pending:
                item = items[i]
                key = _KEY(item)  # (project, feedback_id)
                if key in existing:
                    seq, digest = existing[key]
                    outcomes[i] = self._resend(cur, seq, digest, item)
                    continue
                if key in in_batch:
                    first = items[in_batch[key]]
                    if first.content_hash == item.content_hash or first.record == item.record:  # the same bytes, or the same record
                        copies.append(i)
                    else:
                        outcomes[i] = Outcome(Status.REJECTED, rejection=Rejection("feedback_id", "already used for a different record"))
                    continue
                task = task_of(item.task_id)
                refs = item.refs
                # As in _fits_tasks, from the fields prepare() read; anything else goes through
                # the full checks, which alone reject and name the field.
                if (
                    refs is None
                    or task is None
                    or task.project != item.project
                    or item.prompt_id not in task.record_prompt_ids
                    or not task.candidate_ids.issuperset(refs)
                ):
                    rejection = check_against_task(item.record, task, item.kind)
                    if rejection is not None:
                        outcomes[i] = Outcome(Status.REJECTED, rejection=rejection)
                        continue
                in_batch[key] = i
                to_insert.append(i)
            if not to_insert:
                return set()
            inserted = [items[i] for i in to_insert]
        statement = self._q(
            "INSERT INTO feedback (project, feedback_id, kind, task_id, annotator_id, content_hash, record, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        insert_rows = list(map(operator.add, map(_COLUMNS, inserted), repeat((now,))))
        if optimistic:
            new_seqs = self._d.insert_new(cur, "feedback", statement, insert_rows, "(project, feedback_id)")
            if new_seqs is None:
                raise _KeyExists()
            seqs = new_seqs
        else:
            seqs = self._d.insert_returning(cur, "feedback", statement, insert_rows)
        accepted = map(_new_outcome, zip(repeat(Status.ACCEPTED), seqs, repeat(None)))
        if len(to_insert) == len(outcomes):
            outcomes[:] = accepted
        else:
            for i, outcome in zip(to_insert, accepted):
                outcomes[i] = outcome
            # in-batch duplicates point at the stored copy
            for i in copies:
                outcomes[i] = Outcome(Status.DUPLICATE, outcomes[in_batch[_KEY(items[i])]].seq)  # type: ignore[union-attr]
        self._count(cur, list(map(_COUNT_KEY, inserted)))
        return self._mark_answered(cur, list(map(_PAIR, inserted)), now)

    def _resend(self, cur: Any, seq: int, stored_digest: bytes, item: PreparedRow) -> Outcome:
        """The outcome of a record whose (project, feedback_id) is stored at `seq`: a duplicate
        when it is the stored record, else rejected.

        Equal hashes mean equal bytes. Different bytes may still be the same record
        (serialised by another client, map entries in another order, or stored
        canonically while this one arrived as sent), so the stored record is read and
        compared field by field; this runs for resends only.
        """
        if bytes(stored_digest) == item.content_hash:
            return Outcome(Status.DUPLICATE, seq=seq)
        cur.execute(self._q("SELECT record FROM feedback WHERE seq = ?"), (seq,))
        row = cur.fetchone()
        if row is not None and pb.FeedbackRecord.FromString(bytes(row[0])) == item.record:
            return Outcome(Status.DUPLICATE, seq=seq)
        return Outcome(Status.REJECTED, rejection=Rejection("feedback_id", "already used for a different record"))

    def _existing(self, cur: Any, keys: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[int, bytes]]:
        by_project: dict[str, list[str]] = defaultdict(list)
        for project, fid in keys:
            by_project[project].append(fid)
        found: dict[tuple[str, str], tuple[int, bytes]] = {}
        for project, ids in by_project.items():
            for start in range(0, len(ids), _IN_CHUNK):
                cur.execute(*self._d.find_feedback_ids(project, ids[start : start + _IN_CHUNK]))
                for fid, seq, digest in cur.fetchall():
                    found[(project, fid)] = (int(seq), bytes(digest))
        return found

    def _tasks(self, cur: Any, task_ids: set[str]) -> dict[str, Task]:
        """The known tasks among task_ids, by id (a task never changes once published, so a cached one is current)."""
        cache = self._task_cache
        missing = list(task_ids - cache.keys())
        if not missing:
            return cache  # holds every one of them (and more)
        found = {tid: cache[tid] for tid in task_ids if tid in cache}
        for start in range(0, len(missing), _IN_CHUNK):
            chunk = missing[start : start + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            cur.execute(
                self._q(
                    "SELECT t.task, t.annotations_wanted, g.task_id, g.better FROM tasks t"
                    f" LEFT JOIN gold_answers g ON g.task_id = t.task_id WHERE t.task_id IN ({marks})"
                ),
                chunk,
            )
            for blob, wanted, gold_id, better in cur.fetchall():
                task = _task_from_blob(blob, wanted, _gold(gold_id, better))
                found[task.task_id] = task
                self._cache_task(task)
        return found

    def _cache_task(self, task: Task) -> None:
        if len(self._task_cache) >= self._task_cache_size:
            # a new dict, not clear(): `_tasks` may have handed the old one to a writer in progress
            self._task_cache = {}
        self._task_cache[task.task_id] = task

    def _count(self, cur: Any, keys: list[tuple[str, str, str]]) -> None:
        """Add the new records to feedback_counts; keys are (project, kind, annotator_id), one per record."""
        counts = Counter(keys)
        cur.executemany(
            self._q(
                "INSERT INTO feedback_counts (project, kind, annotator_id, n) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (project, kind, annotator_id) DO UPDATE SET n = feedback_counts.n + excluded.n"
            ),
            [(*key, n) for key, n in counts.items()],
        )

    def _mark_answered(self, cur: Any, pairs: list[tuple[str, str]], now: float) -> set[tuple[str, str]]:
        """Close the annotator's lease on each judged task; count each annotator once per task.

        `pairs` are the (task_id, annotator_id) of the new records. A pair
        counts towards its task's annotations_done only the first time it is
        answered (no lease, or a lease not yet answered); a task whose count
        reaches annotations_wanted closes. One lookup and three statement
        batches for the whole group, with the same end state as handling the
        records one by one.

        Pairs that an earlier committed write saw answered are skipped without
        a lookup: a lease's `answered` only ever goes from 0 to 1 and a lease is
        never deleted, so such a pair has nothing left to do, whoever wrote
        since (another process included). Returns the pairs that are answered
        once this transaction commits; `write_prepared` remembers them then.
        """
        wanted = set(pairs)
        known = self._answered
        if known:
            wanted -= known
        if not wanted:
            return wanted
        answered: dict[tuple[str, str], int] = {}
        ordered = sorted(wanted)
        for start in range(0, len(ordered), _IN_CHUNK):
            # the leases of these pairs only (one index probe per pair), not every lease of their tasks
            cur.execute(*self._d.find_leases(ordered[start : start + _IN_CHUNK]))
            for task_id, annotator_id, done in cur.fetchall():
                answered[(task_id, annotator_id)] = int(done)
        new = sorted(pair for pair in wanted if pair not in answered)
        leased = sorted(pair for pair in wanted if answered.get(pair) == 0)
        if new:
            cur.executemany(
                self._q("INSERT INTO leases (task_id, annotator_id, expires_at, answered) VALUES (?, ?, ?, 1)"),
                [(task_id, annotator_id, now) for task_id, annotator_id in new],
            )
        if leased:
            cur.executemany(self._q("UPDATE leases SET answered = 1 WHERE task_id = ? AND annotator_id = ?"), leased)
        per_task: dict[str, int] = defaultdict(int)
        for task_id, _ in new + leased:
            per_task[task_id] += 1
        if per_task:
            cur.executemany(
                self._q(
                    "UPDATE tasks SET annotations_done = annotations_done + ?,"
                    " is_open = CASE WHEN annotations_done + ? >= annotations_wanted THEN 0 ELSE 1 END"
                    " WHERE task_id = ?"
                ),
                [(n, n, task_id) for task_id, n in sorted(per_task.items())],
            )
        return wanted

    def leased_pairs(self, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """The (task_id, annotator_id) pairs among `pairs` whose annotator was ever handed the task
        (a lease, expired or answered, or an earlier answer)."""
        wanted = sorted(set(pairs))
        found: set[tuple[str, str]] = set()
        conn = self._conn()
        cur = conn.cursor()
        self._d.begin_read(conn)
        try:
            for start in range(0, len(wanted), _IN_CHUNK):
                cur.execute(*self._d.find_leases(wanted[start : start + _IN_CHUNK]))
                found.update((task_id, annotator_id) for task_id, annotator_id, _ in cur.fetchall())
        finally:
            self._rollback(conn)
        return found

    def _remember_answered(self, pairs: set[tuple[str, str]]) -> None:
        """After a commit: these (task, annotator) pairs are answered for good (see `_mark_answered`)."""
        if len(self._answered) + len(pairs) > _ANSWERED_CACHE_PAIRS:
            self._answered = set()
        self._answered |= pairs

    def read_after(self, watermark: int, limit: int = 1000, projects: Iterable[str] | None = None) -> list[StoredRecord]:
        """Records with seq > watermark in seq order, at most `limit` (an index range scan)."""
        conn = self._conn()
        cur = conn.cursor()
        self._d.begin_read(conn)
        try:
            if projects is None:
                cur.execute(
                    self._q("SELECT seq, record, received_at FROM feedback WHERE seq > ? ORDER BY seq LIMIT ?"),
                    (watermark, limit),
                )
            else:
                names = sorted(set(projects))
                if not names:
                    return []
                marks = ", ".join("?" * len(names))
                cur.execute(
                    self._q(
                        f"SELECT seq, record, received_at FROM feedback WHERE seq > ? AND project IN ({marks})"
                        " ORDER BY seq LIMIT ?"
                    ),
                    (watermark, *names, limit),
                )
            rows = cur.fetchall()
        finally:
            self._rollback(conn)
        return [StoredRecord(int(seq), pb.FeedbackRecord.FromString(bytes(blob)), float(at)) for seq, blob, at in rows]

    def iter_after(self, watermark: int = 0, projects: Iterable[str] | None = None, page: int = 1000) -> Iterator[StoredRecord]:
        """Every record with seq > watermark in seq order, read page by page."""
        mark = watermark
        names = None if projects is None else list(projects)
        while True:
            rows = self.read_after(mark, page, names)
            if not rows:
                return
            yield from rows
            mark = rows[-1].seq

    def watermark(self) -> int:
        conn = self._conn()
        cur = conn.cursor()
        self._d.begin_read(conn)
        try:
            cur.execute("SELECT MAX(seq) FROM feedback")
            value = cur.fetchone()[0]
        finally:
            self._rollback(conn)
        return int(value or 0)

    # -- tasks --------------------------------------------------------------

    def add_tasks(self, tasks: Sequence[Task]) -> list[TaskOutcome]:
        """Publish tasks; a task id that exists already is left as it is (created=False)."""
        outcomes: list[TaskOutcome] = []
        conn = self._conn()
        self._d.begin_write(conn)
        try:
            cur = conn.cursor()
            now = self.clock()
            cur.execute("SELECT COALESCE(MAX(created_order), 0) FROM tasks")
            order = int(cur.fetchone()[0])
            for task in tasks:
                rejection = check_task(task, self.limits)
                if rejection is not None:
                    outcomes.append(TaskOutcome(False, rejection))
                    continue
                cur.execute(
                    self._q(
                        "INSERT INTO tasks (task_id, project, prompt_id, task, annotations_wanted, annotations_done,"
                        " is_open, created_at, created_order) VALUES (?, ?, ?, ?, ?, 0, 1, ?, ?)"
                        " ON CONFLICT (task_id) DO NOTHING"
                    ),
                    (task.task_id, task.project, task.prompt_id, _task_blob(task), task.annotations_wanted, now, order + 1),
                )
                created = cur.rowcount == 1
                order += int(created)
                if created and task.gold is not None:
                    cur.execute(
                        self._q("INSERT INTO gold_answers (task_id, project, better) VALUES (?, ?, ?)"),
                        (task.task_id, task.project, task.gold.better),
                    )
                outcomes.append(TaskOutcome(created))
            conn.commit()
        except BaseException:
            self._rollback(conn)
            raise
        return outcomes

    def get_task(self, task_id: str) -> Task | None:
        conn = self._conn()
        try:
            return self._tasks(conn.cursor(), {task_id}).get(task_id)
        finally:
            self._rollback(conn)

    def open_tasks(self, project: str, id_prefix: str = "") -> list[OpenTask]:
        """The project's open tasks whose id starts with `id_prefix` (a run's own), oldest
        first, with their live leases: what a publisher keeping a depth of work reads."""
        conn = self._conn()
        cur = conn.cursor()
        self._d.begin_read(conn)
        try:
            cur.execute(
                self._q(
                    "SELECT t.task, t.annotations_wanted, t.annotations_done, t.created_at,"
                    " (SELECT COUNT(*) FROM leases l WHERE l.task_id = t.task_id AND l.answered = 0 AND l.expires_at > ?)"
                    " FROM tasks t WHERE t.project = ? AND t.is_open = 1 AND substr(t.task_id, 1, ?) = ? ORDER BY t.created_order"
                ),
                (self.clock(), project, len(id_prefix), id_prefix),
            )
            rows = cur.fetchall()
        finally:
            self._rollback(conn)
        return [OpenTask(_task_from_blob(blob, wanted), int(leased), float(at), int(done)) for blob, wanted, done, at, leased in rows]

    def task_count(self, project: str, id_prefix: str = "", include_retired: bool = True) -> int:
        """How many tasks the project holds whose id starts with `id_prefix`: all of them, or
        (`include_retired` False) those open or judged as often as they want, not the ones
        `retire_tasks` closed early."""
        conn = self._conn()
        cur = conn.cursor()
        self._d.begin_read(conn)
        live = "" if include_retired else " AND (is_open = 1 OR annotations_done >= annotations_wanted)"
        try:
            cur.execute(self._q("SELECT COUNT(*) FROM tasks WHERE project = ? AND substr(task_id, 1, ?) = ?" + live),
                        (project, len(id_prefix), id_prefix))
            return int(cur.fetchone()[0])
        finally:
            self._rollback(conn)

    def retire_tasks(self, task_ids: Iterable[str]) -> int:
        """Close open tasks before they have their judgements (a stale policy wrote them);
        returns how many were open. Judgements already leased may still arrive: they are
        accepted like any other, since a closed task only stops being handed out."""
        wanted = sorted(set(task_ids))
        if not wanted:
            return 0
        conn = self._conn()
        self._d.begin_write(conn)
        try:
            cur = conn.cursor()
            closed = 0
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                cur.execute(self._q(f"UPDATE tasks SET is_open = 0 WHERE is_open = 1 AND task_id IN ({', '.join('?' * len(chunk))})"),
                            tuple(chunk))
                closed += max(0, cur.rowcount)
            conn.commit()
        except BaseException:
            self._rollback(conn)
            raise
        return closed

    def iter_tasks(self, projects: Iterable[str] | None = None, page: int = 1000) -> Iterator[Task]:
        """Every published task in publication order, read page by page (for exports)."""
        names = None if projects is None else sorted(set(projects))
        if names is not None and not names:
            return
        after = 0
        while True:
            conn = self._conn()
            cur = conn.cursor()
            self._d.begin_read(conn)
            try:
                where = "" if names is None else f" AND t.project IN ({', '.join('?' * len(names))})"
                cur.execute(
                    self._q(
                        "SELECT t.task, t.annotations_wanted, t.created_order, g.task_id, g.better FROM tasks t"
                        " LEFT JOIN gold_answers g ON g.task_id = t.task_id"
                        f" WHERE t.created_order > ?{where} ORDER BY t.created_order LIMIT ?"
                    ),
                    (after, *(names or ()), page),
                )
                rows = cur.fetchall()
            finally:
                self._rollback(conn)
            if not rows:
                return
            for blob, wanted, _, gold_id, better in rows:
                yield _task_from_blob(blob, wanted, _gold(gold_id, better))
            after = int(rows[-1][2])

    def gold_answers(self, projects: Iterable[str] | None = None) -> dict[str, GoldAnswer]:
        """The gold answers of the projects' tasks (every project when None), by task id."""
        names = None if projects is None else sorted(set(projects))
        if names is not None and not names:
            return {}
        conn = self._conn()
        cur = conn.cursor()
        self._d.begin_read(conn)
        try:
            if names is None:
                cur.execute("SELECT task_id, better FROM gold_answers")
            else:
                cur.execute(
                    self._q(f"SELECT task_id, better FROM gold_answers WHERE project IN ({', '.join('?' * len(names))})"),
                    tuple(names),
                )
            rows = cur.fetchall()
        finally:
            self._rollback(conn)
        return {task_id: GoldAnswer(better) for task_id, better in rows}

    def lease_tasks(self, project: str, annotator_id: str, max_tasks: int, lease_seconds: float) -> list[LeasedTask]:
        """Lease up to max_tasks open tasks the annotator was never handed, oldest first.

        Leased tasks are read from the task message alone: they carry no gold answer.
        """
        conn = self._conn()
        self._d.begin_write(conn)
        try:
            leased = self._lease_locked(conn.cursor(), project, annotator_id, max_tasks, lease_seconds)
            conn.commit()
        except BaseException:
            self._rollback(conn)
            raise
        return leased

    def _lease_locked(self, cur: Any, project: str, annotator_id: str, max_tasks: int, lease_seconds: float) -> list[LeasedTask]:
        now = self.clock()
        expires = now + lease_seconds
        leased: list[LeasedTask] = []
        after = 0  # keyset paging on created_order
        page = max(4 * max_tasks, 32)
        while len(leased) < max_tasks:
            cur.execute(
                self._q(
                    "SELECT t.task_id, t.task, t.annotations_wanted, t.annotations_done, t.created_order FROM tasks t"
                    " WHERE t.project = ? AND t.is_open = 1 AND t.created_order > ?"
                    " AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.task_id = t.task_id AND l.annotator_id = ?)"
                    " ORDER BY t.created_order LIMIT ?"
                ),
                (project, after, annotator_id, page),
            )
            rows = cur.fetchall()
            if not rows:
                break
            after = int(rows[-1][4])
            for task_id, blob, wanted, done, _ in rows:
                cur.execute(
                    self._q("SELECT COUNT(*) FROM leases WHERE task_id = ? AND answered = 0 AND expires_at > ?"),
                    (task_id, now),
                )
                if done + cur.fetchone()[0] >= wanted:
                    continue
                cur.execute(
                    self._q("INSERT INTO leases (task_id, annotator_id, expires_at, answered) VALUES (?, ?, ?, 0)"),
                    (task_id, annotator_id, expires),
                )
                leased.append(LeasedTask(_task_from_blob(blob, wanted), expires))
                if len(leased) >= max_tasks:
                    break
        return leased

    # -- stats --------------------------------------------------------------

    def stats(self, projects: Iterable[str] | None = None) -> StoreStats:
        conn = self._conn()
        cur = conn.cursor()
        self._d.begin_read(conn)
        try:
            where, args = "", ()
            if projects is not None:
                names = sorted(set(projects))
                if not names:
                    names = [""]
                where = f" WHERE project IN ({', '.join('?' * len(names))})"
                args = tuple(names)
            cur.execute(self._q("SELECT project, kind, annotator_id, n FROM feedback_counts" + where), args)
            counts = cur.fetchall()
            cur.execute(self._q("SELECT COUNT(*) FROM tasks" + (where + " AND" if where else " WHERE") + " is_open = 1"), args)
            open_tasks = int(cur.fetchone()[0])
            cur.execute("SELECT MAX(seq) FROM feedback")
            watermark = int(cur.fetchone()[0] or 0)
        finally:
            self._rollback(conn)
        by_kind: dict[str, int] = defaultdict(int)
        by_project: dict[str, int] = defaultdict(int)
        by_annotator: dict[str, int] = defaultdict(int)
        for project, kind, annotator, n in counts:
            by_kind[kind] += int(n)
            by_project[project] += int(n)
            by_annotator[annotator] += int(n)
        return StoreStats(
            total_records=sum(by_project.values()),
            by_kind=dict(by_kind),
            by_project=dict(by_project),
            by_annotator=dict(by_annotator),
            watermark=watermark,
            open_tasks=open_tasks,
        )


# C-level accessors of the prepared rows (`PreparedRow`'s positions) for the passes over a whole group
_KEY = operator.itemgetter(0, 1)  # (project, feedback_id)
_TASK_ID = operator.itemgetter(3)
_COLUMNS = operator.itemgetter(slice(0, 7))  # the row's columns but received_at
_COUNT_KEY = operator.itemgetter(0, 2, 4)  # (project, kind, annotator_id)
_PAIR = operator.itemgetter(3, 4)  # (task_id, annotator_id)
_PROJECT = operator.itemgetter(0)
_PROMPT_ID = operator.itemgetter(8)
_REFS = operator.itemgetter(9)
_TASK_PROJECT = operator.attrgetter("project")
_TASK_PROMPT_IDS = operator.attrgetter("record_prompt_ids")
_TASK_CANDIDATES = operator.attrgetter("candidate_ids")
_new_outcome = functools.partial(tuple.__new__, Outcome)  # Outcome(*args) without its Python-level __new__


def _fits_tasks(rows: Sequence[PreparedRow], tasks: dict[str, Task]) -> bool:
    """Whether every row passes `check_against_task`, judged from the fields prepare() read.

    True only when each row's task is known, of the row's project, has the row's prompt id
    (or the row names none) and every candidate the row names; each pass is a C-level loop.
    False means "not sure": the caller then checks the rows one by one.
    """
    refs = list(map(_REFS, rows))
    if not all(refs):  # None: prepare did not read the row's fields (not a plain record)
        return False
    of_rows = list(map(tasks.get, map(_TASK_ID, rows)))
    if not all(of_rows):  # an unknown task
        return False
    return (
        all(map(operator.eq, map(_TASK_PROJECT, of_rows), map(_PROJECT, rows)))
        and all(map(operator.contains, map(_TASK_PROMPT_IDS, of_rows), map(_PROMPT_ID, rows)))
        and all(map(frozenset.issuperset, map(_TASK_CANDIDATES, of_rows), refs))
    )


def _task_blob(task: Task) -> bytes:
    return task.to_proto().SerializeToString(deterministic=True)


def _task_from_blob(blob: bytes, wanted: int, gold: GoldAnswer | None = None) -> Task:
    return Task.from_proto(pb.LabelingTask.FromString(bytes(blob)), annotations_wanted=int(wanted), gold=gold)


def _gold(gold_task_id: str | None, better: str | None) -> GoldAnswer | None:
    """The gold answer of a LEFT JOIN row: none when the task has no gold_answers row."""
    return None if gold_task_id is None else GoldAnswer(better)
