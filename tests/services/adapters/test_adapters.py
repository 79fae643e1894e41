"""Argilla and Label Studio webhooks, end to end: sample payloads in each
tool's documented format are POSTed to the receivers on localhost, which
queue them in the outbox; the forwarder submits records over gRPC to a real
feedback server, and the store is then read."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from hitl.feedback.v1 import feedback_pb2 as pb
from services.adapters import argilla
from tests.services.adapters.conftest import (
    LS_TOKEN,
    SECRET,
    Adapter,
    free_port,
    ls_auth,
    payload,
    post,
    publish,
    signed,
    simple_settings,
    stored,
    wait_for,
)
from tests.services.feedback.conftest import running_server


@pytest.fixture
def stack(store_url, tmp_path):
    """(store_url, adapter): gRPC server + receivers with both routes' credentials."""
    publish(store_url, "t-argilla-1", "t-ls-1")
    with running_server(store_url) as srv:
        settings = simple_settings(tmp_path / "outbox.db", argilla_secret=SECRET, label_studio_token=LS_TOKEN)
        with Adapter(srv.address, settings) as adapter:
            yield store_url, adapter


def test_standard_webhooks_signature_vector():
    # the example of the Standard Webhooks specification
    body = b'{"test": 2432232314}'
    assert argilla.sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330",
               "webhook-signature": "v1,bm90IGl0 v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}
    argilla.verify(SECRET, headers, body, now=1614265330 + 10)
    with pytest.raises(argilla.SignatureError, match="away from now"):
        argilla.verify(SECRET, headers, body, now=1614265330 + 3600)
    with pytest.raises(argilla.SignatureError, match="no valid"):
        argilla.verify(SECRET, headers, body + b" ", now=1614265330)


def test_argilla_end_to_end(stack):
    store_url, adapter = stack
    created = payload("argilla_response_created.json")
    status, body = adapter.post("/argilla", created, signed(created, "msg_1"))
    assert (status, body["queued"], body["ignored"]) == (202, 2, False), body
    adapter.drain()
    records = stored(store_url)
    assert [r.WhichOneof("judgement") for r in records] == ["preference", "ratings"]
    assert [r.feedback_id for r in records] == body["feedback_ids"]
    pref, ratings = records
    assert pref.task_id == "t-argilla-1" and pref.project == "default" and pref.annotator_id == "argilla:ada"
    assert (pref.preference.candidate_a_id, pref.preference.candidate_b_id, pref.preference.choice) == ("c0", "c1", pb.Preference.CHOICE_A)
    assert [(e.candidate_id, e.aspect, e.value) for e in ratings.ratings.entries] == [("c0", "helpfulness", 4.0)]
    assert pref.metadata["note"] == "A answers the question."
    assert pref.metadata["argilla.annotation_id"] == "38e4d537-c768-4ced-916e-31b74b220c36"
    assert pref.client_time.ToJsonString() == "2024-10-02T10:15:00.398Z"

    # Argilla retries with a new message id (and timestamp): queued again, stored once
    status, body = adapter.post("/argilla", created, signed(created, "msg_2"))
    assert (status, body["queued"]) == (202, 2), body
    adapter.drain()
    assert len(stored(store_url)) == 2

    # the annotator edits the response: a new update time, new records
    updated = payload("argilla_response_updated.json")
    status, body = adapter.post("/argilla", updated, signed(updated, "msg_3"))
    assert (status, body["queued"]) == (202, 3), body
    adapter.drain()
    records = stored(store_url)
    assert [r.WhichOneof("judgement") for r in records] == ["preference", "ratings", "preference", "ratings", "correction"]
    assert len({r.feedback_id for r in records}) == 5
    assert records[3].ratings.entries[0].value == 5.0
    fix = records[4].correction
    assert (fix.candidate_id, fix.corrected_text, fix.note) == ("c0", "Put it in boiling water for 8 minutes, then into cold water.", "Added the cooling step.")

    # drafts are acknowledged and ignored
    draft = payload("argilla_response_draft.json")
    status, body = adapter.post("/argilla", draft, signed(draft, "msg_4"))
    assert (status, body["ignored"], body["queued"]) == (200, True, 0)
    assert len(stored(store_url)) == 5
    assert adapter.health()["outbox"] == {"depth": 0, "max": 100_000, "dead_letters": 0, "forwarding": "ok"}


def test_argilla_bad_signature_stores_nothing(stack):
    store_url, adapter = stack
    created = payload("argilla_response_created.json")
    wrong = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="
    status, body = adapter.post("/argilla", created, signed(created, "msg_1", secret=wrong))
    assert status == 401 and body["field"] == "webhook-signature"
    tampered = created.replace(b'"A"', b'"B"', 1)
    status, _ = adapter.post("/argilla", tampered, signed(created, "msg_2"))
    assert status == 401
    status, body = adapter.post("/argilla", created, signed(created, "msg_3", at=int(time.time()) - 3600))
    assert status == 401 and "away from now" in body["reason"]
    status, _ = adapter.post("/argilla", created)  # no signature headers at all
    assert status == 401
    assert adapter.outbox.depth() == 0
    assert stored(store_url) == []


