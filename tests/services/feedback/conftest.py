"""Fixtures of the feedback service tests: stores on both backends, tasks,
and a real gRPC server on a free localhost port."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from hitl.feedback.v1 import feedback_pb2 as pb
from services.feedback.config import FeedbackServiceConfig
from services.feedback.records import Task
from services.feedback.server import FeedbackServer
from services.feedback.store import SqlStore, open_store
from tests.conftest import POSTGRES_URL


def postgres_schema_url(schema: str) -> str:
    sep = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{sep}schema={schema}"


def drop_postgres_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextlib.contextmanager
def fresh_store_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A URL naming an empty store; PostgreSQL gets a schema of its own."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.db'}"
        return
    schema = f"hitl_test_{uuid.uuid4().hex[:12]}"
    try:
        yield postgres_schema_url(schema)
    finally:
        drop_postgres_schema(schema)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path) -> Iterator[str]:
    with fresh_store_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def store(store_url) -> Iterator[SqlStore]:
    s = open_store(store_url)
    yield s
    s.close()


def make_task(task_id: str = "t1", project: str = "demo", n: int = 2, wanted: int = 1, scales=()) -> Task:
    return Task(
        task_id=task_id,
        project=project,
        prompt_id=f"p-{task_id}",
        prompt=f"prompt of {task_id}",
        candidates=tuple(pb.Candidate(candidate_id=f"c{i}", text=f"answer {i} to {task_id}", policy_version=3) for i in range(n)),
        rating_scales=tuple(pb.RatingScale(aspect=a, min=lo, max=hi) for a, lo, hi in scales),
        annotations_wanted=wanted,
    )


def preference(fid: str, task_id: str = "t1", project: str = "demo", annotator: str = "alice", choice=pb.Preference.CHOICE_A, **kw) -> pb.FeedbackRecord:
    return pb.FeedbackRecord(
        feedback_id=fid,
        project=project,
        task_id=task_id,
        annotator_id=annotator,
        preference=pb.Preference(candidate_a_id="c0", candidate_b_id="c1", choice=choice),
        **kw,
    )


class ServerThread:
    """A FeedbackServer on its own event loop in a background thread."""

    def __init__(self, cfg: FeedbackServiceConfig):
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.server = FeedbackServer(cfg)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> "ServerThread":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        self.run(self.server.stop(grace), timeout=grace + 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@contextlib.contextmanager
def running_server(store_url: str, **overrides) -> Iterator[ServerThread]:
    values = {"store": store_url, "port": 0, "metrics_port": None, **overrides}
    srv = ServerThread(FeedbackServiceConfig(**values)).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server(store_url) -> Iterator[ServerThread]:
    with running_server(store_url) as srv:
        yield srv
