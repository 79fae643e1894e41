"""The HTTP front of the labeling page: static files and a small JSON API.

    GET  /                    the page (static/index.html); /static/app.js, /static/style.css
    GET  /api/me              {"annotator_id" (null until signed in), "project", "guidelines", "guidelines_version"}
    POST /api/signin          {"annotator_id": "alice"} -> sets the annotator cookie
    POST /api/signout         clears it
    GET  /api/task            {"task": {...} | null, "held": N}: the annotator's current task (pulled when none is held)
    POST /api/judgements      one judgement (see judgements.py) -> {"status": "accepted" | "duplicate", "seq", ...}
    POST /api/skip            {"task_id": "t1"}: the task is set aside (its lease runs out and frees it)
    GET  /api/stats           the annotator's record count on the service and open tasks (null when it
                              cannot be reached), and this server's tally for the annotator
    GET  /healthz             200 "ok"

Errors are JSON {"error", "field", "reason"}: 400 a malformed body (the field's
path), 401 not signed in, 409 a judgement that contradicts what the server
knows (other guidelines, a task already judged with another feedback_id),
415 a POST that is not JSON, 422 a record the service rejected (its field and
reason: unknown task, unknown candidate, a rating off its scale), 502 the
service could not be reached (the page retries with the same feedback_id).

The annotator id is self-declared (a cookie, SameSite=Strict); the service's
bearer token stays in this server. Serve it where the annotators are trusted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from hitl.feedback.v1 import feedback_pb2 as pb
from services.feedback.client import Backoff, FeedbackClient, FeedbackClientError
from services.labeling.web.config import Guidelines, LabelWebConfig
from services.labeling.web.judgements import BadJudgement, parse_judgement, to_record
from services.labeling.web.tasks import TaskBook

log = logging.getLogger(__name__)

COOKIE = "hitl_annotator"
_STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
_MAX_BODY = 1024 * 1024
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class Front:
    """What the handlers share: the config, the gRPC client, the task book, per-annotator locks."""

    cfg: LabelWebConfig
    guidelines: Guidelines
    client: FeedbackClient
    book: TaskBook
    locks: dict[str, asyncio.Lock]

    def lock(self, annotator: str) -> asyncio.Lock:
        return self.locks.setdefault(annotator, asyncio.Lock())


FRONT = web.AppKey("front", Front)
STATIC = web.AppKey("static", dict)


def error(status: int, field: str, reason: str) -> web.Response:
    return web.json_response({"error": f"{field}: {reason}", "field": field, "reason": reason}, status=status)


# -- the annotator ----------------------------------------------------------------


def annotator_of(request: web.Request) -> str | None:
    """The signed-in annotator id from the cookie, or None."""
    raw = request.cookies.get(COOKIE)
    if not raw:
        return None
    try:
        value = base64.urlsafe_b64decode(raw.encode("ascii")).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None
    return value if _valid_annotator(value) is None else None


def _valid_annotator(value: object) -> str | None:
    """Why `value` cannot be an annotator id, or None."""
    if not isinstance(value, str) or not value.strip():
        return "required: a non-empty string"
    if value != value.strip():
        return "must not start or end with spaces"
    if "\x00" in value or len(value.encode("utf-8")) > 128:
        return "at most 128 bytes of UTF-8, without NUL characters"
    return None


def _signed_in(handler):
    """Answer 401 unless an annotator is signed in; pass the id on."""

    async def wrapped(request: web.Request) -> web.Response:
        annotator = annotator_of(request)
        if annotator is None:
            return error(401, "annotator_id", "sign in first")
        return await handler(request, annotator)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


async def _json_body(request: web.Request) -> tuple[object | None, web.Response | None]:
    """The parsed JSON body, or an error response (415 when not sent as JSON, 400 when malformed)."""
    if request.content_type != "application/json":
        return None, error(415, "Content-Type", "send application/json")
    try:
        return json.loads(await request.read()), None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, error(400, "body", f"not JSON ({err})")


async def me(request: web.Request) -> web.Response:
    """Who is signed in, and what the page shows before any task."""
    front = request.app[FRONT]
    return web.json_response(
        {
            "annotator_id": annotator_of(request),
            "project": front.cfg.project,
            "guidelines": front.guidelines.text,
            "guidelines_version": front.guidelines.version,
        }
    )


async def signin(request: web.Request) -> web.Response:
    body, bad = await _json_body(request)
    if bad is not None:
        return bad
    if not isinstance(body, dict) or set(body) - {"annotator_id"}:
        return error(400, "body", 'expected {"annotator_id": "..."}')
    value = body.get("annotator_id")
    reason = _valid_annotator(value)
    if reason is not None:
        return error(400, "annotator_id", reason)
    response = web.json_response({"annotator_id": value})
    cookie = base64.urlsafe_b64encode(value.encode("utf-8")).decode("ascii")
    response.set_cookie(COOKIE, cookie, max_age=30 * 86400, path="/", httponly=True, samesite="Strict")
    return response


async def signout(request: web.Request) -> web.Response:
    response = web.json_response({"annotator_id": None})
    response.del_cookie(COOKIE, path="/")
    return response


# -- tasks --------------------------------------------------------------------------


async def _pull(front: Front, annotator: str) -> None:
    """Lease tasks until `prefetch` are held (or the service has none)."""
    need = front.cfg.prefetch - front.book.held_count(annotator)
    if need <= 0:
        return

    def pull() -> None:
        # each task is held as it arrives: one leased before a broken stream is not lost to this annotator
        for task in front.client.pull_tasks(
            front.cfg.project, annotator, max_tasks=need, lease_seconds=front.cfg.lease_seconds,
            timeout_s=front.cfg.call_timeout_seconds,
        ):
            front.book.add(annotator, task)

    await asyncio.to_thread(pull)


@_signed_in
async def current_task(request: web.Request, annotator: str) -> web.Response:
    """The annotator's current task; pulls ahead when fewer than `prefetch` are held."""
    front = request.app[FRONT]
    async with front.lock(annotator):
        held = front.book.current(annotator)
        if held is None or front.book.held_count(annotator) < front.cfg.prefetch:
            try:
                await _pull(front, annotator)
            except FeedbackClientError as err:
                if held is None:
                    log.warning("PullTasks: %s", err)
                    return error(502, "feedback", f"the feedback service did not answer: {err}")
            held = front.book.current(annotator)
    return web.json_response({"task": held.to_json() if held else None, "held": front.book.held_count(annotator)})


