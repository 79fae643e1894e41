"""The durable outbox: a delivery is kept on disk before it is answered, forwarded when the
feedback service is there (across restarts of the adapter), stored exactly once, and a
record the service rejects ends in the dead-letter table."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter

import pytest

from services.adapters.config import build_config, resolve
from services.adapters.outbox import Outbox, OutboxError
from tests.services.adapters.conftest import (
    LS_TOKEN,
    SECRET,
    Adapter,
    free_port,
    ls_auth,
    payload,
    post_full,
    publish,
    signed,
    simple_settings,
    stored,
    wait_for,
)
from tests.services.feedback.conftest import running_server


def _deliveries() -> list[tuple[str, bytes, dict[str, str], int]]:
    """(path, body, headers, records) of four deliveries, one of them a redelivery."""
    ar = payload("argilla_response_created.json")
    ls_created, ls_updated = payload("label_studio_annotation_created.json"), payload("label_studio_annotation_updated.json")
    return [("/argilla", ar, signed(ar, "msg_1"), 2), ("/argilla", ar, signed(ar, "msg_2"), 2),
            ("/label-studio", ls_created, ls_auth(), 2), ("/label-studio", ls_updated, ls_auth(), 3)]


def test_deliveries_during_an_outage_are_stored_once_when_the_service_returns(store_url, tmp_path):
    publish(store_url, "t-argilla-1", "t-ls-1")
    port = free_port()
    settings = simple_settings(tmp_path / "outbox.db", argilla_secret=SECRET, label_studio_token=LS_TOKEN)
    with Adapter(f"127.0.0.1:{port}", settings) as adapter:
        ids = []
        for path, body, headers, n in _deliveries():
            status, answer = adapter.post(path, body, headers)
            assert (status, answer["queued"]) == (202, n), answer
            ids += answer["feedback_ids"]
        wait_for(lambda: adapter.health()["outbox"]["forwarding"] == "failing", 10)
        assert adapter.health()["outbox"]["depth"] == 7  # the redelivery is queued once
        assert stored(store_url) == []
        with running_server(store_url, port=port):
            adapter.drain()
            assert adapter.health()["outbox"] == {"depth": 0, "max": 100_000, "dead_letters": 0, "forwarding": "ok"}
            records = stored(store_url)
    assert Counter(r.feedback_id for r in records) == Counter(set(ids))  # every record, each once
    assert len(records) == 7


def test_a_restarted_adapter_forwards_what_was_queued(store_url, tmp_path):
    publish(store_url, "t-ls-1")
    outbox = tmp_path / "outbox.db"
    settings = simple_settings(outbox, label_studio_token=LS_TOKEN)
    with Adapter(f"127.0.0.1:{free_port()}", settings) as first:  # the service is not there
        status, answer = first.post("/label-studio", payload("label_studio_annotation_created.json"), ls_auth())
        assert (status, answer["queued"]) == (202, 2)
        with pytest.raises(OutboxError, match="another adapter uses"):
            Outbox(outbox)  # one adapter process per outbox
    assert stored(store_url) == []
    with running_server(store_url) as srv, Adapter(srv.address, settings) as second:
        second.drain()
        records = stored(store_url)
    assert sorted(r.feedback_id for r in records) == sorted(answer["feedback_ids"])


def test_a_rejected_record_ends_in_the_dead_letter_table(store_url, tmp_path):
    publish(store_url, "t-ls-1")
    event = json.loads(payload("label_studio_annotation_created.json"))
    event["task"]["data"]["task_id"] = "no-such-task"  # well-formed; only the service knows it is wrong
    event["annotation"]["id"] = 9999
    with running_server(store_url) as srv, Adapter(srv.address, simple_settings(tmp_path / "o.db", label_studio_token=LS_TOKEN)) as adapter:
        status, answer = adapter.post("/label-studio", json.dumps(event).encode(), ls_auth())
        assert status == 202, answer
        # the good delivery behind it is not held up
        status, good = adapter.post("/label-studio", payload("label_studio_annotation_created.json"), ls_auth())
        assert status == 202, good
        adapter.drain()
        dead = adapter.outbox.dead_letters()
        assert adapter.health()["outbox"]["dead_letters"] == 2
    assert sorted(d.feedback_id for d in dead) == sorted(answer["feedback_ids"])
    assert {(d.field, d.record.task_id) for d in dead} == {("task_id", "no-such-task")}
    assert all(d.reason for d in dead)
    assert sorted(r.feedback_id for r in stored(store_url)) == sorted(good["feedback_ids"])


def test_a_full_outbox_answers_503_with_retry_after(tmp_path):
    settings = simple_settings(tmp_path / "o.db", label_studio_token=LS_TOKEN, max_records=4)
    with Adapter(f"127.0.0.1:{free_port()}", settings) as adapter:
        status, _, answer = post_full(adapter.port, "/label-studio", payload("label_studio_annotation_created.json"), ls_auth())
        assert (status, answer["queued"]) == (202, 2)
        status, headers, answer = post_full(adapter.port, "/label-studio", payload("label_studio_annotation_updated.json"), ls_auth())
        assert (status, answer["field"]) == (503, "outbox"), answer
        assert int(headers["Retry-After"]) > 0
        assert adapter.outbox.depth() == 2  # nothing of the refused delivery was queued


def test_the_outbox_file_is_private_and_durable(tmp_path):
    path = tmp_path / "new" / "dir" / "outbox.db"
    outbox = Outbox(path)
    try:
        assert path.parent.stat().st_mode & 0o777 == 0o700
        assert path.stat().st_mode & 0o777 == 0o600
        assert outbox._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert outbox._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        outbox.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # kept in the file
    path.chmod(0o644)
    with pytest.raises(OutboxError, match="readable by others"):
        Outbox(path)
    path.chmod(0o600)
    Outbox(path).close()


def test_a_redelivery_with_new_content_replaces_the_queued_copy(store_url, tmp_path):
    publish(store_url, "t-ls-1")
    port = free_port()
    bad = json.loads(payload("label_studio_annotation_created.json"))
    bad["task"]["data"]["task_id"] = "no-such-task"  # the same annotation (ids), sent for a task not published
    with Adapter(f"127.0.0.1:{port}", simple_settings(tmp_path / "o.db", label_studio_token=LS_TOKEN)) as adapter:
        status, first = adapter.post("/label-studio", json.dumps(bad).encode(), ls_auth())
        assert status == 202
        status, second = adapter.post("/label-studio", payload("label_studio_annotation_created.json"), ls_auth())
        assert status == 202 and second["feedback_ids"] == first["feedback_ids"]
        assert adapter.outbox.depth() == 2
        with running_server(store_url, port=port):
            adapter.drain()
            assert adapter.outbox.dead_letters() == []
            assert {r.task_id for r in stored(store_url)} == {"t-ls-1"}


def test_a_record_the_service_refuses_waits_alone(tmp_path):
    """The service refuses a whole call (PERMISSION_DENIED) for one record's project: that
    record waits in the outbox with a backoff of its own; the others are stored."""
    store_url = f"sqlite:///{tmp_path / 'feedback.db'}"
    publish(store_url, "t-ls-1")
    publish(store_url, "t-other-1", project="other")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text('tokens:\n  - {name: adapters, token: "adapters-token-0123", projects: [default], annotators: ["*"]}\n')
    tokens.chmod(0o600)
    settings = resolve(build_config({"outbox": tmp_path / "o.db", "routes": {"label_studio": {
        "secret": LS_TOKEN, "projects": ["default", "other"], "map_unknown_users": "prefix"}}}))
    other = json.loads(payload("label_studio_annotation_created.json"))
    other["task"]["data"].update(project="other", task_id="t-other-1")
    other["annotation"]["id"] = 9999
    with Adapter(f"127.0.0.1:{free_port()}", settings) as adapter:
        # queued while the service is away, so that both go in one batch when it is back
        status, refused = adapter.post("/label-studio", json.dumps(other).encode(), ls_auth())
        assert status == 202, refused
        status, good = adapter.post("/label-studio", payload("label_studio_annotation_created.json"), ls_auth())
        assert status == 202, good
    with running_server(store_url, tokens_file=tokens) as srv, Adapter(srv.address, settings, token="adapters-token-0123") as again:
        wait_for(lambda: len(stored(store_url)) == 2, 30, lambda: f"{again.outbox.depth()} queued")
        assert sorted(r.feedback_id for r in stored(store_url)) == sorted(good["feedback_ids"])
        assert again.outbox.depth() == 2  # the refused delivery waits, not dead-lettered
        assert again.outbox.dead_letters() == []
