"""SQLite backend: the embedded default (one file, WAL, synchronous=FULL)."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from itertools import chain
from pathlib import Path
from typing import Any

from services.feedback.records import Limits
from services.feedback.store.base import SqlStore

log = logging.getLogger(__name__)

# WAL pages after which a commit copies the WAL into the database itself (SQLite's
# auto-checkpoint, 1000 by default). The background checkpointer normally keeps
# the WAL far below this; it is the backstop should that thread fall behind.
_BACKSTOP_CHECKPOINT_PAGES = 8192
_CHECKPOINT_INTERVAL_S = 0.25  # the least time between two background checkpoints
_CHECKPOINT_PASSES = 4  # passes of one checkpoint at most, while commits keep adding frames
# Page size of a new database file (an existing file keeps its own). A stored record is a row
# of about 1.4 KB: SQLite's default 4 KB page holds two of them and wastes a quarter of itself,
# a 16 KB page holds eleven; a group commit writes a third of the WAL frames (one write call
# each), and the insert touches fewer pages.
_PAGE_SIZE = 16384
_INSERT_ROWS = 100  # rows per multi-row INSERT statement
_CACHED_STATEMENTS = 512  # prepared statements kept per connection (sqlite3's default: 128)


class SqliteDialect:
    name = "sqlite"
    seq_column = "INTEGER PRIMARY KEY AUTOINCREMENT"
    blob = "BLOB"
    real = "REAL"

    def __init__(self, path: Path):
        self.path = path
        self._checkpointer = _Checkpointer(path)
        self._multi_row: dict[tuple[str, int, str], str] = {}

    def connect(self) -> sqlite3.Connection:
        return _Connection(_open(self.path, _BACKSTOP_CHECKPOINT_PAGES))

    def committed(self, conn: Any) -> None:
        """After a write transaction: the WAL grew, so wake the checkpointer."""
        self._checkpointer.nudge()

    def close(self) -> None:
        self._checkpointer.close()

    def is_broken(self, conn: Any) -> bool:
        return False  # a file: nothing between the store and its database to break

    def sql(self, statement: str) -> str:
        return statement

    def begin_write(self, conn: Any) -> None:
        # IMMEDIATE takes the write lock now: writers are serialised, so seq order is commit order
        conn.execute("BEGIN IMMEDIATE")

    def begin_read(self, conn: Any) -> None:
        conn.execute("BEGIN")

    def find_feedback_ids(self, project: str, ids: list[str]) -> tuple[str, tuple]:
        # SQLite drives the IN list through the unique index: one search per id
        marks = ", ".join("?" * len(ids))
        return (
            f"SELECT feedback_id, seq, content_hash FROM feedback WHERE project = ? AND feedback_id IN ({marks})",
            (project, *ids),
        )

    def find_leases(self, pairs: list[tuple[str, str]]) -> tuple[str, tuple]:
        # a join with the pairs as a VALUES list: SQLite probes the primary key once per pair
        # (`(task_id, annotator_id) IN (VALUES ...)` would scan the whole table)
        values = ", ".join(["(?, ?)"] * len(pairs))
        return (
            f"SELECT l.task_id, l.annotator_id, l.answered FROM (VALUES {values}) AS k"
            " JOIN leases l ON l.task_id = k.column1 AND l.annotator_id = k.column2",
            tuple(x for pair in pairs for x in pair),
        )

    def insert_returning(self, cur: Any, table: str, statement: str, rows: list[tuple]) -> list[int]:
        """Insert the rows, `_INSERT_ROWS` per statement; the new rows' seqs in row order.

        `statement` inserts one row (`INSERT ... VALUES (?, ...)`); it is run
        as multi-row statements (`VALUES (...), (...), ...`), whose text is
        fixed for each row count, so that each is prepared once per
        connection. One statement per hundred rows rather than one per row
        (executemany) pays SQLite's per-statement work (AUTOINCREMENT's
        bookkeeping among it) once per hundred rows. SQLite inserts the rows
        of a VALUES list in order. The caller holds the write lock, and each
        AUTOINCREMENT key is larger than every key before it, so the rows get
        increasing seqs above the table's previous maximum, in row order. When
        they fill that range exactly (always, unless keys were skipped) the
        seqs follow from last_insert_rowid(); otherwise they are read back in
        order.
        """
        seqs = self._insert(cur, table, statement, rows, "")
        if seqs is None:  # cannot happen: without ON CONFLICT a conflict raises
            raise RuntimeError(f"insert into {table} skipped rows")
        return seqs

    def insert_new(self, cur: Any, table: str, statement: str, rows: list[tuple], unique: str) -> list[int] | None:
        """`insert_returning`, except that a row whose `unique` columns (say "(a, b)") hold a stored
        key is skipped (ON CONFLICT DO NOTHING), and then this returns None: the caller rolls
        the transaction back."""
        return self._insert(cur, table, statement, rows, f" ON CONFLICT {unique} DO NOTHING")

    def _insert(self, cur: Any, table: str, statement: str, rows: list[tuple], on_conflict: str) -> list[int] | None:
        cur.execute(f"SELECT COALESCE(MAX(seq), 0) FROM {table}")
        before = int(cur.fetchone()[0])
        flat = chain.from_iterable
        inserted = 0
        for start in range(0, len(rows), _INSERT_ROWS):
            chunk = rows[start : start + _INSERT_ROWS]
            cur.execute(self._rows_statement(statement, len(chunk), on_conflict), tuple(flat(chunk)))
            inserted += cur.rowcount
        if inserted != len(rows):
            if on_conflict:
                return None
            raise RuntimeError(f"inserted {inserted} of {len(rows)} rows into {table}")
        cur.execute("SELECT last_insert_rowid()")
        last = int(cur.fetchone()[0])
        if last - before == len(rows):
            return list(range(before + 1, last + 1))
        cur.execute(f"SELECT seq FROM {table} WHERE seq > ? ORDER BY seq", (before,))
        seqs = [int(seq) for (seq,) in cur.fetchall()]
        if len(seqs) != len(rows):
            raise RuntimeError(f"inserted {len(rows)} rows into {table} but found {len(seqs)} new keys")
        return seqs

    def _rows_statement(self, statement: str, n: int, suffix: str = "") -> str:
        """The single-row INSERT `statement` as one that inserts n rows, followed by `suffix`."""
        key = (statement, n, suffix)
        text = self._multi_row.get(key)
        if text is None:
            head, values = statement.rsplit(" VALUES ", 1)
            text = f"{head} VALUES " + ", ".join([values] * n) + suffix
            self._multi_row[key] = text
        return text


def _open(path: Path, autocheckpoint_pages: int) -> sqlite3.Connection:
    # isolation_level=None: transactions are opened explicitly by the store
    conn = sqlite3.connect(
        path, isolation_level=None, timeout=30.0, check_same_thread=True, cached_statements=_CACHED_STATEMENTS
    )
    # only takes effect on a new, empty file, and must come before the switch to WAL
    conn.execute(f"PRAGMA page_size={_PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk (WAL fsynced) before it returns, so an acked record survives power
    # loss; a checkpoint fsyncs the database file before the WAL may be reused
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute(f"PRAGMA wal_autocheckpoint={autocheckpoint_pages}")
    return conn


class _Checkpointer:
    """Copies the WAL into the database file on a thread of its own.

    With SQLite's default auto-checkpoint, every ~1000th page written makes the
    commit that crosses the mark copy the whole WAL into the database file and
    fsync it before it returns: that commit, and every ack waiting for it, takes
    tens of milliseconds longer — the ingest latency tail. Here the writer's
    commits only wake this thread, which runs a PASSIVE checkpoint (it never
    blocks the writer, nor waits for it) at most every `_CHECKPOINT_INTERVAL_S`
    on its own connection. SQLite restarts the WAL from its beginning at the
    first write after a checkpoint that copied all of it. Durability is
    SQLite's: a checkpoint syncs the database file before any WAL frame it
    copied may be overwritten. Should this thread fall behind, the writers'
    own auto-checkpoint at `_BACKSTOP_CHECKPOINT_PAGES` takes over.
    """

    def __init__(self, path: Path):
        self._path = path
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def nudge(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._stop = threading.Event()
                    self._thread = threading.Thread(target=self._run, args=(self._stop,), name="sqlite-checkpoint", daemon=True)
                    self._thread.start()
        self._wake.set()

    def close(self) -> None:
        """Stop the thread (a later commit starts a new one)."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self, stop: threading.Event) -> None:
        try:
            conn = _open(self._path, 0)
        except sqlite3.Error:
            log.exception("checkpointer: cannot open %s; commits checkpoint themselves", self._path)
            return
        try:
            while not stop.is_set():
                self._wake.wait()
                if stop.is_set():
                    return
                self._wake.clear()
                started = time.monotonic()
                try:
                    # A pass copies the frames that were in the WAL when it began; those committed
                    # meanwhile wait for the next pass, and SQLite starts the WAL over (at the next
                    # write) only once every frame has been copied. So short passes follow a long
                    # one, until a pass finds no frame it had not seen.
                    seen = -1
                    for _ in range(_CHECKPOINT_PASSES):
                        _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                        if frames == seen or stop.is_set():
                            break
                        seen = frames
                except sqlite3.Error:
                    log.exception("checkpointer: checkpoint of %s failed; retrying after the next commit", self._path)
                # commits in the meantime only set the event
                stop.wait(max(0.0, _CHECKPOINT_INTERVAL_S - (time.monotonic() - started)))
        finally:
            conn.close()


class _Connection:
    """sqlite3 in autocommit mode with DB-API commit/rollback that end explicit transactions."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def cursor(self) -> sqlite3.Cursor:
        return self._conn.cursor()

    def execute(self, statement: str, args: tuple = ()) -> sqlite3.Cursor:
        return self._conn.execute(statement, args)

    def commit(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("COMMIT")

    def rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()


def open_sqlite(path: str | Path, limits: Limits | None = None) -> SqlStore:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    if str(path) != ":memory:" and not path.exists():
        # the store holds people's judgements and gold answers: its owner's alone (SQLite gives
        # its -wal and -shm files the database file's mode)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    return SqlStore(f"sqlite:///{path}", SqliteDialect(path), limits)
