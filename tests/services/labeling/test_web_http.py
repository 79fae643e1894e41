"""`hitl label-web` at the HTTP level: the JSON API in front of a real gRPC
feedback server on a SQLite store; bad input, resends, the config and the
command. The page itself, in a real browser, is tested in test_web_page.py."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from fnmatch import fnmatch
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
from aiohttp import web

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from hitl.feedback.v1 import feedback_pb2 as pb
from services.labeling.web.app import FRONT, Front, load_static, make_app, make_client
from services.labeling.web.config import (
    ConfigError,
    Guidelines,
    LabelWebConfig,
    load_web_config,
    resolve_guidelines,
)
from tests.services.feedback.conftest import make_task
from tests.services.labeling.conftest import publish, start_server, stored

ROOT = Path(__file__).resolve().parents[3]
STATIC = ROOT / "services" / "labeling" / "web" / "static"


# -- the pieces the browser tests share ----------------------------------------------------


class WebFront:
    """The labeling page's server (make_app, as `hitl label-web` runs it) on its own loop in a thread."""

    def __init__(self, cfg: LabelWebConfig, guidelines: Guidelines | None = None):
        self.cfg = cfg
        self.client = make_client(cfg)
        self.app = make_app(cfg, self.client, guidelines or resolve_guidelines(cfg))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner = web.AppRunner(self.app)
        self.port = 0

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def start(self, ssl_context: ssl.SSLContext | None = None) -> "WebFront":
        self._thread.start()
        self._run(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        self._run(site.start())
        self.port = self.runner.addresses[0][1]
        self.scheme = "https" if ssl_context is not None else "http"
        return self

    @property
    def base(self) -> str:
        return f"{getattr(self, 'scheme', 'http')}://127.0.0.1:{self.port}"

    @property
    def front(self) -> Front:
        """What the handlers share (the task book, the sessions, the locks), to count what it holds."""
        return self.app[FRONT]

    def stop(self) -> None:
        self._run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.client.close()


def web_config(address: str, **values) -> LabelWebConfig:
    return LabelWebConfig(server=address, project="demo", port=0, **values)


# -- an HTTP client with cookies ------------------------------------------------------------------


class Http:
    """A tiny JSON client that keeps the sign-in cookie, as a browser would (or, with
    `cookies=False`, sends only the headers it is given: a forged cookie, a proxy's headers)."""

    def __init__(self, base: str, cookies: bool = True, headers: dict[str, str] | None = None,
                 ssl_context: ssl.SSLContext | None = None):
        self.base = base
        self.jar = CookieJar()
        handlers: list = [urllib.request.HTTPSHandler(context=ssl_context)] if ssl_context else []
        if cookies:
            handlers.append(urllib.request.HTTPCookieProcessor(self.jar))
        self._opener = urllib.request.build_opener(*handlers)
        self.headers = dict(headers or {})
        self.last_headers: dict[str, list[str]] = {}

    def call(self, method: str, path: str, body: object = None, *, raw: bytes | None = None,
             content_type: str = "application/json", headers: dict[str, str] | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.base + path, data=data, method=method, headers={**self.headers, **(headers or {})})
        if data is not None:
            request.add_header("Content-Type", content_type)
        try:
            with self._opener.open(request, timeout=30) as response:
                self._keep_headers(response.headers)
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            self._keep_headers(err.headers)
            return err.code, json.loads(err.read() or b"null")

    def _keep_headers(self, headers) -> None:
        self.last_headers = {key.lower(): headers.get_all(key) for key in headers.keys()}

    def set_cookies(self) -> list[str]:
        """The Set-Cookie headers of the last answer."""
        return self.last_headers.get("set-cookie") or []

    def session_cookie(self) -> str | None:
        """The session id the browser holds, if any."""
        return next((c.value for c in self.jar if c.name == "hitl_session"), None)

    def sign_in(self, annotator: str) -> None:
        assert self.call("POST", "/api/signin", {"annotator_id": annotator}) == (200, {"annotator_id": annotator})


@pytest.fixture
def running(url):
    """Tasks t1 (two answers), r1 (three) and q1 (rating scales); the gRPC server; the page's server."""
    publish(url, make_task("t1"), make_task("r1", n=3), make_task("q1", scales=[("helpfulness", 1, 7)]))
    srv = start_server(url)
    front = WebFront(web_config(srv.address, guidelines="Prefer short answers.", guidelines_version="g-7", prefetch=3)).start()
    try:
        yield front
    finally:
        front.stop()
        srv.stop()


def judgement(task_id: str, **kind) -> dict:
    body = {
        "feedback_id": str(uuid.uuid4()),
        "task_id": task_id,
        "prompt_id": f"p-{task_id}",
        "display_order": ["c1", "c0"],
        "lead_time_seconds": 2.5,
        "client_time": "2025-01-02T03:04:05.678Z",
        "guidelines_version": "g-7",
    }
    return {**body, **kind}


PREFER_A = {"preference": {"candidate_a_id": "c1", "candidate_b_id": "c0", "choice": "A", "strength": 0.5}}


# -- bad input --------------------------------------------------------------------------------------


def test_bad_input_is_answered_4xx_naming_the_field(running, url):
    http = Http(running.base)
    assert http.call("POST", "/api/judgements", judgement("t1", **PREFER_A))[0] == 401  # not signed in
    assert http.call("POST", "/api/signin", {"annotator_id": "  "}) == (400, {
        "error": "annotator_id: required: a non-empty string", "field": "annotator_id", "reason": "required: a non-empty string"})
    assert http.call("POST", "/api/signin", raw=b"annotator_id=x", content_type="application/x-www-form-urlencoded")[0] == 415
    http.sign_in("alice")
    assert http.call("GET", "/api/task")[1]["task"]["task_id"] == "t1"

    def answer(body=None, raw=None) -> tuple[int, str]:
        status, data = http.call("POST", "/api/judgements", body, raw=raw)
        assert data["error"] == f"{data['field']}: {data['reason']}"
        return status, data["field"]

    pref = PREFER_A["preference"]

    def ranking(*entries) -> dict:
        return {"ranking": {"entries": [{"candidate_id": cid, "rank": rank} for cid, rank in entries]}}

    cases = [
        (answer(raw=b"{not json"), (400, "body")),
        (answer(raw=b"[" * 100_000), (400, "body")),  # once a RecursionError: 500
        (answer(raw=b"[1, 2]"), (400, "body")),  # not an object
        (answer(judgement("t1", preference={**pref, "choice": None})), (400, "preference.choice")),
        (answer(judgement("t1", preference={k: v for k, v in pref.items() if k != "choice"})), (400, "preference.choice")),
        (answer(judgement("t1", preference={**pref, "choice": "C"})), (400, "preference.choice")),
        (answer(judgement("t1", preference={**pref, "choice": "tie"})), (400, "preference.strength")),  # strength only with A/B
        (answer(judgement("r1", ranking={"entries": "312"})), (400, "ranking.entries")),
        (answer(judgement("r1", **ranking(("c0", 1), ("c1", "2"), ("c2", 3)))), (400, "ranking.entries[1].rank")),
        (answer(judgement("r1", **ranking(("c0", 1), ("c0", 2), ("c2", 3)))), (400, "ranking.entries[1].candidate_id")),
        (answer(judgement("r1", **ranking(("c0", 1), ("c1", 2), ("c2", 4)))), (400, "ranking.entries[2].rank")),
        (answer(judgement("t1")), (400, "judgement")),  # no judgement at all
        (answer(judgement("t1", **PREFER_A, flag={"kind": "spam"})), (400, "judgement")),  # two
        (answer(judgement("t1", **PREFER_A, annotator_id="mallory")), (400, "annotator_id")),  # unknown key
        (answer({k: v for k, v in judgement("t1", **PREFER_A).items() if k != "feedback_id"}), (400, "feedback_id")),
        (answer(judgement("t1", flag={"kind": "other"})), (400, "flag.note")),
        (answer(judgement("t1", **PREFER_A, client_time="2025-01-02T03:04:05")), (400, "client_time")),  # no time zone
        # what only the service knows: its rejection, with its field
        (answer(judgement("no-such-task", **PREFER_A)), (422, "task_id")),
        (answer(judgement("t1", preference={**pref, "candidate_a_id": "c9"})), (422, "preference.candidate_a_id")),
        (answer(judgement("q1", ratings={"entries": [{"candidate_id": "c0", "aspect": "helpfulness", "value": 9}]})),
         (422, "ratings.entries[0].value")),
        (answer(judgement("r1", **ranking(("c0", 1), ("c1", 2)))), (422, "ranking.entries")),  # not a permutation of 3
        # other guidelines than the page's
        (answer(judgement("t1", **PREFER_A) | {"guidelines_version": "g-6"}), (409, "guidelines_version")),
    ]
    for got, expected in cases:
        assert got == expected
    assert http.call("POST", "/api/judgements", raw=b"{}", content_type="text/plain")[0] == 415
    assert http.call("POST", "/api/skip", {})[1]["field"] == "task_id"
    assert stored(url) == []  # nothing of it reached the store


# -- resends --------------------------------------------------------------------------------------


def test_a_resent_judgement_is_stored_once(running, url):
    http = Http(running.base)
    http.sign_in("alice")
    task = http.call("GET", "/api/task")[1]["task"]
    order = [c["candidate_id"] for c in task["candidates"]]
    body = judgement("t1", display_order=order,
                     preference={"candidate_a_id": order[0], "candidate_b_id": order[1], "choice": "B", "strength": 1.0})
    status, first = http.call("POST", "/api/judgements", body)
    assert (status, first["status"], first["finishes"]) == (200, "accepted", True)
    status, again = http.call("POST", "/api/judgements", body)  # the answer was lost: the page sends it again
    assert (status, again["status"], again["seq"]) == (200, "duplicate", first["seq"])
    (record,) = stored(url)
    assert record.feedback_id == body["feedback_id"] and record.annotator_id == "alice" and record.guidelines_version == "g-7"
    assert record.preference.choice == pb.Preference.CHOICE_B and record.preference.strength == 1.0
    assert record.preference.candidate_a_id == order[0] and record.metadata["display_order"] == ",".join(order)
    assert record.lead_time_seconds == 2.5 and record.client_time.ToJsonString() == "2025-01-02T03:04:05.678Z"

    # the same id with other content is refused, not stored over the first
    changed = {**body, "preference": {**body["preference"], "choice": "A"}}
    status, data = http.call("POST", "/api/judgements", changed)
    assert (status, data["field"]) == (422, "feedback_id")
    # a second finishing judgement of the same task (another tab) is not counted twice
    status, data = http.call("POST", "/api/judgements", {**body, "feedback_id": str(uuid.uuid4())})
    assert (status, data["field"]) == (409, "task_id")
    # a correction adds to a judged task
    status, data = http.call("POST", "/api/judgements", judgement("t1", correction={"candidate_id": "c0", "corrected_text": "better"}))
    assert (status, data["status"], data["finishes"]) == (200, "accepted", False)

    assert len(stored(url)) == 2
    stats = http.call("GET", "/api/stats")[1]
    assert stats["server_records"] == 2 and stats["session"] == {"pulled": 3, "judged": 1, "skipped": 0, "records": 2}
    assert http.call("GET", "/api/task")[1]["task"]["task_id"] == "r1"  # t1 is done; the next one is shown
    assert http.call("POST", "/api/skip", {"task_id": "r1"}) == (200, {"task_id": "r1", "skipped": True})
    assert http.call("GET", "/api/task")[1]["task"]["task_id"] == "q1"


def test_the_page_and_its_files_are_served(running):
    http = Http(running.base)
    with urllib.request.urlopen(running.base + "/", timeout=30) as response:
        page = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert '<script src="/static/app.js"' in page and 'id="keys"' in page
    with urllib.request.urlopen(running.base + "/static/app.js", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/javascript")
        assert b"newFeedbackId" in response.read()
    assert http.call("GET", "/api/me")[1] == {"annotator_id": None, "auth": "open", "project": "demo",
                                               "guidelines": "Prefer short answers.", "guidelines_version": "g-7"}
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(running.base + "/static/../app.py", timeout=30)
    assert missing.value.code == 404


def test_the_static_files_are_package_data():
    """Every file of the page is installed with the package (pip install . or -e .)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["services.labeling.web"]
    files = sorted(p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file())
    assert files and all(any(fnmatch(f, pattern) for pattern in patterns) for f in files), (files, patterns)
    assert set(load_static()) == {"index.html", "app.js", "style.css"}


# -- the config and the command -------------------------------------------------------------------------


def test_config_names_the_wrong_field(tmp_path):
    def error_of(text: str, **overrides) -> str:
        path = tmp_path / "web.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            resolve_guidelines(load_web_config(path, overrides))
        return str(err.value)

    assert "colour" in error_of("project: demo\ncolour: blue\n")
    assert "project" in error_of("port: 80\n")
    assert "port" in error_of("project: demo\nport: 70000\n")
    assert "tls_cert, tls_key" in error_of("project: demo\ntls_cert: c.pem\n")
    assert "guidelines, guidelines_file" in error_of("project: demo\nguidelines: x\nguidelines_file: g.txt\n")
    assert "guidelines_file" in error_of("project: demo\nguidelines_file: missing.txt\n")

    (tmp_path / "g.txt").write_text("Be kind.\n")
    path = tmp_path / "web.yaml"
    path.write_text("project: demo\nport: 9000\nguidelines_file: g.txt\n")  # relative to the config file
    cfg = load_web_config(path, {"port": 9100, "server": None})
    assert (cfg.port, cfg.server) == (9100, "127.0.0.1:50051")  # the option wins; None leaves the file's value
    guidelines = resolve_guidelines(cfg)
    assert guidelines.text == "Be kind.\n" and guidelines.version.startswith("sha256:") and len(guidelines.version) == 19
    assert resolve_guidelines(cfg.model_copy(update={"guidelines_version": "v2"})).version == "v2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_command_serves_the_page(tmp_path, url):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HITL_TOKEN", None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("project: demo\nprefetch: 0\n")
    done = subprocess.run([sys.executable, "-m", "hitl.cli", "label-web", "--config", str(bad)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "prefetch" in done.stderr

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hitl.cli", "label-web", "--server", "127.0.0.1:1", "--project", "demo",
         "--port", str(port), "--guidelines-version", "g-1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/me", timeout=5) as response:
                    me = json.loads(response.read())
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "no answer"
                time.sleep(0.2)
        assert me["project"] == "demo" and me["guidelines_version"] == "g-1"
        # nothing listens on 127.0.0.1:1: pulling a task is a 502 the page retries, not a crash
        http = Http(f"http://127.0.0.1:{port}")
        http.sign_in("alice")
        status, data = http.call("GET", "/api/task")
        assert (status, data["field"]) == (502, "feedback")
    finally:
        proc.terminate()
        proc.wait(30)
