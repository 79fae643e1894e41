"""Who is at the labeling page: personal tokens and server-side sessions, a sign-in proxy's
header beside its shared secret, and the config that refuses an open page off loopback.
Real aiohttp server, real feedback gRPC server on a SQLite store; what counts is the
annotator id of what ends up stored."""

from __future__ import annotations

import base64
import os
import secrets
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from services.labeling.web.auth import Sessions
from services.labeling.web.config import ConfigError, LabelWebConfig, load_web_config, server_ssl_context
from tests.services.feedback.certs import make_tls_files
from tests.services.feedback.conftest import make_task
from tests.services.labeling.conftest import publish, start_server, stored
from tests.services.labeling.test_web_http import PREFER_A, ROOT, Http, WebFront, judgement, web_config

ALICE_TOKEN = secrets.token_urlsafe(32)
BOB_TOKEN = secrets.token_urlsafe(32)
PROXY_SECRET = secrets.token_urlsafe(32)


def secret_file(path: Path, content: object, mode: int = 0o600) -> Path:
    """A YAML (or plain text) secret file with the given permissions."""
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    path.chmod(mode)
    return path


def tokens_file(tmp_path: Path, mode: int = 0o600) -> Path:
    return secret_file(tmp_path / "annotators.yaml", [{"annotator_id": "alice", "token": ALICE_TOKEN},
                                                       {"annotator_id": "bob", "token": BOB_TOKEN}], mode)


@pytest.fixture
def service(url):
    """Tasks t1, t2 (two answers each) in a real feedback gRPC server."""
    publish(url, make_task("t1"), make_task("t2"))
    srv = start_server(url)
    try:
        yield srv
    finally:
        srv.stop()


def serve(cfg: LabelWebConfig, ssl_context: ssl.SSLContext | None = None) -> WebFront:
    return WebFront(cfg).start(ssl_context)


def preference_for(http: Http, task_id: str, **extra) -> dict:
    """A preference on the task the page shows (its display order), plus `extra` keys."""
    status, data = http.call("GET", "/api/task")
    assert status == 200 and data["task"]["task_id"] == task_id, data
    order = [c["candidate_id"] for c in data["task"]["candidates"]]
    pref = {"candidate_a_id": order[0], "candidate_b_id": order[1], "choice": "A", "strength": 0.5}
    return judgement(task_id, display_order=order, preference=pref, **extra)


# -- tokens ------------------------------------------------------------------------------------


def test_a_token_signs_in_exactly_its_annotator(tmp_path, url, service):
    cfg = web_config(service.address, guidelines_version="g-7", auth={"tokens_file": str(tokens_file(tmp_path))})
    assert cfg.auth.mode == "tokens"  # a tokens file is enough to choose the mode
    front = serve(cfg)
    try:
        http = Http(front.base)
        assert http.call("GET", "/api/me")[1]["auth"] == "tokens"

        # a wrong token, an old-style id, an id beside the token: no one, and no cookie
        for body, expected in [({"token": secrets.token_urlsafe(32)}, (401, "token")),
                               ({"token": ALICE_TOKEN[:-1]}, (401, "token")),
                               ({"annotator_id": "alice"}, (400, "body")),
                               ({"token": BOB_TOKEN, "annotator_id": "alice"}, (400, "body")),
                               ({"token": "x" * 129}, (400, "token"))]:
            status, data = http.call("POST", "/api/signin", body)
            assert (status, data["field"]) == expected, (body, data)
            assert http.set_cookies() == [] and http.session_cookie() is None
        assert http.call("GET", "/api/task")[0] == 401

        # bob's token signs in bob, whatever else is said
        assert http.call("POST", "/api/signin", {"token": BOB_TOKEN}) == (200, {"annotator_id": "bob"})
        (cookie,) = http.set_cookies()
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"httponly", "samesite", "max-age", "path"} <= attributes and "secure" not in attributes  # plain HTTP
        assert "SameSite=Strict" in cookie and f"Max-Age={cfg.auth.session_ttl_seconds}" in cookie
        session = http.session_cookie()
        assert session and "bob" not in session and b"bob" not in base64.urlsafe_b64decode(session + "==")
        assert http.call("GET", "/api/me")[1]["annotator_id"] == "bob"

        # the body's annotator id is refused; the credential's is stored
        status, data = http.call("POST", "/api/judgements", preference_for(http, "t1", annotator_id="alice"))
        assert (status, data["field"]) == (400, "annotator_id") and stored(url) == []
        status, data = http.call("POST", "/api/judgements", preference_for(http, "t1"))
        assert (status, data["status"]) == (200, "accepted")
        assert [(r.task_id, r.annotator_id) for r in stored(url)] == [("t1", "bob")]

        # sign-out ends the session on the server: the same cookie, sent again, signs in nobody
        assert http.call("POST", "/api/signout")[0] == 200
        replay = Http(front.base, cookies=False, headers={"Cookie": f"hitl_session={session}"})
        assert replay.call("GET", "/api/task")[0] == 401
        assert len(front.front.gate.sessions) == 0
    finally:
        front.stop()