@_signed_in
async def skip(request: web.Request, annotator: str) -> web.Response:
    body, bad = await _json_body(request)
    if bad is not None:
        return bad
    task_id = body.get("task_id") if isinstance(body, dict) else None
    if not isinstance(task_id, str) or not task_id:
        return error(400, "task_id", "required: the id of the task to skip")
    front = request.app[FRONT]
    return web.json_response({"task_id": task_id, "skipped": front.book.finish(annotator, task_id)})


# -- judgements ------------------------------------------------------------------------


_STATUS = {pb.RecordResult.STATUS_ACCEPTED: "accepted", pb.RecordResult.STATUS_DUPLICATE: "duplicate"}


@_signed_in
async def post_judgement(request: web.Request, annotator: str) -> web.Response:
    """Store one judgement; a resend (same feedback_id and content) is answered `duplicate`."""
    if request.content_type != "application/json":
        return error(415, "Content-Type", "send application/json")
    front = request.app[FRONT]
    try:
        judgement = parse_judgement(await request.read())
        record = to_record(judgement, project=front.cfg.project, annotator_id=annotator)
    except BadJudgement as err:
        return error(400, err.field, err.reason)
    if judgement.guidelines_version != front.guidelines.version:
        return error(409, "guidelines_version", f"the guidelines are now version {front.guidelines.version!r}: reload the page")
    async with front.lock(annotator):
        if judgement.finishes:
            earlier = front.book.conflicting_judgement(annotator, judgement.task_id, judgement.feedback_id)
            if earlier is not None:
                return error(409, "task_id", f"task {judgement.task_id!r} was already judged by {annotator!r} (feedback_id {earlier})")
        try:
            (result,) = await asyncio.to_thread(front.client.submit, [record])
        except FeedbackClientError as err:
            log.warning("SubmitFeedback: %s", err)
            return error(502, "feedback", f"the feedback service did not answer: {err}")
        if result.status not in _STATUS:
            return error(422, result.field or "record", result.reason or "rejected by the feedback service")
        if result.status == pb.RecordResult.STATUS_ACCEPTED:
            front.book.count_accepted(annotator)
        if judgement.finishes:
            front.book.finish(annotator, judgement.task_id, judgement.feedback_id)
    return web.json_response(
        {"status": _STATUS[result.status], "feedback_id": record.feedback_id, "seq": result.seq,
         "kind": judgement.kind, "finishes": judgement.finishes}
    )


