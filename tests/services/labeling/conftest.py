"""What the labeling tests share: a real feedback gRPC server on a SQLite store, tasks
published into it, and the records it stored."""

from __future__ import annotations

import time

import pytest

from hitl.feedback.v1 import feedback_pb2 as pb
from services.feedback.config import FeedbackServiceConfig
from services.feedback.store import open_store
from tests.services.feedback.conftest import ServerThread


def start_server(url: str, port: int = 0) -> ServerThread:
    """A real feedback gRPC server on the store at `url`."""
    return ServerThread(FeedbackServiceConfig(store=url, port=port, metrics_port=None, shutdown_grace_seconds=1)).start()


def publish(url: str, *tasks) -> None:
    db = open_store(url)
    try:
        assert all(o.created for o in db.add_tasks(tasks))
    finally:
        db.close()


def stored(url: str) -> list[pb.FeedbackRecord]:
    db = open_store(url)
    try:
        return [s.record for s in db.iter_after(0)]
    finally:
        db.close()


def wait_stored(url: str, n: int, timeout: float = 30.0) -> list[pb.FeedbackRecord]:
    """Wait until `n` records are stored; fail if a different number is there at the end."""
    deadline = time.monotonic() + timeout
    while True:
        records = stored(url)
        if len(records) >= n or time.monotonic() > deadline:
            assert len(records) == n, f"expected {n} stored records, found {len(records)}: {[r.task_id for r in records]}"
            return records
        time.sleep(0.1)


def by_task(records) -> dict[str, list[pb.FeedbackRecord]]:
    out: dict[str, list[pb.FeedbackRecord]] = {}
    for r in records:
        out.setdefault(r.task_id, []).append(r)
    return out


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'feedback.db'}"