@pytest.mark.parametrize("mode", ["tokens", "open"])
def test_a_forged_or_old_style_cookie_signs_in_nobody(tmp_path, service, mode):
    auth = {"tokens_file": str(tokens_file(tmp_path))} if mode == "tokens" else {}
    front = serve(web_config(service.address, guidelines_version="g-1", auth=auth))
    try:
        real = Http(front.base)
        body = {"token": ALICE_TOKEN} if mode == "tokens" else {"annotator_id": "alice"}
        assert real.call("POST", "/api/signin", body) == (200, {"annotator_id": "alice"})
        assert real.call("GET", "/api/task")[0] == 200  # the real session works
        alice_b64 = base64.urlsafe_b64encode(b"alice").decode()
        for forged in [f"hitl_annotator={alice_b64}",  # the cookie of the earlier version: the id itself
                       f"hitl_session={alice_b64}", "hitl_session=alice", f"hitl_session={secrets.token_urlsafe(32)}",
                       f"hitl_session={real.session_cookie()}x", "hitl_session=" + "A" * 4000]:
            http = Http(front.base, cookies=False, headers={"Cookie": forged})
            status, data = http.call("GET", "/api/task")
            assert (status, data["field"]) == (401, "annotator_id"), forged
            assert http.call("GET", "/api/me")[1]["annotator_id"] is None
    finally:
        front.stop()


def test_sessions_expire_and_the_oldest_goes_first():
    now = [1000.0]
    sessions = Sessions(ttl_s=60, max_sessions=3, clock=lambda: now[0])
    first = sessions.open("alice")
    assert sessions.annotator_of(first) == "alice" and sessions.annotator_of("alice") is None
    now[0] += 61
    assert sessions.annotator_of(first) is None and len(sessions) == 0  # expired, and dropped
    ids = [sessions.open(f"a{i}") for i in range(5)]
    assert len(sessions) == 3 and [sessions.annotator_of(i) for i in ids] == [None, None, "a2", "a3", "a4"]
    sessions.close(ids[3])
    assert sessions.annotator_of(ids[3]) is None and len(sessions) == 2
    assert len(set(ids)) == 5 and all(len(i) >= 40 for i in ids)  # token_urlsafe(32): not guessable


# -- header (a sign-in proxy) -----------------------------------------------------------------------


