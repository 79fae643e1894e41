"""The HTTP front of the labeling page: static files and a small JSON API.

    GET  /                    the page (static/index.html); /static/app.js, /static/style.css
    GET  /api/me              {"annotator_id" (null until signed in), "auth" (the sign-in mode), "project",
                              "guidelines", "guidelines_version"}
    POST /api/signin          {"token": "..."} (mode tokens) or {"annotator_id": "alice"} (mode open)
                              -> {"annotator_id"} and a session cookie; mode header: none (the proxy signs in)
    POST /api/signout         ends the session
    GET  /api/task            {"task": {...} | null, "held": N}: the annotator's current task (pulled when none is held)
    POST /api/judgements      one judgement (see judgements.py) -> {"status": "accepted" | "duplicate", "seq", ...}
    POST /api/skip            {"task_id": "t1"}: the task is set aside (its lease runs out and frees it)
    GET  /api/stats           the annotator's record count on the service and open tasks (null when it
                              cannot be reached), and this server's tally for the annotator
    GET  /healthz             200 "ok"

Errors are JSON {"error", "field", "reason"}: 400 a malformed body (the field's path; `body`
for one that is not a JSON object, or nests deeper than 32), 401 not signed in (or a wrong
token, or no proxy secret), 409 a judgement that contradicts what the server knows (other
guidelines, a task already judged with another feedback_id), 413 a body over its limit
(`max_body_bytes` for a judgement, 4 KiB for the rest), 415 a POST that is not JSON, 422 a
record the service rejected (its field and reason: unknown task, unknown candidate, a
rating off its scale), 502 the service could not be reached (the page retries with the
same feedback_id).

Who the annotator is comes from a credential only (auth.py: a personal token's session, a
sign-in proxy's header with its shared secret, or on loopback a self-declared id), never
from a body: a body naming `annotator_id` is refused. The service's bearer token stays in
this server. What the server keeps per annotator or per task is bounded (tasks.py, auth.py,
KeyedLocks), and every id is checked (at most 128 bytes) before anything is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from hitl.feedback.v1 import feedback_pb2 as pb
from services.feedback.client import Backoff, FeedbackClient, FeedbackClientError
from services.labeling.web.auth import Denied, Gate, Sessions, id_problem
from services.labeling.web.config import Guidelines, LabelWebConfig
from services.labeling.web.judgements import BadJudgement, parse_judgement, to_record
from services.labeling.web.tasks import TaskBook

log = logging.getLogger(__name__)

_STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
SMALL_BODY_BYTES = 4096
"""Largest body of a sign-in or a skip: a token or an id, and some JSON around it."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects in a body; a judgement needs 4."""
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class KeyedLocks:
    """One asyncio.Lock per annotator, kept only while someone holds or waits for it.

    A lock that nobody uses is dropped at once, so the table holds no more entries than
    there are requests in flight, however many annotator ids come and go."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass
class Front:
    """What the handlers share: the config, the gRPC client, the task book, the gate, per-annotator locks."""

    cfg: LabelWebConfig
    guidelines: Guidelines
    client: FeedbackClient
    book: TaskBook
    gate: Gate
    locks: KeyedLocks


FRONT = web.AppKey("front", Front)
STATIC = web.AppKey("static", dict)


class Refused(Exception):
    """A request answered with an error before (or instead of) its work: status, field, reason."""

    def __init__(self, status: int, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.status = status
        self.field = field
        self.reason = reason


def error(status: int, field: str, reason: str) -> web.Response:
    return web.json_response({"error": f"{field}: {reason}", "field": field, "reason": reason}, status=status)


@web.middleware
async def _refusals(request: web.Request, handler) -> web.StreamResponse:
    """Refused (a bad body) and Denied (no annotator) become JSON errors naming the field."""
    try:
        return await handler(request)
    except (Refused, Denied) as err:
        return error(err.status, err.field, err.reason)


# -- bodies ---------------------------------------------------------------------------


_SPECIAL = re.compile(rb'[\[\]{}"\\]')


def nests_deeper_than(body: bytes, limit: int) -> bool:
    """Whether arrays and objects nest deeper than `limit`, found without parsing: json.loads
    recurses once per level (RecursionError on `[` * 100000). Brackets inside strings do not count.

    One pass over the bytes that matter (brackets, quotes, backslashes), so linear in the body
    whatever it holds: a regular expression for strings backtracks on a string left open."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # too few brackets to nest that deep: nothing to scan
    depth, in_string, escaped = 0, False, -1
    for match in _SPECIAL.finditer(body):
        at = match.start()
        if at == escaped:
            continue
        byte = body[at]
        if in_string:
            if byte == 0x5C:  # a backslash escapes the next byte
                escaped = at + 1
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


