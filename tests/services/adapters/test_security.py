"""Who may post what: a credential per route (compared in constant time), closed by default
off the loopback address, and the project and annotator taken from configuration (the
payload only names them, and is refused when it names what its route was not given)."""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner

from hitl.cli import main
from services.adapters.config import ConfigError, build_config, read_config_file, resolve, tls_context
from tests.services.adapters.conftest import (
    LS_TOKEN,
    SECRET,
    Adapter,
    ls_auth,
    payload,
    post_full,
    publish,
    signed,
    simple_settings,
    stored,
)
from tests.services.feedback.certs import make_tls_files
from tests.services.feedback.conftest import running_server

NO_ENV = {"HITL_ARGILLA_SECRET": None, "HITL_LABEL_STUDIO_TOKEN": None, "HITL_TOKEN": None}


@pytest.fixture
def feedback(tmp_path):
    """(store_url, address) of a feedback server over a SQLite store with the sample tasks."""
    store_url = f"sqlite:///{tmp_path / 'feedback.db'}"
    publish(store_url, "t-argilla-1", "t-ls-1")
    publish(store_url, "t-other-1", project="other")
    with running_server(store_url) as srv:
        yield store_url, srv.address


def _route(**kw) -> dict:
    return {"projects": ["default"], **kw}


# --------------------------------------------------------------------------- credentials


def test_each_route_needs_its_own_credential(feedback, tmp_path):
    store_url, address = feedback
    created_ls = payload("label_studio_annotation_created.json")
    created_ar = payload("argilla_response_created.json")
    # only Argilla has a credential: /label-studio is not served at all
    with Adapter(address, simple_settings(tmp_path / "a.db", argilla_secret=SECRET)) as adapter:
        status, body = adapter.post("/label-studio", created_ls, ls_auth())
        assert status == 404 and "/label-studio is disabled" in body["reason"] and "--label-studio-token" in body["reason"], body
        status, body = adapter.post("/argilla", created_ar)  # unsigned
        assert (status, body["field"]) == (401, "webhook-signature")
        assert adapter.outbox.depth() == 0
    # only Label Studio has one: /argilla is not served, /label-studio wants the exact token
    with Adapter(address, simple_settings(tmp_path / "b.db", label_studio_token=LS_TOKEN)) as adapter:
        status, body = adapter.post("/argilla", created_ar, signed(created_ar, "msg_1"))
        assert status == 404 and "--argilla-secret" in body["reason"], body
        same_length = LS_TOKEN[:-1] + ("x" if LS_TOKEN[-1] != "x" else "y")
        for headers in ({}, ls_auth(same_length), {"Authorization": f"Bearer {LS_TOKEN}"}, ls_auth(LS_TOKEN + "x")):
            status, body = adapter.post("/label-studio", created_ls, headers)
            assert (status, body["field"]) == (401, "Authorization"), headers
        assert adapter.outbox.depth() == 0
    assert stored(store_url) == []


def test_allow_unauthenticated_serves_open_routes_on_loopback(feedback, tmp_path):
    store_url, address = feedback
    with Adapter(address, simple_settings(tmp_path / "o.db", allow_unauthenticated=True)) as adapter:
        status, body = adapter.post("/label-studio", payload("label_studio_annotation_created.json"))
        assert (status, body["queued"]) == (202, 2), body
        adapter.drain()
    assert {r.annotator_id for r in stored(store_url)} == {"label-studio:3"}


def test_closed_by_default_off_loopback():
    with_secret = {"routes": {"label_studio": _route(secret=LS_TOKEN)}}
    # no credential at all
    with pytest.raises(ConfigError, match=r"needs authentication.*--label-studio-token"):
        build_config({"host": "0.0.0.0", "insecure": True, "routes": {"label_studio": _route()}})
    # a credential, no TLS
    with pytest.raises(ConfigError, match=r"needs TLS.*--tls-cert.*--insecure"):
        build_config({"host": "0.0.0.0", **with_secret})
    # open routes are for this machine only
    with pytest.raises(ConfigError, match="--allow-unauthenticated"):
        build_config({"host": "0.0.0.0", "insecure": True, "allow_unauthenticated": True, **with_secret})
    with pytest.raises(ConfigError, match="tls_cert, tls_key"):
        build_config({"tls_cert": "x.crt", **with_secret})
    # nothing to serve on loopback either
    with pytest.raises(ConfigError, match=r"no route is served.*--allow-unauthenticated"):
        build_config({"routes": {"argilla": _route()}})
    assert build_config({"host": "0.0.0.0", "insecure": True, **with_secret}).served_routes().keys() == {"label_studio"}
    assert build_config({"host": "127.0.0.1", **with_secret}).host == "127.0.0.1"