@_signed_in
async def stats(request: web.Request, annotator: str) -> web.Response:
    """The annotator's records on the service (GetStats by_annotator) and this server's tally."""
    front = request.app[FRONT]
    tally = front.book.tally(annotator)
    try:
        reply = await asyncio.to_thread(front.client.stats, front.cfg.project)
    except FeedbackClientError as err:
        log.warning("GetStats: %s", err)
        reply = None  # the tally is still worth showing
    return web.json_response(
        {
            "annotator_id": annotator,
            "server_records": int(reply.by_annotator.get(annotator, 0)) if reply else None,
            "open_tasks": int(reply.open_tasks) if reply else None,
            "session": {"pulled": tally.pulled, "judged": tally.judged, "skipped": tally.skipped, "records": tally.records},
        }
    )


# -- the page ----------------------------------------------------------------------------


def load_static() -> dict[str, tuple[bytes, str]]:
    """The page's files from the package (works from a wheel, an sdist or an editable install)."""
    root = resources.files("services.labeling.web").joinpath("static")
    files: dict[str, tuple[bytes, str]] = {}
    for entry in root.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in _STATIC_TYPES:
            files[entry.name] = (entry.read_bytes(), _STATIC_TYPES[suffix])
    if "index.html" not in files:
        raise FileNotFoundError("services/labeling/web/static/index.html is missing from the installed package")
    return files


def _static_response(request: web.Request, name: str) -> web.Response:
    found = request.app[STATIC].get(name)
    if found is None:
        raise web.HTTPNotFound()
    body, content_type = found
    return web.Response(body=body, content_type=content_type, charset="utf-8")


async def index(request: web.Request) -> web.Response:
    return _static_response(request, "index.html")


async def static(request: web.Request) -> web.Response:
    return _static_response(request, request.match_info["name"])


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


@web.middleware
async def _security_headers(request: web.Request, handler) -> web.StreamResponse:
    response = await handler(request)
    for key, value in _HEADERS.items():
        response.headers.setdefault(key, value)
    return response


def make_client(cfg: LabelWebConfig) -> FeedbackClient:
    """The gRPC client of the page's server: short retries (the page retries itself), quick reconnects."""
    return FeedbackClient(
        cfg.server,
        cfg.token,
        root_certificates=cfg.tls_ca,
        client_cert=cfg.tls_cert,
        client_key=cfg.tls_key,
        server_name=cfg.tls_server_name,
        timeout_s=cfg.call_timeout_seconds,
        backoff=Backoff(give_up_after_s=3.0),  # a page request should not hang; the page resends
        channel_options=(
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ),
    )


def make_app(cfg: LabelWebConfig, client: FeedbackClient, guidelines: Guidelines) -> web.Application:
    """The labeling page's app; judgements go to the feedback service through `client`."""
    app = web.Application(client_max_size=_MAX_BODY, middlewares=[_security_headers])
    app[FRONT] = Front(cfg, guidelines, client, TaskBook(shuffle=cfg.shuffle), {})
    app[STATIC] = load_static()
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/me", me)
    app.router.add_post("/api/signin", signin)
    app.router.add_post("/api/signout", signout)
    app.router.add_get("/api/task", current_task)
    app.router.add_post("/api/judgements", post_judgement)
    app.router.add_post("/api/skip", skip)
    app.router.add_get("/api/stats", stats)
    return app
