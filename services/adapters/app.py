"""The HTTP receivers: one aiohttp app, one route per tool, and the outbox's forwarder.

    POST /argilla        Argilla webhooks (Standard Webhooks signature keyed with the route's secret)
    POST /label-studio   Label Studio webhooks (`Authorization: Token <the route's token>`)
    GET  /healthz        200 {"status": "ok", "outbox": {"depth", "max", "dead_letters", "forwarding"}}

Answers, decided in this order, all before anything is queued:

    404  the route is not served (no credential configured); names the option that enables it
    401  a missing, wrong or stale signature or token (compared in constant time)
    400  a malformed payload, naming the field
    403  a payload the route may not write: a project outside its `projects`, a tool user
         not in its `users` (both named)
    413  a record too large to forward
    503  the outbox is full (with Retry-After): the delivery is refused, not dropped
    202  {"queued": n, "ignored": false, "feedback_ids": [...]}: the records are fsynced in
         the outbox; the forwarder stores them in the feedback service when it can
    200  {"queued": 0, "ignored": true}: an event with no judgement (a draft, a skipped task)

Why 202 and not 200: the delivery is durable here but not yet in the store, and 202
("accepted for processing") says so; both tools count any 2xx as delivered, so they do not
retry what is already safe. A record the service rejects later (an unknown task, say) ends
in the outbox's dead_letter table, logged with the service's field and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from typing import Any, AsyncIterator, Callable, Mapping

from aiohttp import web

from hitl.feedback.v1 import feedback_pb2 as pb
from services.adapters import argilla, label_studio
from services.adapters.common import PayloadError, Scope, check_record_sizes
from services.adapters.config import Route, Settings
from services.adapters.outbox import Forwarder, ForwardPolicy, Outbox, OutboxFull
from services.feedback.client import FeedbackClient

SETTINGS = web.AppKey("settings", Settings)
OUTBOX = web.AppKey("outbox", Outbox)
FORWARDER = web.AppKey("forwarder", Forwarder)
RETRY_AFTER_S = 30  # a full outbox drains at the service's pace: ask for a pause, not a hammering

Mapper = Callable[[Any, Scope], list[pb.FeedbackRecord]]


class Unauthorized(Exception):
    """The delivery does not prove it comes from the holder of the route's credential."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _error(status: int, field: str, reason: str) -> web.Response:
    return web.json_response({"error": f"{field}: {reason}", "field": field, "reason": reason}, status=status)


def check_argilla(secret: str, headers: Mapping[str, str], body: bytes, settings: Settings) -> None:
    try:
        argilla.verify(secret, headers, body, tolerance_s=settings.tolerance_s)
    except argilla.SignatureError as err:
        raise Unauthorized("webhook-signature", str(err)) from None


def check_label_studio(secret: str, headers: Mapping[str, str], body: bytes, settings: Settings) -> None:
    given = headers.get("Authorization", "").encode("utf-8", "replace")
    if not hmac.compare_digest(given, f"Token {secret}".encode()):  # constant time for equal lengths
        raise Unauthorized("Authorization", "missing or wrong token")


TOOLS: dict[str, tuple[Mapper, Callable[[str, Mapping[str, str], bytes, Settings], None]]] = {
    "argilla": (argilla.records_of, check_argilla),
    "label-studio": (label_studio.records_of, check_label_studio),
}


def records_of_body(body: bytes, route: Route, mapper: Mapper) -> list[pb.FeedbackRecord]:
    """The records a delivery gives, in its route's scope; PayloadError (or its 403 and 413
    kinds) otherwise. Everything a sender can get wrong is found here, before queuing."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PayloadError("body", f"not JSON ({err})") from None
    except RecursionError:  # json.loads recurses once per level of nesting
        raise PayloadError("body", "nested too deeply") from None
    records = mapper(payload, route.scope)
    check_record_sizes(records)
    return records


async def handle(request: web.Request, tool: str) -> web.Response:
    settings = request.app[SETTINGS]
    route = settings.routes.get(tool)
    if route is None:
        return _error(404, "route", settings.disabled_reason(tool))
    mapper, authenticate = TOOLS[tool]
    if route.secret is not None and tool == "label-studio":  # its credential is a header: check it before reading the body
        try:
            authenticate(route.secret, request.headers, b"", settings)
        except Unauthorized as err:
            return _error(401, err.field, err.reason)
    body = await request.read()
    if route.secret is not None and tool != "label-studio":  # a signature over the body
        try:
            authenticate(route.secret, request.headers, body, settings)
        except Unauthorized as err:
            return _error(401, err.field, err.reason)
    try:
        records = records_of_body(body, route, mapper)
    except PayloadError as err:
        return _error(err.status, err.field, err.reason)
    if not records:
        return web.json_response({"queued": 0, "ignored": True})
    return await queue(request.app, records)


async def queue(app: web.Application, records: list[pb.FeedbackRecord]) -> web.Response:
    """Queue durably, wake the forwarder, answer 202; 503 when the outbox is full."""
    try:
        await asyncio.to_thread(app[OUTBOX].put, records)
    except OutboxFull as err:
        response = _error(503, "outbox", str(err))
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response
    app[FORWARDER].wake()
    return web.json_response({"queued": len(records), "ignored": False, "feedback_ids": [r.feedback_id for r in records]},
                             status=202)


async def handle_argilla(request: web.Request) -> web.Response:
    return await handle(request, "argilla")


async def handle_label_studio(request: web.Request) -> web.Response:
    return await handle(request, "label-studio")


async def healthz(request: web.Request) -> web.Response:
    """Liveness plus the outbox's state; no error text (it would show internal addresses to
    anyone who can reach this port: the log has it)."""
    outbox, forwarder = request.app[OUTBOX], request.app[FORWARDER]
    depth, dead = await asyncio.to_thread(lambda: (outbox.depth(), outbox.dead_letter_count()))
    return web.json_response({"status": "ok", "outbox": {
        "depth": depth, "max": outbox.max_records, "dead_letters": dead,
        "forwarding": "failing" if forwarder.last_error else "ok",
    }})


async def _forwarding(app: web.Application) -> AsyncIterator[None]:
    """Run the forwarder while the app runs: what an earlier run left queued goes first."""
    task = asyncio.create_task(app[FORWARDER].run(), name="adapters-forwarder")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_app(client: FeedbackClient, settings: Settings, outbox: Outbox, policy: ForwardPolicy | None = None) -> web.Application:
    """The receivers' app. Deliveries go to `outbox`; its forwarder sends them through `client`.
    The caller owns `client` and `outbox` (and closes them after the app's cleanup)."""
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[SETTINGS] = settings
    app[OUTBOX] = outbox
    app[FORWARDER] = Forwarder(outbox, client, policy)
    app.cleanup_ctx.append(_forwarding)
    app.router.add_post("/argilla", handle_argilla)
    app.router.add_post("/label-studio", handle_label_studio)
    app.router.add_get("/healthz", healthz)
    return app
