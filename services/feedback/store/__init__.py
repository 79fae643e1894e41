"""Feedback stores: SQLite (embedded default) and PostgreSQL behind one interface."""

from __future__ import annotations

from services.exposure import redact_url
from services.feedback.records import Limits
from services.feedback.store.base import (
    FeedbackStore,
    LeasedTask,
    OpenTask,
    Outcome,
    SqlStore,
    Status,
    StoreError,
    StoreUnavailable,
    StoreStats,
    TaskOutcome,
)

__all__ = [
    "FeedbackStore",
    "LeasedTask",
    "OpenTask",
    "Outcome",
    "SqlStore",
    "Status",
    "StoreError",
    "StoreUnavailable",
    "StoreStats",
    "TaskOutcome",
    "open_store",
]


def open_store(url: str, limits: Limits | None = None) -> SqlStore:
    """Open (and migrate) the store a URL names.

    `sqlite:///relative.db`, `sqlite:////absolute.db` or a bare file path for
    SQLite; `postgresql://user@host:port/db[?schema=NAME]` for PostgreSQL.
    """
    if url.startswith(("postgresql://", "postgres://")):
        from services.feedback.store.postgres import open_postgres

        return open_postgres(url, limits)
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
        if not path.startswith("/"):
            raise ValueError(f"store url {redact_url(url)!r}: expected sqlite:///path.db")
        path = path[1:] if not path.startswith("//") else path[1:]
        if not path:
            raise ValueError(f"store url {redact_url(url)!r}: no file path")
        from services.feedback.store.sqlite import open_sqlite

        return open_sqlite(path, limits)
    if "://" in url:
        raise ValueError(f"store url {redact_url(url)!r}: unsupported scheme (use sqlite:/// or postgresql://)")
    from services.feedback.store.sqlite import open_sqlite

    return open_sqlite(url, limits)
