"""The HTTP receivers: one aiohttp app, one route per tool.

    POST /argilla        Argilla webhooks (Standard Webhooks signature checked when a secret is set)
    POST /label-studio   Label Studio webhooks
    GET  /healthz        200 "ok"

Answers: 200 with {"accepted", "duplicate", "ignored"} once every record is
durably stored (the service acks only after its commit); 400 naming the
field of a malformed payload; 401 for a bad or stale signature; 422 when the
service rejects a record (with the service's field and reason); 502 when the
service cannot be reached (Argilla then retries; the records are idempotent).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

from aiohttp import web

from hitl.feedback.v1 import feedback_pb2 as pb
from services.adapters import argilla, label_studio
from services.adapters.common import PayloadError
from services.feedback.client import FeedbackClient, FeedbackClientError

log = logging.getLogger(__name__)

CLIENT = web.AppKey("client", FeedbackClient)
SETTINGS = web.AppKey("settings", dict)


def _error(status: int, field: str, reason: str) -> web.Response:
    return web.json_response({"error": f"{field}: {reason}", "field": field, "reason": reason}, status=status)


async def _submit(request: web.Request, body: bytes, mapper: Callable) -> web.Response:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return _error(400, "body", f"not JSON ({err})")
    settings = request.app[SETTINGS]
    try:
        records = mapper(payload, settings["project"])
    except PayloadError as err:
        return _error(400, err.field, err.reason)
    if not records:
        return web.json_response({"accepted": 0, "duplicate": 0, "ignored": True})
    client = request.app[CLIENT]
    try:
        results = await asyncio.to_thread(client.submit, records)
    except FeedbackClientError as err:
        log.warning("feedback service: %s", err)
        return _error(502, "feedback", str(err))
    rejected = [r for r in results if r.status == pb.RecordResult.STATUS_REJECTED]
    if rejected:
        first = rejected[0]
        return web.json_response(
            {
                "error": f"{first.field}: {first.reason}",
                "field": first.field,
                "reason": first.reason,
                "rejected": [{"feedback_id": r.feedback_id, "field": r.field, "reason": r.reason} for r in rejected],
            },
            status=422,
        )
    return web.json_response(
        {
            "accepted": sum(r.status == pb.RecordResult.STATUS_ACCEPTED for r in results),
            "duplicate": sum(r.status == pb.RecordResult.STATUS_DUPLICATE for r in results),
            "ignored": False,
            "feedback_ids": [r.feedback_id for r in results],
        }
    )


async def handle_argilla(request: web.Request) -> web.Response:
    body = await request.read()
    secret = request.app[SETTINGS]["argilla_secret"]
    if secret:
        try:
            argilla.verify(secret, request.headers, body, tolerance_s=request.app[SETTINGS]["tolerance_s"])
        except argilla.SignatureError as err:
            return _error(401, "webhook-signature", str(err))
    return await _submit(request, body, argilla.records_of)


async def handle_label_studio(request: web.Request) -> web.Response:
    body = await request.read()
    token = request.app[SETTINGS]["label_studio_token"]
    if token and request.headers.get("Authorization", "") != f"Token {token}":
        return _error(401, "Authorization", "missing or wrong token")
    return await _submit(request, body, label_studio.records_of)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app(
    client: FeedbackClient,
    *,
    project: str = "default",
    argilla_secret: str | None = None,
    label_studio_token: str | None = None,
    tolerance_s: float = argilla.TOLERANCE_S,
) -> web.Application:
    """The receivers' app; records go to the feedback service through `client`."""
    if argilla_secret:
        argilla._secret_key(argilla_secret)  # fail now on a malformed secret
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[CLIENT] = client
    app[SETTINGS] = {
        "project": project,
        "argilla_secret": argilla_secret,
        "label_studio_token": label_studio_token,
        "tolerance_s": tolerance_s,
    }
    app.router.add_post("/argilla", handle_argilla)
    app.router.add_post("/label-studio", handle_label_studio)
    app.router.add_get("/healthz", healthz)
    return app