def test_argilla_malformed_payload_is_400_naming_the_field(stack):
    store_url, adapter = stack
    bad = payload("argilla_response_missing_external_id.json")
    status, body = adapter.post("/argilla", bad, signed(bad, "msg_1"))
    assert (status, body["field"]) == (400, "data.record.external_id"), body
    event = json.loads(payload("argilla_response_created.json"))
    event["data"]["values"]["preference"]["value"] = "C"
    raw = json.dumps(event).encode()
    status, body = adapter.post("/argilla", raw, signed(raw, "msg_2"))
    assert (status, body["field"]) == (400, "data.values.preference.value"), body
    status, body = adapter.post("/argilla", b"{not json", signed(b"{not json", "msg_3"))
    assert (status, body["field"]) == (400, "body")
    assert adapter.outbox.depth() == 0
    assert stored(store_url) == []


def test_label_studio_end_to_end(stack):
    store_url, adapter = stack
    created = payload("label_studio_annotation_created.json")
    status, body = adapter.post("/label-studio", created, ls_auth())
    assert (status, body["queued"]) == (202, 2), body
    adapter.drain()
    pref, ratings = stored(store_url)
    assert pref.task_id == "t-ls-1" and pref.annotator_id == "label-studio:3"
    assert pref.preference.choice == pb.Preference.CHOICE_B
    assert pref.lead_time_seconds == pytest.approx(23.71)
    assert [(e.candidate_id, e.aspect, e.value) for e in ratings.ratings.entries] == [("c0", "helpfulness", 1.0)]
    assert pref.metadata["label-studio.task_id"] == "1042"

    # the same delivery again (a manual resend): stored once
    status, body = adapter.post("/label-studio", created, ls_auth())
    assert (status, body["queued"]) == (202, 2)
    adapter.drain()
    assert len(stored(store_url)) == 2

    updated = payload("label_studio_annotation_updated.json")
    status, body = adapter.post("/label-studio", updated, ls_auth())
    assert (status, body["queued"]) == (202, 3), body
    adapter.drain()
    records = stored(store_url)
    assert len(records) == 5 and len({r.feedback_id for r in records}) == 5
    assert records[-1].correction.corrected_text == "11"
    assert records[-1].lead_time_seconds == pytest.approx(61.2)

    status, body = adapter.post("/label-studio", payload("label_studio_annotation_skipped.json"), ls_auth())
    assert (status, body["ignored"]) == (200, True)
    assert len(stored(store_url)) == 5


def test_label_studio_malformed_and_rejected(stack):
    store_url, adapter = stack
    status, body = adapter.post("/label-studio", payload("label_studio_annotation_bad_rating.json"), ls_auth())
    assert (status, body["field"]) == (400, "annotation.result[1].value.rating"), body
    event = json.loads(payload("label_studio_annotation_created.json"))
    del event["task"]  # a webhook configured without payloads
    status, body = adapter.post("/label-studio", json.dumps(event).encode(), ls_auth())
    assert (status, body["field"]) == (400, "task"), body
    assert adapter.outbox.depth() == 0
    # well-formed, but the service does not know the task: queued, then rejected by the
    # service's validation, which is kept (with its field) in the dead-letter table
    event = json.loads(payload("label_studio_annotation_created.json"))
    event["task"]["data"]["task_id"] = "no-such-task"
    status, body = adapter.post("/label-studio", json.dumps(event).encode(), ls_auth())
    assert (status, body["queued"]) == (202, 2), body
    adapter.drain()
    assert {d.field for d in adapter.outbox.dead_letters()} == {"task_id"}
    assert stored(store_url) == []


def test_cli_adapters_serve(tmp_path):
    store_url = f"sqlite:///{tmp_path / 'f.db'}"
    publish(store_url, "t-argilla-1", "t-ls-1")
    with running_server(store_url) as srv:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "hitl.cli", "adapters", "serve", "--feedback", srv.address, "--port", str(port),
             "--argilla-secret", SECRET, "--label-studio-token", LS_TOKEN, "--outbox", str(tmp_path / "state" / "outbox.db")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            for _ in range(300):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    if proc.poll() is not None:
                        raise AssertionError(proc.stdout.read())
                    time.sleep(0.1)
            created = payload("argilla_response_created.json")
            status, body = post(port, "/argilla", created, signed(created, "msg_1"))
            assert (status, body["queued"]) == (202, 2), body
            status, _ = post(port, "/argilla", created, signed(created, "msg_2", secret="whsec_QUJD"))
            assert status == 401
            status, _ = post(port, "/label-studio", payload("label_studio_annotation_created.json"))
            assert status == 401
            status, body = post(port, "/label-studio", payload("label_studio_annotation_created.json"), ls_auth())
            assert (status, body["queued"]) == (202, 2), body
            wait_for(lambda: len(stored(store_url)) == 4, 30, lambda: f"{len(stored(store_url))} stored")
        finally:
            proc.terminate()
            proc.wait(30)
    assert len(stored(store_url)) == 4
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "state" / "outbox.db").stat().st_mode & 0o777 == 0o600


def test_label_studio_token_and_unreachable_service(tmp_path):
    settings = simple_settings(tmp_path / "outbox.db", label_studio_token=LS_TOKEN)
    with Adapter(f"127.0.0.1:{free_port()}", settings) as adapter:
        created = payload("label_studio_annotation_created.json")
        status, body = adapter.post("/label-studio", created, ls_auth("wrong"))
        assert (status, body["field"]) == (401, "Authorization")
        # the right token: queued (not 502, not lost) although the service is not there
        status, body = adapter.post("/label-studio", created, ls_auth())
        assert (status, body["queued"]) == (202, 2), body
        wait_for(lambda: adapter.health()["outbox"]["forwarding"] == "failing", 10)
        assert adapter.health()["outbox"]["depth"] == 2