@pytest.mark.parametrize("args, expected", [
    (["--host", "0.0.0.0"], "--label-studio-token"),
    (["--host", "0.0.0.0", "--label-studio-token", LS_TOKEN], "--insecure"),
    (["--host", "0.0.0.0", "--label-studio-token", LS_TOKEN, "--allow-unauthenticated", "--insecure"], "--allow-unauthenticated"),
    ([], "no route is served"),
    (["--argilla-secret", "not-base64!"], "routes.argilla.secret (--argilla-secret): webhook secret"),
])
def test_cli_refuses_to_start_open(tmp_path, args, expected):
    outbox = tmp_path / "outbox.db"
    result = CliRunner().invoke(main, ["adapters", "serve", "--outbox", str(outbox), *args], env=NO_ENV)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert not outbox.exists()  # refused before anything was created


def test_credentials_from_files_and_variables(tmp_path):
    token_file = tmp_path / "ls-token"
    token_file.write_text(LS_TOKEN + "\n")
    token_file.chmod(0o644)
    cfg = build_config({"routes": {"label_studio": _route(secret_file=token_file)}})
    with pytest.raises(ConfigError, match=r"routes.label_studio.secret_file \(--label-studio-token-file\): .* readable by others .*chmod o-rwx"):
        resolve(cfg)
    token_file.chmod(0o640)  # group read is allowed (Kubernetes' fsGroup)
    assert resolve(cfg).routes["label-studio"].secret == LS_TOKEN
    assert LS_TOKEN not in repr(resolve(cfg))

    cfg = build_config({"routes": {"argilla": _route(secret_env="MY_ARGILLA_SECRET")}})
    with pytest.raises(ConfigError, match="routes.argilla.secret_env: the variable MY_ARGILLA_SECRET is not set"):
        resolve(cfg, environ={})
    assert resolve(cfg, environ={"MY_ARGILLA_SECRET": SECRET}).routes["argilla"].secret == SECRET
    with pytest.raises(ConfigError, match="routes.argilla.secret_env: webhook secret"):
        resolve(cfg, environ={"MY_ARGILLA_SECRET": "not-base64!"})
    with pytest.raises(ConfigError, match="secret_file, secret_env: give one"):
        build_config({"routes": {"argilla": _route(secret_env="A", secret_file=token_file)}})

    result = CliRunner().invoke(main, ["adapters", "serve", "--outbox", str(tmp_path / "o.db"),
                                       "--label-studio-token-file", str(tmp_path / "missing")], env=NO_ENV)
    assert result.exit_code == 2 and "--label-studio-token-file" in result.output and "does not exist" in result.output


def test_config_file_is_validated_naming_the_field(tmp_path):
    path = tmp_path / "adapters.yaml"
    path.write_text("routes:\n  label_studio:\n    secret_env: T\n    projects: [default]\n    user: {3: alice}\n")
    with pytest.raises(ConfigError, match=r"routes.label_studio.user: Extra inputs are not permitted"):
        build_config(read_config_file(path))
    path.write_text("routes:\n  label_studio:\n    secret: s3cret-in-the-file\n    projects: [default]\n")
    with pytest.raises(ConfigError, match="routes.label_studio.secret: a credential is not written in the configuration"):
        read_config_file(path)
    path.write_text("routes:\n  label_studio:\n    secret_env: T\n    projects: []\n")
    with pytest.raises(ConfigError, match="routes.label_studio.projects"):
        build_config(read_config_file(path))
    path.write_text("routes:\n  label_studio:\n    secret_env: T\n    projects: [default]\n    map_unknown_users: guess\n")
    with pytest.raises(ConfigError, match="routes.label_studio.map_unknown_users"):
        build_config(read_config_file(path))
    path.write_text("routes:\n  label_studio:\n    secret_env: T\n    projects: [default]\n    users: {3: alice}\n")
    assert build_config(read_config_file(path)).routes.label_studio.users == {"3": "alice"}
    # the command validates the file first, and refuses route options that it would ignore
    result = CliRunner().invoke(main, ["adapters", "serve", "--config", str(path), "--project", "x"], env=NO_ENV)
    assert result.exit_code == 2 and "--project: routes come from --config" in result.output, result.output
    result = CliRunner().invoke(main, ["adapters", "serve", "--config", str(path), "--outbox", str(tmp_path / "o.db")], env=NO_ENV)
    assert result.exit_code == 2 and "the variable T is not set" in result.output, result.output


# --------------------------------------------------------------------------- projects and users


