"""Adversarial suite: the network surfaces started for real and attacked.

The feedback gRPC service, the labeling page and the webhook adapters each run as a
deployment runs them that was told to serve plain text on purpose (`insecure`,
`insecure_http`): bound to this machine's non-loopback IPv4 address (`hostname -I`), with
authentication on. The page and the adapters reach the feedback service over that address
with tokens of their own, so the whole stack is exposed as it would be. Each test attacks one
surface, then checks:

* nothing was accepted that should not have been (the store is read directly);
* nothing acknowledged was lost, or stored twice;
* the surface still answers a valid request correctly afterwards.

The generation server is left out: it needs Ray, and tests/services/generation/
test_http_security.py attacks it on its own.

Four attacks here succeeded when the suite was written, and were mended: undecodable PullTasks
and GetStats requests answered UNKNOWN, concurrent pulls of one token exceeding its
max_leases, deeply nested JSON answered 500 by the adapters, and the labeling page's nesting
check taking quadratic time on an unterminated string.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.client import HTTPConnection
from urllib.parse import urlsplit

import grpc
import pytest
from aiohttp import web
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hitl.feedback.v1 import feedback_pb2 as pb
from hitl.feedback.v1 import feedback_pb2_grpc as pb_grpc
from services.adapters.app import make_app as make_adapters_app
from services.adapters.config import build_config as adapters_config
from services.adapters.config import resolve
from services.adapters.outbox import Outbox
from services.feedback.client import Backoff, FeedbackClient
from services.feedback.config import FeedbackServiceConfig
from services.feedback.server import SERVICE_NAME
from services.labeling.web.app import SMALL_BODY_BYTES
from services.labeling.web.config import LabelWebConfig, load_web_config
from tests.services.adapters.conftest import (
    FAST,
    LS_TOKEN,
    SECRET,
    Adapter,
    Receiver,
    fast_client,
    ls_auth,
    payload,
    signed,
)
from tests.services.adapters.conftest import publish as publish_adapter_tasks
from tests.services.feedback.conftest import (
    ServerThread,
    make_task,
    preference,
    running_server,
)
from tests.services.labeling.conftest import publish, stored
from tests.services.labeling.test_web_auth import secret_file
from tests.services.labeling.test_web_http import ROOT, Http, WebFront, judgement

ACCEPTED, DUPLICATE, REJECTED = pb.RecordResult.STATUS_ACCEPTED, pb.RecordResult.STATUS_DUPLICATE, pb.RecordResult.STATUS_REJECTED
RPCS = {m.name for m in pb.DESCRIPTOR.services_by_name["FeedbackService"].methods}
METHOD = f"/{SERVICE_NAME}/"
JSON = "application/json"

# The feedback service's tokens (services/feedback/auth.py)
OPS_TOKEN = secrets.token_urlsafe(32)  # the operator: every project, any annotator
ALICE_TOKEN = secrets.token_urlsafe(32)  # a person: project alpha, acts only as "alice", 2 leases at most
CAROL_TOKEN = secrets.token_urlsafe(32)  # another person, on project gamma (the concurrent-lease attack)
PAGE_TOKEN = secrets.token_urlsafe(32)  # the labeling page's server: project demo, relays its annotators
ADAPTERS_TOKEN = secrets.token_urlsafe(32)  # the adapters' forwarder: project default
METRICS_KEY = secrets.token_urlsafe(32)
OPS = (("authorization", f"Bearer {OPS_TOKEN}"),)
# The labeling page's personal tokens (services/labeling/web/auth.py)
PEOPLE = {"alice": secrets.token_urlsafe(32), "bob": secrets.token_urlsafe(32)}
PREFER = {"candidate_a_id": "c1", "candidate_b_id": "c0", "choice": "A", "strength": 0.5}


# -- the surfaces -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host() -> str:
    """This machine's first non-loopback IPv4 address: the attacks come over the network."""
    words = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False).stdout.split()
    found = [w for w in words if ":" not in w and not ipaddress.ip_address(w).is_loopback]
    if not found:
        pytest.fail("this machine has no non-loopback IPv4 address to serve on (hostname -I)")
    return found[0]


@dataclass
class FeedbackSurface:
    """The feedback gRPC service on the non-loopback address, and its store."""

    server: ServerThread
    url: str
    address: str
    metrics: str

    def records(self, project: str | None = None) -> list[pb.FeedbackRecord]:
        """What the store holds (read through a handle of the test's own)."""
        return [r for r in stored(self.url) if project is None or r.project == project]

    def ids(self, project: str | None = None) -> list[str]:
        return [r.feedback_id for r in self.records(project)]

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=[("grpc.max_send_message_length", 64 << 20)])


@pytest.fixture(scope="module")
def feedback(host, tmp_path_factory):
    """Tokens for an operator, two people, the page and the adapters; metrics behind a key."""
    root = tmp_path_factory.mktemp("feedback")
    url = f"sqlite:///{root / 'feedback.db'}"
    publish(url, *[make_task(f"a{i}", "alpha", wanted=3) for i in range(10)], *[make_task(f"g{i}", "gamma") for i in range(20)],
            make_task("s0", "stream"), *[make_task(f"t{i}", "demo", wanted=2) for i in range(1, 9)])
    publish_adapter_tasks(url, "t-argilla-1", "t-ls-1")
    tokens = secret_file(root / "tokens.yaml", {"tokens": [
        {"name": "ops", "token": OPS_TOKEN, "projects": ["*"], "annotators": ["*"]},
        {"name": "alice", "token": ALICE_TOKEN, "projects": ["alpha"], "max_leases": 2},
        {"name": "carol", "token": CAROL_TOKEN, "projects": ["gamma"], "max_leases": 2},
        {"name": "label-web", "token": PAGE_TOKEN, "projects": ["demo"], "annotators": ["*"]},
        {"name": "adapters", "token": ADAPTERS_TOKEN, "projects": ["default"], "annotators": ["*"]},
    ]})
    keys = secret_file(root / "metrics-keys", METRICS_KEY + "\n")
    with running_server(url, host=host, tokens_file=tokens, insecure=True, metrics_port=0, metrics_keys_file=keys) as srv:
        yield FeedbackSurface(srv, url, f"{host}:{srv.server.port}", f"http://{host}:{srv.server.metrics_port}/metrics")


