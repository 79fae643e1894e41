"""SQLite backend: the embedded default (one file, WAL, synchronous=FULL)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from services.feedback.records import Limits
from services.feedback.store.base import SqlStore


class SqliteDialect:
    name = "sqlite"
    seq_column = "INTEGER PRIMARY KEY AUTOINCREMENT"
    blob = "BLOB"
    real = "REAL"

    def __init__(self, path: Path):
        self.path = path

    def connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are opened explicitly below
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0, check_same_thread=True)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk (WAL fsynced) before it returns, so an acked record survives power loss
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        return _Connection(conn)

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

    def insert_returning(self, cur: Any, table: str, statement: str, rows: list[tuple]) -> list[int]:
        """executemany the INSERT; the new rows' seqs in row order.

        The caller holds the write lock, and each AUTOINCREMENT key is larger
        than every key before it, so the rows get increasing seqs above the
        table's previous maximum, in row order. When they fill that range
        exactly (always, unless keys were skipped) the seqs follow from
        last_insert_rowid(); otherwise they are read back in order.
        """
        cur.execute(f"SELECT COALESCE(MAX(seq), 0) FROM {table}")
        before = int(cur.fetchone()[0])
        cur.executemany(statement, rows)
        cur.execute("SELECT last_insert_rowid()")
        last = int(cur.fetchone()[0])
        if last - before == len(rows):
            return list(range(before + 1, last + 1))
        cur.execute(f"SELECT seq FROM {table} WHERE seq > ? ORDER BY seq", (before,))
        seqs = [int(seq) for (seq,) in cur.fetchall()]
        if len(seqs) != len(rows):
            raise RuntimeError(f"inserted {len(rows)} rows into {table} but found {len(seqs)} new keys")
        return seqs


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
    return SqlStore(f"sqlite:///{path}", SqliteDialect(path), limits)