@pytest.fixture
def scoped(feedback, tmp_path):
    """(store_url, adapter) with a configuration: Label Studio user 3 is alice, Argilla
    maps nobody; both routes write project `default` only."""
    path = tmp_path / "adapters.yaml"
    path.write_text(f"""
outbox: {tmp_path / 'outbox.db'}
routes:
  label_studio:
    secret_env: LS_TOKEN
    projects: [default]
    users: {{3: alice, "bob@example.com": bob}}
  argilla:
    secret_env: ARGILLA_SECRET
    projects: [default]
""")
    settings = resolve(build_config(read_config_file(path)), environ={"LS_TOKEN": LS_TOKEN, "ARGILLA_SECRET": SECRET})
    store_url, address = feedback
    with Adapter(address, settings) as adapter:
        yield store_url, adapter


def test_project_and_annotator_come_from_configuration(scoped):
    store_url, adapter = scoped
    event = json.loads(payload("label_studio_annotation_created.json"))
    # a project the route may not write: 403 naming it, nothing queued
    event["task"]["data"]["project"] = "other"
    event["task"]["data"]["task_id"] = "t-other-1"
    status, body = adapter.post("/label-studio", json.dumps(event).encode(), ls_auth())
    assert (status, body["field"]) == (403, "task.data.project") and "'other'" in body["reason"], body
    # an unmapped user: 403 naming the user
    event = json.loads(payload("label_studio_annotation_created.json"))
    event["annotation"]["completed_by"] = 4
    status, body = adapter.post("/label-studio", json.dumps(event).encode(), ls_auth())
    assert (status, body["field"]) == (403, "annotation.completed_by") and "'4'" in body["reason"], body
    created = payload("argilla_response_created.json")
    status, body = adapter.post("/argilla", created, signed(created, "msg_1"))
    assert (status, body["field"]) == (403, "data.user.username") and "'ada'" in body["reason"], body
    assert adapter.outbox.depth() == 0
    # mapped users: by id, and by email when Label Studio sends the user as an object
    status, body = adapter.post("/label-studio", payload("label_studio_annotation_created.json"), ls_auth())
    assert (status, body["queued"]) == (202, 2), body
    event = json.loads(payload("label_studio_annotation_updated.json"))
    event["annotation"]["completed_by"] = {"id": 9, "email": "bob@example.com"}
    status, body = adapter.post("/label-studio", json.dumps(event).encode(), ls_auth())
    assert (status, body["queued"]) == (202, 3), body
    adapter.drain()
    records = stored(store_url)
    assert [r.annotator_id for r in records] == ["alice"] * 2 + ["bob"] * 3
    assert {r.project for r in records} == {"default"}


def test_payload_may_name_a_project_its_route_was_given(feedback, tmp_path):
    store_url, address = feedback
    settings = resolve(build_config({"outbox": tmp_path / "o.db", "routes": {"label_studio": {
        "secret": LS_TOKEN, "projects": ["default", "other"], "map_unknown_users": "prefix"}}}))
    with Adapter(address, settings) as adapter:
        event = json.loads(payload("label_studio_annotation_created.json"))
        event["task"]["data"].update(project="other", task_id="t-other-1")
        status, body = adapter.post("/label-studio", json.dumps(event).encode(), ls_auth())
        assert status == 202, body
        adapter.drain()
    assert [(r.project, r.task_id, r.annotator_id) for r in stored(store_url)] == [("other", "t-other-1", "label-studio:3")] * 2


# --------------------------------------------------------------------------- TLS


def test_tls_serves_https(feedback, tmp_path):
    store_url, address = feedback
    files = make_tls_files(tmp_path)
    cfg = build_config({"host": "0.0.0.0", "tls_cert": files.server.cert, "tls_key": files.server.key,
                        "outbox": tmp_path / "o.db", "routes": {"label_studio": _route(secret=LS_TOKEN, map_unknown_users="prefix")}})
    files.server.key.chmod(0o644)
    with pytest.raises(ConfigError, match="--tls-key.*readable by others"):
        tls_context(cfg)
    files.server.key.chmod(0o600)
    client_context = ssl.create_default_context(cafile=str(files.ca.cert))
    with Adapter(address, resolve(cfg), ssl_context=tls_context(cfg)) as adapter:
        status, _, body = post_full(adapter.port, "/label-studio", payload("label_studio_annotation_created.json"), ls_auth(),
                                    scheme="https", context=client_context)
        assert (status, body["queued"]) == (202, 2), body
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, OSError)):  # plain HTTP is not answered
            urllib.request.urlopen(f"http://127.0.0.1:{adapter.port}/healthz", timeout=5).read()
        adapter.drain()
    assert len(stored(store_url)) == 2