class PageOn(WebFront):
    """WebFront (the page's app as `hitl label-web` runs it) bound to `cfg.host`, not loopback."""

    def start(self, ssl_context=None) -> PageOn:
        self._thread.start()
        self._run(self.runner.setup())
        self._run(web.TCPSite(self.runner, self.cfg.host, 0).start())
        self.port = self.runner.addresses[0][1]
        return self

    @property
    def base(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"


@pytest.fixture(scope="module")
def page(host, feedback, tmp_path_factory):
    """The labeling page with personal tokens (alice, bob), reaching the service with its token."""
    root = tmp_path_factory.mktemp("page")
    tokens = secret_file(root / "annotators.yaml", [{"annotator_id": a, "token": t} for a, t in PEOPLE.items()])
    cfg = LabelWebConfig(host=host, port=0, server=feedback.address, token=PAGE_TOKEN, project="demo", insecure_http=True,
                         guidelines_version="g-7", auth={"tokens_file": str(tokens)})
    front = PageOn(cfg).start()
    try:
        yield front
    finally:
        front.stop()


class ReceiverOn(Receiver):
    """The adapters' Receiver bound to `host`, not loopback."""

    def __init__(self, host: str, app: web.Application):
        super().__init__(app)
        self.host = host

    def start(self) -> ReceiverOn:
        self._thread.start()

        async def up() -> int:
            await self._runner.setup()
            await web.TCPSite(self._runner, self.host, 0).start()
            return self._runner.addresses[0][1]

        self.port = asyncio.run_coroutine_threadsafe(up(), self.loop).result(30)
        return self


class AdaptersOn(Adapter):
    """The receivers as `hitl adapters serve --host HOST --insecure` runs them: app, outbox, forwarder."""

    def __init__(self, host: str, feedback_address: str, settings):
        self.settings = settings
        self.client = fast_client(feedback_address, ADAPTERS_TOKEN)
        self.outbox = Outbox(settings.outbox, settings.outbox_max_records)
        self.app = make_adapters_app(self.client, settings, self.outbox, FAST)
        self.receiver = ReceiverOn(host, self.app).start()
        self.port = self.receiver.port
        self.base = f"http://{host}:{self.port}"

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None, chunked: bool = False) -> tuple[int, dict]:
        status, raw = http_call(self.base + path, "POST", body, {"Content-Type": JSON, **(headers or {})}, chunked=chunked)
        return status, as_json(raw)

    def health(self) -> dict:
        status, raw = http_call(self.base + "/healthz")
        assert status == 200, raw
        return json.loads(raw)


@pytest.fixture(scope="module")
def adapters(host, feedback, tmp_path_factory):
    """Both routes with credentials, each with a `users` map (unmapped users refused)."""
    cfg = adapters_config({"host": host, "insecure": True, "outbox": tmp_path_factory.mktemp("adapters") / "outbox.db", "routes": {
        "label_studio": {"secret": LS_TOKEN, "projects": ["default"], "users": {"3": "alice", "bob@example.com": "bob"}},
        "argilla": {"secret": SECRET, "projects": ["default"], "users": {"ada": "alice"}}}})
    with AdaptersOn(host, feedback.address, resolve(cfg)) as surface:
        yield surface


# -- helpers --------------------------------------------------------------------------------------