async def read_json_bytes(request: web.Request, limit: int) -> bytes:
    """The body of a JSON POST, refused before parsing: 415 not JSON, 413 over `limit`, 400 too deep."""
    if request.content_type != "application/json":
        raise Refused(415, "Content-Type", "send application/json")
    too_large = Refused(413, "body", f"at most {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    if len(body) > limit:
        raise too_large
    if nests_deeper_than(body, MAX_JSON_DEPTH):
        raise Refused(400, "body", f"nested deeper than {MAX_JSON_DEPTH} levels")
    return body


async def json_object(request: web.Request, limit: int = SMALL_BODY_BYTES) -> dict[str, object]:
    """A small JSON object body (a sign-in, a skip); anything else is refused naming `body`."""
    raw = await read_json_bytes(request, limit)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Refused(400, "body", f"not JSON ({err})") from None
    except RecursionError:  # a nesting the scan above let through still answers 400, never 500
        raise Refused(400, "body", "nested too deeply") from None
    if not isinstance(body, dict):
        raise Refused(400, "body", "expected a JSON object")
    return body


# -- the annotator ----------------------------------------------------------------


def _signed_in(handler):
    """Answer 401 unless the request's credential names an annotator; pass the id on."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        return await handler(request, request.app[FRONT].gate.annotator_of(request))

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def _annotator_or_none(request: web.Request) -> str | None:
    try:
        return request.app[FRONT].gate.annotator_of(request)
    except Denied:
        return None


async def me(request: web.Request) -> web.Response:
    """Who is signed in, how one signs in, and what the page shows before any task."""
    front = request.app[FRONT]
    return web.json_response(
        {
            "annotator_id": _annotator_or_none(request),
            "auth": front.cfg.auth.mode,
            "project": front.cfg.project,
            "guidelines": front.guidelines.text,
            "guidelines_version": front.guidelines.version,
        }
    )


async def signin(request: web.Request) -> web.Response:
    """A token's owner (or, in open mode, the id typed) gets a new session; nothing else does."""
    gate = request.app[FRONT].gate
    annotator = gate.sign_in(await json_object(request))
    response = web.json_response({"annotator_id": annotator})
    gate.sign_out(request, response)  # a session this browser had before ends here
    gate.set_cookie(response, annotator)
    return response


async def signout(request: web.Request) -> web.Response:
    response = web.json_response({"annotator_id": None})
    request.app[FRONT].gate.sign_out(request, response)
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
    async with front.locks.hold(annotator):
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
    """Set a held task aside; its id is checked before the book is touched."""
    body = await json_object(request)
    unknown = sorted(set(body) - {"task_id"})
    if unknown:
        raise Refused(400, unknown[0], "unknown key")
    task_id = body.get("task_id")
    problem = id_problem(task_id)
    if problem is not None:
        raise Refused(400, "task_id", f"the id of the task to skip: {problem}")
    assert isinstance(task_id, str)
    front = request.app[FRONT]
    return web.json_response({"task_id": task_id, "skipped": front.book.finish(annotator, task_id)})


# -- judgements ------------------------------------------------------------------------


_STATUS = {pb.RecordResult.STATUS_ACCEPTED: "accepted", pb.RecordResult.STATUS_DUPLICATE: "duplicate"}


@_signed_in
async def post_judgement(request: web.Request, annotator: str) -> web.Response:
    """Store one judgement; a resend (same feedback_id and content) is answered `duplicate`."""
    front = request.app[FRONT]
    body = await read_json_bytes(request, front.cfg.max_body_bytes)
    try:
        judgement = parse_judgement(body)
        record = to_record(judgement, project=front.cfg.project, annotator_id=annotator)
    except BadJudgement as err:
        return error(400, err.field, err.reason)
    if judgement.guidelines_version != front.guidelines.version:
        return error(409, "guidelines_version", f"the guidelines are now version {front.guidelines.version!r}: reload the page")
    async with front.locks.hold(annotator):
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


def make_gate(cfg: LabelWebConfig) -> Gate:
    """The sign-in of the configured mode, with the secrets the config read and checked."""
    auth = cfg.auth
    return Gate(
        mode=auth.mode,
        sessions=Sessions(auth.session_ttl_seconds, auth.max_sessions),
        tokens=cfg.annotator_tokens,
        user_header=auth.user_header,
        secret_header=auth.proxy_secret_header,
        proxy_secret=cfg.proxy_secret_digest,
        secure_cookie=cfg.secure_cookie,
        session_ttl_s=auth.session_ttl_seconds,
    )


def make_app(cfg: LabelWebConfig, client: FeedbackClient, guidelines: Guidelines) -> web.Application:
    """The labeling page's app; judgements go to the feedback service through `client`."""
    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[_security_headers, _refusals])
    book = TaskBook(shuffle=cfg.shuffle, max_annotators=cfg.max_annotators, max_tasks=cfg.max_tasks_per_annotator)
    app[FRONT] = Front(cfg, guidelines, client, book, make_gate(cfg), KeyedLocks())
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