def test_header_mode_believes_the_proxy_only_with_its_secret(tmp_path, url, service):
    secret = secret_file(tmp_path / "proxy-secret", PROXY_SECRET + "\n")
    cfg = web_config(service.address, guidelines_version="g-7", auth={"mode": "header", "proxy_secret_file": str(secret)})
    front = serve(cfg)
    try:
        def as_proxy(headers: dict[str, str]) -> Http:
            return Http(front.base, cookies=False, headers=headers)

        cases = [
            ({}, (401, "X-Hitl-Proxy-Secret")),
            ({"X-Forwarded-User": "mallory"}, (401, "X-Hitl-Proxy-Secret")),  # straight to the server, past the proxy
            ({"X-Forwarded-User": "mallory", "X-Hitl-Proxy-Secret": PROXY_SECRET[:-1]}, (401, "X-Hitl-Proxy-Secret")),
            ({"X-Forwarded-User": "mallory", "X-Hitl-Proxy-Secret": ""}, (401, "X-Hitl-Proxy-Secret")),
            ({"X-Hitl-Proxy-Secret": PROXY_SECRET}, (401, "X-Forwarded-User")),  # the proxy named nobody
            ({"X-Forwarded-User": "c" * 129, "X-Hitl-Proxy-Secret": PROXY_SECRET}, (400, "X-Forwarded-User")),
        ]
        for headers, expected in cases:
            status, data = as_proxy(headers).call("GET", "/api/task")
            assert (status, data["field"]) == expected, headers
            assert as_proxy(headers).call("POST", "/api/judgements", judgement("t1", **PREFER_A))[0] == expected[0]
        assert stored(url) == []

        carol = as_proxy({"X-Forwarded-User": "carol@example.org", "X-Hitl-Proxy-Secret": PROXY_SECRET})
        me = carol.call("GET", "/api/me")[1]
        assert (me["auth"], me["annotator_id"]) == ("header", "carol@example.org")
        status, data = carol.call("POST", "/api/signin", {"annotator_id": "dave"})
        assert (status, data["field"]) == (400, "auth.mode") and carol.set_cookies() == []  # no sign-in form here
        status, data = carol.call("POST", "/api/judgements", preference_for(carol, "t1"))
        assert (status, data["status"]) == (200, "accepted")
        assert [(r.task_id, r.annotator_id) for r in stored(url)] == [("t1", "carol@example.org")]
    finally:
        front.stop()


# -- TLS -------------------------------------------------------------------------------------------


def test_over_tls_the_session_cookie_is_secure(tmp_path, service):
    files = make_tls_files(tmp_path)
    files.server.key.chmod(0o600)
    cfg = web_config(service.address, guidelines_version="g-1", tls_cert_file=str(files.server.cert),
                     tls_key_file=str(files.server.key), auth={"tokens_file": str(tokens_file(tmp_path))})
    front = serve(cfg, server_ssl_context(cfg))
    try:
        assert front.base.startswith("https://")
        trust = ssl.create_default_context(cafile=str(files.ca.cert))
        http = Http(front.base, ssl_context=trust)
        assert http.call("POST", "/api/signin", {"token": ALICE_TOKEN}) == (200, {"annotator_id": "alice"})
        (cookie,) = http.set_cookies()
        assert "Secure" in [part.strip() for part in cookie.split(";")] and "HttpOnly" in cookie
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain HTTP on that port
            urllib.request.urlopen(f"http://127.0.0.1:{front.port}/api/me", timeout=10).read()
    finally:
        front.stop()


# -- the config --------------------------------------------------------------------------------------


def config_error(**values) -> str:
    with pytest.raises(ConfigError) as err:
        load_web_config(None, {"project": "demo", **values})
    return str(err.value)