def http_call(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None,
              chunked: bool = False) -> tuple[int, bytes]:
    """(status, body) of one request sent as given (no client-side checks); an error status is an answer."""
    parts = urlsplit(url)
    conn = HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        if chunked:
            assert body is not None
            chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
            conn.request(method, parts.path, body=chunks, headers=headers or {}, encode_chunked=True)
        else:
            conn.request(method, parts.path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def as_json(raw: bytes) -> dict:
    """A JSON answer, or the text of one that is not JSON (an error page), to show in a failure."""
    try:
        return json.loads(raw)
    except ValueError:
        return {"not_json": raw[:200]}


def routes_of(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route an app serves (aiohttp adds HEAD to each GET)."""
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}


def identity(data: bytes) -> bytes:
    return data


def raw_rpc(channel: grpc.Channel, rpc: str, response_type, kind: str = "unary_unary"):
    """A call of `rpc` whose request goes on the wire as the bytes given: malformed on purpose."""
    return getattr(channel, kind)(METHOD + rpc, request_serializer=identity, response_deserializer=response_type.FromString)


def serving(channel: grpc.Channel) -> bool:
    check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
    return check.status == health_pb2.HealthCheckResponse.SERVING


def code_of(call, *args) -> grpc.StatusCode:
    """The status `call(*args)` ends with (OK when it does not raise)."""
    try:
        call(*args)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def stream_acks(stream, batches: list[bytes], metadata: tuple) -> tuple[grpc.StatusCode, list[pb.BatchAck]]:
    """Send `batches` (bytes) on one StreamFeedback call: the status it ends with, and the acks before."""
    acks: list[pb.BatchAck] = []
    try:
        acks.extend(stream(iter(batches), metadata=metadata, timeout=30))
    except grpc.RpcError as err:
        return err.code(), acks
    return grpc.StatusCode.OK, acks


def signed_in(page: PageOn, annotator: str) -> Http:
    http = Http(page.base)
    assert http.call("POST", "/api/signin", {"token": PEOPLE[annotator]}) == (200, {"annotator_id": annotator})
    return http


def judge_current_task(http: Http, **extra) -> tuple[int, dict, dict]:
    """Prefer the first candidate of the task the page shows; (status, answer, body sent)."""
    status, data = http.call("GET", "/api/task")
    assert status == 200 and data["task"], data
    task = data["task"]
    order = [c["candidate_id"] for c in task["candidates"]]
    kind = {"preference": {**PREFER, "candidate_a_id": order[0], "candidate_b_id": order[1]}}
    body = judgement(task["task_id"], display_order=order, **{**kind, **extra})
    status, answer = http.call("POST", "/api/judgements", body)
    return status, answer, body


def ls_event(**annotation) -> dict:
    """The sample Label Studio event with fields of its annotation replaced."""
    event = json.loads(payload("label_studio_annotation_created.json"))
    event["annotation"].update(annotation)
    return event


def new_ids(surface: FeedbackSurface, before: list[str], project: str) -> Counter:
    """How often each feedback_id stored since `before` was taken appears in the store."""
    counts = Counter(surface.ids(project))
    counts.subtract(before)
    assert min(counts.values(), default=0) >= 0, "a record stored before is gone"
    return +counts


# -- 1. without a credential -------------------------------------------------------------------------


def rpc_calls(channel: grpc.Channel, record: pb.FeedbackRecord) -> dict:
    """One valid call of each RPC, by name, taking the metadata to send: only the credential varies."""
    stub = pb_grpc.FeedbackServiceStub(channel)
    pull = pb.PullTasksRequest(project=record.project, annotator_id=record.annotator_id)
    return {
        "SubmitFeedback": lambda md: stub.SubmitFeedback(pb.SubmitFeedbackRequest(records=[record]), metadata=md, timeout=10),
        "StreamFeedback": lambda md: list(stub.StreamFeedback(iter([pb.FeedbackBatch(sequence=1, records=[record])]), metadata=md, timeout=10)),
        "PullTasks": lambda md: list(stub.PullTasks(pull, metadata=md, timeout=10)),
        "GetStats": lambda md: stub.GetStats(pb.GetStatsRequest(), metadata=md, timeout=10),
    }


def test_feedback_refuses_every_rpc_without_a_valid_token(feedback):
    """Attack: every RPC of the exposed service with no token, a random token shaped like the
    real ones, a real token cut short, under another scheme or another header. Why: anyone on
    the network reaches this port; only a token holder may write, lease or read. Health stays
    open (probes need it); the metrics endpoint wants its own key."""
    before = feedback.ids()
    credentials = [(), (("authorization", f"Bearer {secrets.token_urlsafe(32)}"),), (("authorization", f"Bearer {OPS_TOKEN[:-1]}"),),
                   (("authorization", f"Basic {OPS_TOKEN}"),), (("authorization", "Bearer "),), (("x-authorization", f"Bearer {OPS_TOKEN}"),)]
    with feedback.channel() as channel:
        calls = rpc_calls(channel, preference("no-token", "a0", "alpha", annotator="alice"))
        assert set(calls) == RPCS  # every RPC the service has is attacked
        for metadata in credentials:
            for name, call in calls.items():
                assert code_of(call, metadata) == grpc.StatusCode.UNAUTHENTICATED, (name, metadata)
        assert code_of(lambda: raw_rpc(channel, "NoSuchRpc", pb.Stats)(b"", timeout=10)) == grpc.StatusCode.UNIMPLEMENTED
        assert serving(channel)
        assert calls["GetStats"](OPS).total_records == len(before)  # the same call with a real token is answered
    for headers in ({}, {"Authorization": f"Bearer {secrets.token_urlsafe(32)}"}, {"Authorization": METRICS_KEY}):
        assert http_call(feedback.metrics, headers=headers)[0] == 401, headers
    assert http_call(feedback.metrics, headers={"Authorization": f"Bearer {METRICS_KEY}"})[0] == 200
    assert feedback.ids() == before


PAGE_OPEN = {("GET", "/"), ("GET", "/static/{name}"), ("GET", "/healthz"), ("GET", "/api/me"), ("POST", "/api/signin"),
             ("POST", "/api/signout")}
PAGE_SIGNED_IN = {("GET", "/api/task"), ("POST", "/api/judgements"), ("POST", "/api/skip"), ("GET", "/api/stats")}


def test_labeling_page_refuses_every_route_without_a_valid_credential(page, feedback):
    """Attack: every API route with no session, and with a forged session cookie shaped like a
    real one; sign-in with a random token of the real tokens' shape and a real one cut short.
    Why: the page relays to the service with a token that may write as anyone; only a personal
    token's session may use it. The sign-in page itself (/, static files, /api/me, sign-in and
    sign-out, /healthz) is open by design: it answers, and names nobody."""
    assert routes_of(page.app) == PAGE_OPEN | PAGE_SIGNED_IN  # every route the page has is attacked
    before, book, sessions = feedback.ids("demo"), page.front.book.sizes(), len(page.front.gate.sessions)
    forged = {"Cookie": f"hitl_session={secrets.token_urlsafe(32)}"}
    for http in (Http(page.base, cookies=False), Http(page.base, cookies=False, headers=forged)):
        for method, path, body in [("GET", "/api/task", None), ("POST", "/api/judgements", judgement("t1", preference=PREFER)),
                                   ("POST", "/api/skip", {"task_id": "t1"}), ("GET", "/api/stats", None)]:
            status, data = http.call(method, path, body)
            assert (status, data["field"]) == (401, "annotator_id"), (path, http.headers, data)
        assert http.call("GET", "/api/me")[1]["annotator_id"] is None
        assert http.call("POST", "/api/signout") == (200, {"annotator_id": None})
        for path in ("/", "/static/app.js", "/healthz"):
            assert http_call(page.base + path, headers=http.headers)[0] == 200, path
    http = Http(page.base)
    for token in (secrets.token_urlsafe(32), PEOPLE["alice"][:-1], PEOPLE["alice"] + "x"):
        status, data = http.call("POST", "/api/signin", {"token": token})
        assert (status, data["field"]) == (401, "token") and http.set_cookies() == [] and http.session_cookie() is None
    assert feedback.ids("demo") == before  # nothing written
    assert page.front.book.sizes() == book and len(page.front.gate.sessions) == sessions  # nothing leased, no session


def test_adapters_refuse_every_route_without_a_valid_credential(adapters, feedback):
    """Attack: each webhook route unauthenticated, with a credential of the right shape that is
    not the route's (a look-alike token, a signature under another whsec_ secret), the real
    token under another scheme, a stale signature (a replay) and a body changed under its
    signature. Why: a webhook route writes judgements as the people its tool names; only the
    tool holding the route's credential may post. /healthz is open (a probe) and says nothing
    secret; a path that is no route is 404."""
    assert routes_of(adapters.app) == {("POST", "/argilla"), ("POST", "/label-studio"), ("GET", "/healthz")}
    before = feedback.ids("default")
    ls, ar = payload("label_studio_annotation_created.json"), payload("argilla_response_created.json")
    lookalike_token = LS_TOKEN[:9] + secrets.token_hex(8)  # "ls-token-" and 16 hex digits, as the real one
    lookalike_secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    attempts = [
        ("/label-studio", ls, {}),
        ("/label-studio", ls, {"Authorization": f"Token {lookalike_token}"}),
        ("/label-studio", ls, {"Authorization": f"Bearer {LS_TOKEN}"}),
        ("/label-studio", ls, {"Authorization": f"Token {LS_TOKEN[:-1]}"}),
        ("/argilla", ar, {}),
        ("/argilla", ar, signed(ar, "msg-lookalike", secret=lookalike_secret)),
        ("/argilla", ar, signed(ar, "msg-stale", at=int(time.time()) - 3600)),
        ("/argilla", ar.replace(b'"A"', b'"B"', 1), signed(ar, "msg-tampered")),
        ("/argilla", ar, {**signed(ar, "msg-wrong-id"), "webhook-id": "msg-other"}),
    ]
    for path, body, headers in attempts:
        status, answer = adapters.post(path, body, headers)
        assert status == 401 and answer["field"] in ("Authorization", "webhook-signature"), (path, headers, answer)
    assert adapters.post("/no-such-tool", ls, ls_auth())[0] == 404
    assert http_call(adapters.base + "/label-studio")[0] == 405
    assert adapters.outbox.depth() == 0 and feedback.ids("default") == before
    health = adapters.health()
    assert health["status"] == "ok" and (health["outbox"]["depth"], health["outbox"]["dead_letters"]) == (0, 0), health


def open_start(surface: str, host: str, tmp_path) -> tuple:
    """(the config check, the command's arguments, what its refusal must name) of starting
    `surface` on `host` with plain text allowed but no authentication."""
    if surface == "feedback":
        store = f"sqlite:///{tmp_path / 'feedback.db'}"
        return (lambda: FeedbackServiceConfig(store=store, host=host, insecure=True, metrics_port=None),
                ["feedback", "serve", "--store", store, "--insecure", "--no-metrics"], "tokens_file (--tokens)")
    if surface == "label-web":
        return (lambda: load_web_config(None, {"project": "demo", "host": host, "insecure_http": True}),
                ["label-web", "--project", "demo", "--insecure-http"], "auth.mode")
    outbox = tmp_path / "outbox.db"
    return (lambda: adapters_config({"host": host, "insecure": True, "outbox": outbox, "routes": {"label_studio": {"projects": ["default"]}}}),
            ["adapters", "serve", "--outbox", str(outbox), "--insecure"], "--label-studio-token")


@pytest.mark.parametrize("surface", ["feedback", "label-web", "adapters"])
def test_no_surface_starts_open_off_loopback(surface, host, tmp_path):
    """Attack (by mistake, or by an operator in a hurry): start the surface on the network
    address without authentication. Why: an open surface there lets anyone write as anyone.
    The config refuses it naming the field, and the command exits 2 naming the option before
    it opens a store or an outbox, let alone binds (nothing listens, no file is made)."""
    check, args, names = open_start(surface, host, tmp_path)
    with pytest.raises(ValueError, match="needs authentication|auth.mode") as err:
        check()
    assert names.split(" ")[0] in str(err.value)
    env = {k: v for k, v in os.environ.items() if k not in ("HITL_TOKEN", "HITL_ARGILLA_SECRET", "HITL_LABEL_STUDIO_TOKEN")}
    done = subprocess.run([sys.executable, "-m", "hitl.cli", *args, "--host", host, "--port", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and names in done.stderr, done.stderr
    assert not any(banner in done.stdout + done.stderr for banner in ("service listening on", "Running on")), done.stderr
    assert list(tmp_path.iterdir()) == []


# -- 2. malformed and oversized input, with a valid credential ------------------------------------------


def undecodable(message_type, records_field: int) -> dict[str, bytes]:
    """Byte strings that do not parse as `message_type`, each broken in another way."""
    tag = bytes([records_field << 3 | 2])
    good = message_type(records=[preference("x", "a0", "alpha", annotator="x")]).SerializeToString()
    cases = {
        "truncated": good[:-3],
        "a length past the end": tag + b"\xff\xff\xff\xff\x0f" + b"x" * 16,
        "a varint that never ends": b"\x08" + b"\x80" * 11,
        "0xff bytes": b"\xff" * 64,
        "an end-group without its start": b"\x0c",
        "groups nested 100000 deep": b"\x7b" * 100_000 + b"\x7c" * 100_000,
        "a record whose id is not UTF-8": tag + b"\x05" + b"\x0a\x03\xff\xfe\xfd",
    }
    for data in cases.values():  # the attacks are real: none of them parses
        with pytest.raises(DecodeError):
            message_type.FromString(data)
    return cases


def with_unknown_field(record: pb.FeedbackRecord, extra: bytes) -> pb.FeedbackRecord:
    return pb.FeedbackRecord.FromString(record.SerializeToString() + extra)


def test_feedback_survives_malformed_and_oversized_messages(feedback):
    """Attack: with a valid token, ingest RPCs get bytes that do not parse (truncated, a length
    past the end, groups nested 100000 deep, bad UTF-8), every RPC gets a message over the size
    limit, PullTasks and GetStats get out-of-range values, a batch holds more records than
    allowed, a stream's sequence goes back, and records carry unknown fields, fields of the
    wrong wire type and enum values out of range. Why: an authenticated client is still not
    trusted with the parser. Each is refused as documented, never INTERNAL/UNKNOWN; only
    acknowledged records are stored; afterwards a valid record is stored exactly once."""
    before = feedback.ids()
    over = 5 << 20  # the service's limit is 4 MiB
    acked: list[pb.RecordResult] = []
    with feedback.channel() as channel:
        submit = raw_rpc(channel, "SubmitFeedback", pb.SubmitFeedbackResponse)
        stream = raw_rpc(channel, "StreamFeedback", pb.BatchAck, "stream_stream")
        for name, data in undecodable(pb.SubmitFeedbackRequest, 1).items():
            with pytest.raises(grpc.RpcError) as err:
                submit(data, metadata=OPS, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "SubmitFeedbackRequest" in err.value.details(), name
        for name, data in undecodable(pb.FeedbackBatch, 2).items():
            good = pb.FeedbackBatch(sequence=1, records=[preference(f"before-{len(acked)}", "a1", "alpha", annotator="m")])
            for batches in ([data], [good.SerializeToString(), data]):
                code, acks = stream_acks(stream, batches, OPS)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, name
                assert [a.sequence for a in acks] == ([1] if len(batches) == 2 else [])  # the batch before it is acked
                acked.extend(r for a in acks for r in a.results)

        stub = pb_grpc.FeedbackServiceStub(channel)
        big = preference("big", "a1", "alpha", annotator="m")
        big.ClearField("preference")
        big.correction.candidate_id, big.correction.corrected_text = "c0", "x" * over
        oversized = {
            "SubmitFeedback": lambda: stub.SubmitFeedback(pb.SubmitFeedbackRequest(records=[big]), metadata=OPS, timeout=30),
            "StreamFeedback": lambda: list(stub.StreamFeedback(iter([pb.FeedbackBatch(sequence=1, records=[big])]), metadata=OPS, timeout=30)),
            "PullTasks": lambda: list(stub.PullTasks(pb.PullTasksRequest(project="p" * over, annotator_id="m"), metadata=OPS, timeout=30)),
            "GetStats": lambda: stub.GetStats(pb.GetStatsRequest(project="p" * over), metadata=OPS, timeout=30),
        }
        assert set(oversized) == RPCS
        for name, call in oversized.items():
            assert code_of(call) == grpc.StatusCode.RESOURCE_EXHAUSTED, name

        def pull(**fields):
            return lambda: list(stub.PullTasks(pb.PullTasksRequest(**{"project": "alpha", "annotator_id": "m", **fields}), metadata=OPS, timeout=30))

        invalid = {
            "no project": pull(project=""), "no annotator": pull(annotator_id=""), "a NUL in the project": pull(project="al\x00pha"),
            "a 129-byte annotator id": pull(annotator_id="m" * 129), "max_tasks over 1000": pull(max_tasks=1001),
            "a lease over max_lease_seconds": pull(lease_seconds=10**6),
            "stats of a project with a NUL": lambda: stub.GetStats(pb.GetStatsRequest(project="\x00"), metadata=OPS, timeout=30),
            "a sequence that goes back": lambda: list(stub.StreamFeedback(iter([pb.FeedbackBatch(sequence=5), pb.FeedbackBatch(sequence=5)]),
                                                                          metadata=OPS, timeout=30)),
        }
        for name, call in invalid.items():
            assert code_of(call) == grpc.StatusCode.INVALID_ARGUMENT, name
        crowd = pb.SubmitFeedbackRequest(records=[preference(f"crowd-{i}", "a1", "alpha", annotator="m") for i in range(1001)])
        assert code_of(lambda: stub.SubmitFeedback(crowd, metadata=OPS, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert code_of(lambda: list(stub.StreamFeedback(iter([pb.FeedbackBatch(sequence=1, records=crowd.records)]), metadata=OPS,
                                                        timeout=30))) == grpc.StatusCode.RESOURCE_EXHAUSTED

        wrong_choice = preference("enum-99", "a1", "alpha", annotator="m")
        wrong_choice.preference.choice = 99
        nested = preference("nested-unknown", "a1", "alpha", annotator="m")
        nested.preference.CopyFrom(pb.Preference.FromString(nested.preference.SerializeToString() + b"\xfa\x06\x03abc"))
        bad_records = {
            "unknown_fields": with_unknown_field(preference("top-unknown", "a1", "alpha", annotator="m"), b"\xfa\x06\x04xxxx"),
            "preference.unknown_fields": nested,
            "preference.choice": wrong_choice,
            "judgement": pb.FeedbackRecord(feedback_id="no-judgement", project="alpha", task_id="a1", annotator_id="m"),
            "feedback_id": preference("f" * 129, "a1", "alpha", annotator="m"),
            "task_id": preference("no-such-task", "nope", "alpha", annotator="m"),
        }
        # a known field sent with another wire type (feedback_id as a number) is an unknown field
        wire_type = pb.FeedbackRecord.FromString(preference("wire-type", "a1", "alpha", annotator="m").SerializeToString() + b"\x08\x05")
        records = [*bad_records.values(), wire_type]
        for results in (stub.SubmitFeedback(pb.SubmitFeedbackRequest(records=records), metadata=OPS, timeout=30).results,
                        [r for a in stub.StreamFeedback(iter([pb.FeedbackBatch(sequence=1, records=records)]), metadata=OPS, timeout=30)
                         for r in a.results]):
            assert [(r.status, r.field) for r in results] == [(REJECTED, f) for f in [*bad_records, "unknown_fields"]]

        # afterwards: the service answers, and a valid record is stored exactly once
        assert serving(channel)
        valid = preference("valid-after-barrage", "a2", "alpha", annotator="m")
        first = stub.SubmitFeedback(pb.SubmitFeedbackRequest(records=[valid]), metadata=OPS, timeout=30).results
        again = stub.SubmitFeedback(pb.SubmitFeedbackRequest(records=[valid]), metadata=OPS, timeout=30).results
        assert [r.status for r in first] == [ACCEPTED] and [r.status for r in again] == [DUPLICATE]
    assert {r.status for r in acked} == {ACCEPTED}
    assert new_ids(feedback, before, "alpha") == Counter([r.feedback_id for r in acked] + ["valid-after-barrage"])


def test_undecodable_pull_and_stats_requests_are_invalid_argument(feedback):
    """Attack: with a valid token, PullTasks and GetStats get bytes that do not parse. Why: an
    UNKNOWN status reads as a server fault (clients retry it, alerts fire), and the handler
    was entered with a request it could not read."""
    codes = {}
    with feedback.channel() as channel:
        pull = raw_rpc(channel, "PullTasks", pb.LabelingTask, "unary_stream")
        stats = raw_rpc(channel, "GetStats", pb.Stats)
        for name, data in (("0xff bytes", b"\xff" * 64), ("a length past the end", b"\x0a\xff\xff\xff\xff\x0f"),
                           ("groups nested 100000 deep", b"\x7b" * 100_000 + b"\x7c" * 100_000)):
            codes["PullTasks", name] = code_of(lambda d: list(pull(d, metadata=OPS, timeout=30)), data)
            codes["GetStats", name] = code_of(lambda d: stats(d, metadata=OPS, timeout=30), data)
        assert serving(channel)  # it does survive
    assert codes == {key: grpc.StatusCode.INVALID_ARGUMENT for key in codes}


def test_labeling_page_survives_malformed_and_oversized_bodies(page, feedback):
    """Attack: a signed-in annotator posts to each body-taking route a body that is not JSON,
    not UTF-8, not an object, nested 100000 deep, over the route's limit (with a length and
    chunked), of the wrong content type, or with fields of the wrong type; and probes the GET
    routes with path traversal and oversized headers. Why: one browser (or a script with a
    stolen session) must not take the page down for everyone. Each is a 4xx naming the field,
    never a 500; afterwards a valid judgement is stored exactly once and /healthz answers."""
    http = signed_in(page, "alice")
    before = feedback.ids("demo")
    cookie = {"Cookie": f"hitl_session={http.session_cookie()}"}
    limits = {"/api/signin": SMALL_BODY_BYTES, "/api/skip": SMALL_BODY_BYTES, "/api/judgements": page.cfg.max_body_bytes}
    deep = b"[" * 100_000 + b"]" * 100_000
    for path, limit in limits.items():
        cases = [
            (b'{"task_id": "t1"}', "text/plain", 415, "Content-Type"),
            (b"task_id=t1", "application/x-www-form-urlencoded", 415, "Content-Type"),
            (b"{nope", JSON, 400, "body"), (b"\xff\xfe{}", JSON, 400, "body"), (b"[]", JSON, 400, "body"), (b"null", JSON, 400, "body"),
            (b"[" * 4000, JSON, 400, "body"), (b'{"a":' * 800, JSON, 400, "body"),
            (deep, JSON, 413 if len(deep) > limit else 400, "body"),
            (json.dumps({"task_id": "t1", "pad": "p" * limit}).encode(), JSON, 413, "body"),
        ]
        for raw, content_type, status, field in cases:
            got, data = http.call("POST", path, raw=raw, content_type=content_type)
            assert (got, data["field"]) == (status, field), (path, raw[:20], data)
        got, raw = http_call(page.base + path, "POST", b'{"pad": "' + b"p" * limit + b'"}', {"Content-Type": JSON, **cookie}, chunked=True)
        assert (got, as_json(raw)["field"]) == (413, "body"), (path, raw)
    wrong_types = [
        ("/api/signin", {"token": 12345}, "token"), ("/api/signin", {"token": ["x" * 43]}, "token"),
        ("/api/skip", {"task_id": 7}, "task_id"), ("/api/skip", {"task_id": {"$ne": ""}}, "task_id"),
        ("/api/judgements", judgement("t1", preference=PREFER, feedback_id=5), "feedback_id"),
        ("/api/judgements", judgement("t1", preference=PREFER, lead_time_seconds="fast"), "lead_time_seconds"),
        ("/api/judgements", judgement("t1", preference={**PREFER, "choice": 1}), "preference.choice"),
        ("/api/judgements", judgement("t1", preference=PREFER, display_order="c1c0"), "display_order"),
        ("/api/judgements", judgement("t1", preference=PREFER, confidence=7), "confidence"),
        ("/api/judgements", judgement("t1", preference=PREFER, ranking={"entries": []}), "ranking.entries"),
    ]
    for path, body, field in wrong_types:
        got, data = http.call("POST", path, body)
        assert (got, data["field"]) == (400, field), (path, body, data)
    for path, headers in [("/static/..%2F..%2Fapp.py", {}), ("/static/../app.py", {}), ("/static/" + "a" * 300, {}),
                          ("/api/task", {"Cookie": "hitl_session=" + "A" * 20_000}), ("/nope", {})]:
        got, raw = http_call(page.base + path, headers=headers)
        assert 400 <= got < 500 and b"import" not in raw, (path, got, raw[:100])
    assert http_call(page.base + "/api/judgements", "PUT", b"{}", {"Content-Type": JSON, **cookie})[0] == 405
    assert feedback.ids("demo") == before

    status, answer, body = judge_current_task(http)
    assert (status, answer["status"]) == (200, "accepted"), answer
    assert http.call("POST", "/api/judgements", body)[1]["status"] == "duplicate"  # the page's resend
    assert new_ids(feedback, before, "demo") == Counter([body["feedback_id"]])
    assert http_call(page.base + "/healthz") == (200, b"ok") and http.call("GET", "/api/me")[1]["annotator_id"] == "alice"


def test_labeling_page_depth_check_on_an_unterminated_string(page):
    """Attack: a signed-in annotator posts a judgement body of 40 brackets and an unterminated
    string of escaped quotes (16 KiB, well within max_body_bytes). Why: the depth check runs on
    the page's event loop before anything else; a regular expression for JSON strings
    backtracked on this body (quadratic: a second of the loop's CPU at 16 KiB, minutes at
    256 KiB). The check is now one pass over the brackets, quotes and backslashes
    (`nests_deeper_than`); here its verdicts on such bodies, and the page answering after."""
    from services.labeling.web.app import nests_deeper_than

    http = signed_in(page, "bob")
    body = b"[" * 40 + b'"' + b'\\"' * (8 * 1024)
    status, data = http.call("POST", "/api/judgements", raw=body)
    assert (status, data["field"]) == (400, "body")
    assert http_call(page.base + "/healthz") == (200, b"ok")
    assert nests_deeper_than(body, 32)  # the brackets come before the string
    assert not nests_deeper_than(b'"' + b'\\"' * 1024 + b"[" * 40, 32)  # inside the open string: not nesting
    assert nests_deeper_than(b'["a\\\\"' + b"," + b"[" * 40, 32)  # an escaped backslash closes nothing early


def test_adapters_survive_malformed_and_oversized_deliveries(adapters, feedback):
    """Attack: with the route's valid credential, bodies that are not JSON, not UTF-8, not an
    object, fields of the wrong type or missing, a record over the 1 MiB forwarding limit and a
    body over the 8 MiB request limit (with a length and chunked). Why: a tool's credential can
    leak, and a tool can send junk; none of it may reach the outbox or take the receiver down.
    Each is a 4xx naming the field; afterwards a valid delivery is stored exactly once, even
    when it is delivered twice."""
    before = feedback.ids("default")

    def argilla_with(change) -> bytes:
        event = json.loads(payload("argilla_response_created.json"))
        change(event)
        return json.dumps(event).encode()

    huge_correction = ls_event(result=[*ls_event()["annotation"]["result"], {"from_name": "correction", "type": "textarea",
                                                                             "value": {"text": ["x" * (1 << 20)]}}])
    cases = [
        ("/label-studio", b"{nope", 400, "body"), ("/label-studio", b"\xff\xfe{}", 400, "body"),
        ("/label-studio", b"[]", 400, "body"), ("/label-studio", b'"ANNOTATION_CREATED"', 400, "body"),
        ("/label-studio", payload("label_studio_annotation_bad_rating.json"), 400, "annotation.result[1].value.rating"),
        ("/label-studio", json.dumps(ls_event(id=[5501])).encode(), 400, "annotation.id"),
        ("/label-studio", json.dumps(ls_event(completed_by=True)).encode(), 400, "annotation.completed_by"),
        ("/label-studio", json.dumps({**ls_event(), "task": "t-ls-1"}).encode(), 400, "task"),
        ("/label-studio", json.dumps(huge_correction).encode(), 413, "body"),
        ("/argilla", b"{nope", 400, "body"), ("/argilla", b"null", 400, "body"),
        ("/argilla", payload("argilla_response_missing_external_id.json"), 400, "data.record.external_id"),
        ("/argilla", argilla_with(lambda e: e["data"]["values"]["preference"].update(value=7)), 400, "data.values.preference.value"),
        ("/argilla", argilla_with(lambda e: e.update(data="submitted")), 400, "data"),
        ("/argilla", argilla_with(lambda e: e["data"]["user"].update(username=["ada"])), 400, "data.user.username"),
    ]
    for path, body, status, field in cases:
        headers = ls_auth() if path == "/label-studio" else signed(body, f"msg-{len(body)}")
        got, answer = adapters.post(path, body, headers)
        assert (got, answer.get("field")) == (status, field), (path, body[:40], answer)
    over = b'{"pad": "' + b"p" * (8 << 20) + b'"}'
    for chunked in (False, True):
        assert adapters.post("/label-studio", over, ls_auth(), chunked=chunked)[0] == 413
        assert adapters.post("/argilla", over, signed(over, "msg-over"), chunked=chunked)[0] == 413
    assert adapters.outbox.depth() == 0 and feedback.ids("default") == before

    event = ls_event(id=6601)
    for _ in range(2):  # Label Studio's "resend"
        status, answer = adapters.post("/label-studio", json.dumps(event).encode(), ls_auth())
        assert (status, answer["queued"]) == (202, 2), answer
    adapters.drain()
    assert new_ids(feedback, before, "default") == Counter(answer["feedback_ids"])
    assert {r.annotator_id for r in feedback.records("default") if r.feedback_id in answer["feedback_ids"]} == {"alice"}
    health = adapters.health()
    assert health["status"] == "ok" and (health["outbox"]["depth"], health["outbox"]["dead_letters"]) == (0, 0), health


def test_adapters_answer_deeply_nested_json_with_400(adapters):
    """Attack: with the route's credential, a JSON body nested 100000 deep. Why: json.loads
    recurses once per level; the receiver must answer 400 naming `body`, as the labeling page
    does, not 500 (which the tool reports as our outage and, for Argilla, retries)."""
    answers = []
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        answers.append(adapters.post("/label-studio", body, ls_auth()))
        answers.append(adapters.post("/argilla", body, signed(body, "msg-deep")))
    assert adapters.outbox.depth() == 0 and adapters.health()["status"] == "ok"  # it does survive
    assert [(status, answer.get("field")) for status, answer in answers] == [(400, "body")] * len(answers), answers


# -- 3. one credential posing as many ------------------------------------------------------------------


def test_a_person_token_cannot_act_as_another_or_hoard_leases(feedback):
    """Attack (Sybil): alice's personal token (no `annotators`: it speaks for `alice` only)
    writes, streams and leases as bob, reaches into a project outside its scope, answers a
    task nobody handed her, and leases past its `max_leases` (2). Why: annotator agreement,
    quality figures and rewards rest on who judged; one person must not pose as many, or
    take every open task. Only her own answers to tasks she leased are stored."""
    before = feedback.ids()
    md = (("authorization", f"Bearer {ALICE_TOKEN}"),)
    as_bob = [preference("as-bob", "a3", "alpha", annotator="bob")]
    mixed = [preference("mixed-alice", "a3", "alpha", annotator="alice"), *as_bob]
    with feedback.channel() as channel:
        stub = pb_grpc.FeedbackServiceStub(channel)
        denied = {
            "submit as bob": lambda: stub.SubmitFeedback(pb.SubmitFeedbackRequest(records=as_bob), metadata=md, timeout=10),
            "submit alice and bob": lambda: stub.SubmitFeedback(pb.SubmitFeedbackRequest(records=mixed), metadata=md, timeout=10),
            "stream as bob": lambda: list(stub.StreamFeedback(iter([pb.FeedbackBatch(sequence=1, records=as_bob)]), metadata=md, timeout=10)),
            "stream alice, then bob": lambda: list(stub.StreamFeedback(iter([pb.FeedbackBatch(sequence=1, records=mixed[:1]),
                                                                             pb.FeedbackBatch(sequence=2, records=as_bob)]), metadata=md, timeout=10)),
            "lease as bob": lambda: list(stub.PullTasks(pb.PullTasksRequest(project="alpha", annotator_id="bob"), metadata=md, timeout=10)),
            "lease in another project": lambda: list(stub.PullTasks(pb.PullTasksRequest(project="gamma", annotator_id="alice"),
                                                                    metadata=md, timeout=10)),
            "stats of another project": lambda: stub.GetStats(pb.GetStatsRequest(project="gamma"), metadata=md, timeout=10),
        }
        for name, call in denied.items():
            assert code_of(call) == grpc.StatusCode.PERMISSION_DENIED, name
        with FeedbackClient(feedback.address, ALICE_TOKEN, backoff=Backoff(give_up_after_s=0)) as client:
            # ("stream alice, then bob" had alice's batch acked: REJECTED, as she was never handed that task)
            unleased = client.submit([preference("unleased", "a4", "alpha", annotator="alice")])
            assert [(r.status, r.field) for r in unleased] == [(REJECTED, "task_id")] and "never handed" in unleased[0].reason
            leased = [t.task_id for t in client.pull_tasks("alpha", "alice", max_tasks=10)]
            assert len(leased) == 2  # max_leases
            assert code_of(denied["lease as bob"]) == grpc.StatusCode.PERMISSION_DENIED  # still bob's
            one_more = pb.PullTasksRequest(project="alpha", annotator_id="alice")
            assert code_of(lambda: list(stub.PullTasks(one_more, metadata=md, timeout=10))) == grpc.StatusCode.RESOURCE_EXHAUSTED
            mine = [preference(f"alice-{t}", t, "alpha", annotator="alice") for t in leased]
            assert [r.status for r in client.submit(mine)] == [ACCEPTED, ACCEPTED]
    stored_now = {r.feedback_id: r.annotator_id for r in feedback.records() if r.feedback_id not in before}
    assert stored_now == {f"alice-{t}": "alice" for t in leased}


def test_concurrent_pulls_stay_within_max_leases(feedback):
    """Attack (Sybil, in parallel): carol's token (max_leases 2) opens 8 PullTasks calls at once,
    each asking for 2 tasks. Why: the quota is what keeps one person from taking every open
    task; it must hold however the calls are timed."""
    leased: list[str] = []
    codes: list[grpc.StatusCode] = []
    start = threading.Barrier(8)

    def pull() -> None:
        with grpc.insecure_channel(feedback.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = pb_grpc.FeedbackServiceStub(channel)
            start.wait(30)
            try:
                for task in stub.PullTasks(pb.PullTasksRequest(project="gamma", annotator_id="carol", max_tasks=2),
                                           metadata=(("authorization", f"Bearer {CAROL_TOKEN}"),), timeout=30):
                    leased.append(task.task_id)
            except grpc.RpcError as err:
                codes.append(err.code())

    threads = [threading.Thread(target=pull) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert len(leased) <= 2, f"max_leases 2, leased {len(leased)}: {sorted(leased)}"


def test_a_signed_in_annotator_cannot_write_as_another(page, feedback):
    """Attack (Sybil): alice, signed in with her personal token, names bob in a judgement's
    body (as `annotator_id` and as another key), in a skip, and at sign-in beside her token.
    Why: the page relays with a token that may write as anyone, so the page alone decides
    who judged; it must take that from the credential only. Her own judgement is stored as
    hers."""
    before = feedback.ids("demo")
    http = signed_in(page, "alice")
    for extra in ({"annotator_id": "bob"}, {"annotator": "bob"}, {"annotator_id": "alice"}):
        status, answer, _ = judge_current_task(http, **extra)
        assert (status, answer["field"]) == (400, next(iter(extra))), answer
    status, answer = http.call("POST", "/api/skip", {"task_id": "t1", "annotator_id": "bob"})
    assert (status, answer["field"]) == (400, "annotator_id")
    status, answer = Http(page.base).call("POST", "/api/signin", {"token": PEOPLE["alice"], "annotator_id": "bob"})
    assert (status, answer["field"]) == (400, "body")
    assert feedback.ids("demo") == before
    status, answer, body = judge_current_task(http)
    assert (status, answer["status"]) == (200, "accepted"), answer
    assert [(r.feedback_id, r.annotator_id) for r in feedback.records("demo") if r.feedback_id not in before] == [(body["feedback_id"], "alice")]


def test_adapters_refuse_unmapped_tool_users(adapters, feedback):
    """Attack (Sybil): deliveries with the route's valid credential naming tool users the
    route's `users` map does not list (an unknown Label Studio id, an object with an unknown
    email, an unknown Argilla username). Why: whoever can make accounts in the tool must not
    get judgements recorded under annotator ids nobody gave them. 403 naming the user;
    mapped users are stored as their mapped annotator ids."""
    before = feedback.ids("default")
    argilla_as = json.loads(payload("argilla_response_created.json"))
    argilla_as["data"]["user"].update(username="mallory", id="4f7e0000-0000-4000-8000-000000000000")
    mallory = json.dumps(argilla_as).encode()
    for path, body, headers, field in [
        ("/label-studio", json.dumps(ls_event(completed_by=4)).encode(), ls_auth(), "annotation.completed_by"),
        ("/label-studio", json.dumps(ls_event(completed_by={"id": 4, "email": "mallory@example.com"})).encode(), ls_auth(),
         "annotation.completed_by"),
        ("/argilla", mallory, signed(mallory, "msg-mallory"), "data.user.username"),
    ]:
        status, answer = adapters.post(path, body, headers)
        assert (status, answer["field"]) == (403, field) and "not mapped" in answer["reason"], answer
    assert adapters.outbox.depth() == 0 and feedback.ids("default") == before
    bob = json.dumps(ls_event(id=7701, completed_by={"id": 9, "email": "bob@example.com"})).encode()
    ada = payload("argilla_response_created.json")
    queued = [adapters.post("/label-studio", bob, ls_auth()), adapters.post("/argilla", ada, signed(ada, "msg-ada"))]
    assert [status for status, _ in queued] == [202, 202], queued
    adapters.drain()
    by_id = {r.feedback_id: r.annotator_id for r in feedback.records("default") if r.feedback_id not in before}
    assert by_id == {**{fid: "bob" for fid in queued[0][1]["feedback_ids"]}, **{fid: "alice" for fid in queued[1][1]["feedback_ids"]}}


# -- 4. nothing acknowledged lost -------------------------------------------------------------------------


N_RECORDS = 2000
ALLOWED_REFUSALS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.PERMISSION_DENIED}


CROWD = pb.FeedbackBatch(sequence=1, records=[preference(f"crowd-{i}", "s0", "stream", annotator="hammer")
                                               for i in range(1001)]).SerializeToString()  # over max_batch_records


def barrage(round_: int) -> list[tuple[list[bytes], tuple]]:
    """One round of malformed streams: (the batches' bytes, the metadata) of each."""
    def batch(seq: int, *records: pb.FeedbackRecord) -> bytes:
        return pb.FeedbackBatch(sequence=seq, records=records).SerializeToString()

    good = batch(1, *[preference(f"hammer-{round_}-{j}", "s0", "stream", annotator="hammer") for j in range(5)])
    unknown = with_unknown_field(preference(f"hammer-unknown-{round_}", "s0", "stream", annotator="hammer"), b"\xfa\x06\x01x")
    alice = (("authorization", f"Bearer {ALICE_TOKEN}"),)
    return [
        ([good, b"\xff" * 32, batch(3, preference(f"never-read-{round_}", "s0", "stream", annotator="hammer"))], OPS),
        ([good], OPS),  # the same batch on a new stream: DUPLICATE, stored once
        ([b"\x7b" * 100_000 + b"\x7c" * 100_000], OPS),
        ([batch(7), batch(7)], OPS),
        ([batch(1, unknown)], OPS),  # acked, REJECTED, not stored
        ([batch(1, preference(f"foreign-{round_}", "s0", "stream", annotator="alice"))], alice),
        ([CROWD], OPS),
    ]



def test_acknowledged_records_survive_a_malformed_stream_barrage(feedback):
    """Attack: while one client streams N records with the Python client, another opens stream
    after stream of malformed batches (bytes that do not parse, after a good batch too; a
    sequence that goes back; a batch over the record limit; records of a project its token
    may not write; unknown fields), and replays a good batch. Why: a server that lets one bad
    stream disturb another could drop or double records it acknowledged. Every acknowledged
    record is in the store exactly once, and nothing unacknowledged is."""
    before = feedback.ids("stream")
    records = [preference(f"bulk-{i}", "s0", "stream", annotator=f"w{i % 50}") for i in range(N_RECORDS)]
    writing, done = threading.Event(), threading.Event()
    refusals: list[grpc.StatusCode] = []
    hammer_acks: list[pb.RecordResult] = []
    rounds_while_writing = [0]
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            with feedback.channel() as channel:
                stream = raw_rpc(channel, "StreamFeedback", pb.BatchAck, "stream_stream")
                round_ = 0
                while not done.is_set():
                    for batches, metadata in barrage(round_):
                        code, acks = stream_acks(stream, batches, metadata)
                        refusals.append(code)
                        hammer_acks.extend(r for a in acks for r in a.results)
                    round_ += 1
                    rounds_while_writing[0] += writing.is_set() and not done.is_set()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        with FeedbackClient(feedback.address, OPS_TOKEN, batch_size=25, backoff=Backoff(give_up_after_s=30)) as client:
            writing.set()
            report = client.stream(records, window=8, on_ack=lambda ack: time.sleep(0.01))
    finally:
        done.set()
        thread.join(120)
    assert not errors and not thread.is_alive(), errors
    assert rounds_while_writing[0] >= 2, "the barrage overlapped the stream"
    assert set(refusals) <= ALLOWED_REFUSALS, Counter(refusals)
    assert {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED} <= set(refusals)
    assert [r.feedback_id for r in report.results] == [r.feedback_id for r in records]
    assert {r.status for r in report.results} <= {ACCEPTED, DUPLICATE}
    acknowledged = {r.feedback_id for r in [*report.results, *hammer_acks] if r.status in (ACCEPTED, DUPLICATE)}
    assert DUPLICATE in {r.status for r in hammer_acks} and REJECTED in {r.status for r in hammer_acks}
    stored_now = new_ids(feedback, before, "stream")
    assert set(stored_now) == acknowledged  # every acknowledged record, and nothing else
    assert set(stored_now.values()) == {1}  # each exactly once
