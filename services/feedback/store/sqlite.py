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

    def insert_returning(self, cur: Any, statement: str, rows: list[tuple]) -> list[int]:
        seqs = []
        for row in rows:
            cur.execute(statement, row)
            seqs.append(int(cur.fetchone()[0]))
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