def test_the_config_refuses_an_open_page_off_loopback_and_unsafe_secrets(tmp_path):
    tokens = str(tokens_file(tmp_path))
    assert load_web_config(None, {"project": "demo"}).auth.mode == "open"  # loopback development works as before
    message = config_error(host="0.0.0.0")
    assert "auth.mode" in message and "loopback" in message
    assert "auth.mode" in config_error(host="0.0.0.0", auth={"mode": "open", "tokens_file": tokens}, insecure_http=True)
    message = config_error(host="0.0.0.0", auth={"tokens_file": tokens})
    assert "needs TLS" in message and "tls_cert_file" in message and "insecure_http" in message
    cfg = load_web_config(None, {"project": "demo", "host": "0.0.0.0", "auth": {"tokens_file": tokens}, "insecure_http": True})
    assert cfg.auth.mode == "tokens" and cfg.annotator_tokens.annotator_of(BOB_TOKEN) == "bob"
    assert cfg.annotator_tokens.annotator_of(ALICE_TOKEN + "x") is None
    assert ALICE_TOKEN not in repr(cfg)  # the tokens stay out of logs

    assert "auth.tokens_file: required" in config_error(auth={"mode": "tokens"})
    assert "auth.proxy_secret_file: required" in config_error(auth={"mode": "header"})
    assert "auth.mode" in config_error(auth={"mode": "cookie"})
    assert "auth.user_header" in config_error(auth={"mode": "header", "user_header": "X User"})
    assert "auth.session_ttl_seconds" in config_error(auth={"session_ttl_seconds": 0})
    assert "tls_cert_file, tls_key_file" in config_error(tls_cert_file=tokens)
    assert "max_tasks_per_annotator" in config_error(prefetch=5, max_tasks_per_annotator=2)
    assert "max_body_bytes" in config_error(max_body_bytes=100)

    def file_error(name: str, content: object, mode: int = 0o600, key: str = "tokens_file") -> str:
        path = secret_file(tmp_path / name, content, mode)
        auth = {"tokens_file": str(path)} if key == "tokens_file" else {"mode": "header", "proxy_secret_file": str(path)}
        return config_error(auth=auth)

    assert "readable by others" in file_error("open.yaml", {"alice": ALICE_TOKEN}, 0o644)
    assert "readable by others" in file_error("open-secret", PROXY_SECRET, 0o604, key="proxy_secret_file")
    message = file_error("short.yaml", {"alice": "Zq9-weak"})
    assert "auth.tokens_file" in message and "token: a token is one word of at least 16" in message
    assert "Zq9-weak" not in message  # a token is never echoed
    assert "appears twice" in file_error("twice.yaml", {"alice": ALICE_TOKEN, "bob": ALICE_TOKEN})
    assert "annotator_id" in file_error("long-id.yaml", {"a" * 129: ALICE_TOKEN})
    assert "annotator_id and token" in file_error("shape.yaml", [{"annotator_id": "alice", "tok": ALICE_TOKEN}])
    assert "holds no token" in file_error("empty.yaml", [])
    assert "at least 16" in file_error("weak-secret", "short", key="proxy_secret_file")
    assert "does not exist" in config_error(auth={"tokens_file": str(tmp_path / "missing.yaml")})

    # the mapping form, and paths relative to the config file
    secret_file(tmp_path / "by-id.yaml", {"alice": ALICE_TOKEN})
    (tmp_path / "web.yaml").write_text("project: demo\nauth:\n  tokens_file: by-id.yaml\n")
    assert load_web_config(tmp_path / "web.yaml").annotator_tokens.annotator_of(ALICE_TOKEN) == "alice"
    assert load_web_config(tmp_path / "web.yaml", {"auth.tokens_file": tokens}).annotator_tokens.annotator_of(BOB_TOKEN) == "bob"


def test_the_tls_key_must_be_private_and_loadable(tmp_path):
    files = make_tls_files(tmp_path)
    values = {"tls_cert_file": str(files.server.cert), "tls_key_file": str(files.server.key)}
    files.server.key.chmod(0o644)
    assert "tls_key_file" in config_error(**values) and "readable by others" in config_error(**values)
    files.server.key.chmod(0o600)
    assert load_web_config(None, {"project": "demo", **values}).secure_cookie is True
    bad = secret_file(tmp_path / "not-a-key.pem", "not a key\n")
    assert "tls_cert_file, tls_key_file: cannot load" in config_error(**{**values, "tls_key_file": str(bad)})


def test_the_command_refuses_to_serve_an_open_page_off_loopback(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HITL_TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "hitl.cli", "label-web", "--project", "demo", "--host", "0.0.0.0",
                           "--port", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "auth.mode" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "hitl.cli", "label-web", "--project", "demo", "--host", "0.0.0.0",
                           "--port", "0", "--tokens-file", str(tokens_file(tmp_path))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "needs TLS" in done.stderr, done.stderr
