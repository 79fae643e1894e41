"""Fixtures of the adapter tests: a real feedback gRPC server over a real store, and the
receivers' HTTP app (with its SQLite outbox and forwarder) on a free localhost port."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web

from services.adapters import argilla
from services.adapters.app import make_app
from services.adapters.config import Settings, build_config, resolve
from services.adapters.outbox import ForwardPolicy, Outbox
from services.feedback.client import Backoff, FeedbackClient
from services.feedback.store import open_store
from tests.services.feedback.conftest import make_task, store_url  # noqa: F401 (the store fixture, SQLite and PostgreSQL)

PAYLOADS = Path(__file__).parent / "payloads"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
LS_TOKEN = "ls-token-0123456789abcdef"
SCALES = [("helpfulness", 1, 5), ("overall", 1, 5)]
# quick retries, so that an outage test takes seconds (the command's are 0.5 s .. 30 s)
FAST = ForwardPolicy(initial_backoff_s=0.05, max_backoff_s=0.3, idle_poll_s=0.2)


def payload(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def signed(body: bytes, msg_id: str, secret: str = SECRET, at: int | None = None) -> dict[str, str]:
    """The Standard Webhooks headers Argilla would send with `body`."""
    ts = int(time.time()) if at is None else at
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": argilla.sign(secret, msg_id, ts, body)}


def ls_auth(token: str = LS_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Token {token}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stored(url: str):
    db = open_store(url)
    try:
        return [s.record for s in db.iter_after(0)]
    finally:
        db.close()


def publish(url: str, *task_ids: str, project: str = "default") -> None:
    db = open_store(url)
    try:
        outcomes = db.add_tasks([make_task(t, project=project, scales=SCALES) for t in task_ids])
        assert all(o.created for o in outcomes)
    finally:
        db.close()


def fast_client(address: str, token: str | None = None) -> FeedbackClient:
    """A client that gives up within a second and redials quickly once the service is back."""
    return FeedbackClient(address, token, timeout_s=2.0, backoff=Backoff(initial_s=0.01, max_s=0.05, give_up_after_s=0.3),
                          channel_options=(("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 300)))


def simple_settings(outbox: Path, *, argilla_secret: str | None = None, label_studio_token: str | None = None,
                    project: str = "default", allow_unauthenticated: bool = False, max_records: int = 100_000) -> Settings:
    """The settings `hitl adapters serve` makes from its simple options (no --config)."""
    routes = {key: {"projects": [project], "map_unknown_users": "prefix", **({"secret": s} if s else {})}
              for key, s in (("argilla", argilla_secret), ("label_studio", label_studio_token))}
    return resolve(build_config({"routes": routes, "outbox": outbox, "outbox_max_records": max_records,
                                 "allow_unauthenticated": allow_unauthenticated}))


class Receiver:
    """An aiohttp app served on 127.0.0.1:<free port> from a background thread."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None = None):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner = web.AppRunner(app)
        self._ssl = ssl_context
        self.port = 0

    def start(self) -> "Receiver":
        self._thread.start()

        async def up() -> int:
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl)
            await site.start()
            return self._runner.addresses[0][1]

        self.port = asyncio.run_coroutine_threadsafe(up(), self.loop).result(30)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class Adapter:
    """The receivers as `hitl adapters serve` runs them: app, outbox, forwarder and client."""

    def __init__(self, feedback_address: str, settings: Settings, ssl_context: ssl.SSLContext | None = None,
                 token: str | None = None):
        self.settings = settings
        self.client = fast_client(feedback_address, token)
        self.outbox = Outbox(settings.outbox, settings.outbox_max_records)
        self.receiver = Receiver(make_app(self.client, settings, self.outbox, FAST), ssl_context).start()
        self.port = self.receiver.port

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        return post(self.port, path, body, headers)

    def health(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=10) as response:
            return json.loads(response.read())

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until the forwarder emptied the outbox."""
        wait_for(lambda: self.outbox.depth() == 0, timeout_s, lambda: f"{self.outbox.depth()} records still queued")

    def stop(self) -> None:
        self.receiver.stop()
        self.client.close()
        self.outbox.close()

    def __enter__(self) -> "Adapter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_for(condition, timeout_s: float = 30.0, what=lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s: {what()}")
        time.sleep(0.05)


def post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    status, _, answer = post_full(port, path, body, headers)
    return status, answer


def post_full(port: int, path: str, body: bytes, headers: dict[str, str] | None = None,
              scheme: str = "http", context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], dict]:
    """(status, headers, JSON body) of a POST; HTTP errors are answers too."""
    request = urllib.request.Request(
        f"{scheme}://127.0.0.1:{port}{path}", data=body, method="POST", headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())
