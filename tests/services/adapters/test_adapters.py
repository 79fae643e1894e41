"""Argilla and Label Studio webhooks, end to end: sample payloads in each
tool's documented format are POSTed to the receivers on localhost, which
submit records over gRPC to a real feedback server; the store is then read."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from hitl.feedback.v1 import feedback_pb2 as pb
from services.adapters import argilla
from services.adapters.app import make_app
from services.feedback.client import FeedbackClient
from services.feedback.store import open_store
from tests.services.adapters.conftest import Receiver, payload, post
from tests.services.feedback.conftest import make_task, running_server

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SCALES = [("helpfulness", 1, 5), ("overall", 1, 5)]


def stored(store_url: str):
    db = open_store(store_url)
    try:
        return [s.record for s in db.iter_after(0)]
    finally:
        db.close()


def publish(store_url: str, *task_ids: str) -> None:
    db = open_store(store_url)
    try:
        outcomes = db.add_tasks([make_task(t, project="default", scales=SCALES) for t in task_ids])
        assert all(o.created for o in outcomes)
    finally:
        db.close()


def signed(body: bytes, msg_id: str, secret: str = SECRET, at: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if at is None else at
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": argilla.sign(secret, msg_id, ts, body)}


@pytest.fixture
def stack(store_url):
    """(store_url, receiver port): gRPC server + receivers with an Argilla secret."""
    publish(store_url, "t-argilla-1", "t-ls-1")
    with running_server(store_url) as srv:
        client = FeedbackClient(srv.address)
        receiver = Receiver(make_app(client, argilla_secret=SECRET)).start()
        try:
            yield store_url, receiver.port
        finally:
            receiver.stop()
            client.close()


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
    store_url, port = stack
    created = payload("argilla_response_created.json")
    status, body = post(port, "/argilla", created, signed(created, "msg_1"))
    assert (status, body["accepted"], body["duplicate"]) == (200, 2, 0), body
    records = stored(store_url)
    assert [r.WhichOneof("judgement") for r in records] == ["preference", "ratings"]
    pref, ratings = records
    assert pref.task_id == "t-argilla-1" and pref.project == "default" and pref.annotator_id == "argilla:ada"
    assert (pref.preference.candidate_a_id, pref.preference.candidate_b_id, pref.preference.choice) == ("c0", "c1", pb.Preference.CHOICE_A)
    assert [(e.candidate_id, e.aspect, e.value) for e in ratings.ratings.entries] == [("c0", "helpfulness", 4.0)]
    assert pref.metadata["note"] == "A answers the question."
    assert pref.metadata["argilla.annotation_id"] == "38e4d537-c768-4ced-916e-31b74b220c36"
    assert pref.client_time.ToJsonString() == "2024-10-02T10:15:00.398Z"

    # Argilla retries with a new message id (and timestamp): stored once
    status, body = post(port, "/argilla", created, signed(created, "msg_2"))
    assert (status, body["accepted"], body["duplicate"]) == (200, 0, 2), body
    assert len(stored(store_url)) == 2

    # the annotator edits the response: a new update time, new records
    updated = payload("argilla_response_updated.json")
    status, body = post(port, "/argilla", updated, signed(updated, "msg_3"))
    assert (status, body["accepted"]) == (200, 3), body
    records = stored(store_url)
    assert [r.WhichOneof("judgement") for r in records] == ["preference", "ratings", "preference", "ratings", "correction"]
    assert len({r.feedback_id for r in records}) == 5
    assert records[3].ratings.entries[0].value == 5.0
    fix = records[4].correction
    assert (fix.candidate_id, fix.corrected_text, fix.note) == ("c0", "Put it in boiling water for 8 minutes, then into cold water.", "Added the cooling step.")

    # drafts are acknowledged and ignored
    draft = payload("argilla_response_draft.json")
    status, body = post(port, "/argilla", draft, signed(draft, "msg_4"))
    assert (status, body["ignored"]) == (200, True)
    assert len(stored(store_url)) == 5


def test_argilla_bad_signature_stores_nothing(stack):
    store_url, port = stack
    created = payload("argilla_response_created.json")
    wrong = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="
    status, body = post(port, "/argilla", created, signed(created, "msg_1", secret=wrong))
    assert status == 401 and body["field"] == "webhook-signature"
    tampered = created.replace(b'"A"', b'"B"', 1)
    status, _ = post(port, "/argilla", tampered, signed(created, "msg_2"))
    assert status == 401
    status, body = post(port, "/argilla", created, signed(created, "msg_3", at=int(time.time()) - 3600))
    assert status == 401 and "away from now" in body["reason"]
    status, _ = post(port, "/argilla", created)  # no signature headers at all
    assert status == 401
    assert stored(store_url) == []


def test_argilla_malformed_payload_is_400_naming_the_field(stack):
    store_url, port = stack
    bad = payload("argilla_response_missing_external_id.json")
    status, body = post(port, "/argilla", bad, signed(bad, "msg_1"))
    assert (status, body["field"]) == (400, "data.record.external_id"), body
    event = json.loads(payload("argilla_response_created.json"))
    event["data"]["values"]["preference"]["value"] = "C"
    raw = json.dumps(event).encode()
    status, body = post(port, "/argilla", raw, signed(raw, "msg_2"))
    assert (status, body["field"]) == (400, "data.values.preference.value"), body
    status, body = post(port, "/argilla", b"{not json", signed(b"{not json", "msg_3"))
    assert (status, body["field"]) == (400, "body")
    assert stored(store_url) == []


def test_label_studio_end_to_end(stack):
    store_url, port = stack
    created = payload("label_studio_annotation_created.json")
    status, body = post(port, "/label-studio", created)
    assert (status, body["accepted"]) == (200, 2), body
    pref, ratings = stored(store_url)
    assert pref.task_id == "t-ls-1" and pref.annotator_id == "label-studio:3"
    assert pref.preference.choice == pb.Preference.CHOICE_B
    assert pref.lead_time_seconds == pytest.approx(23.71)
    assert [(e.candidate_id, e.aspect, e.value) for e in ratings.ratings.entries] == [("c0", "helpfulness", 1.0)]
    assert pref.metadata["label-studio.task_id"] == "1042"

    # the same delivery again (a manual resend): stored once
    status, body = post(port, "/label-studio", created)
    assert (status, body["accepted"], body["duplicate"]) == (200, 0, 2)

    updated = payload("label_studio_annotation_updated.json")
    status, body = post(port, "/label-studio", updated)
    assert (status, body["accepted"]) == (200, 3), body
    records = stored(store_url)
    assert len(records) == 5 and len({r.feedback_id for r in records}) == 5
    assert records[-1].correction.corrected_text == "11"
    assert records[-1].lead_time_seconds == pytest.approx(61.2)

    status, body = post(port, "/label-studio", payload("label_studio_annotation_skipped.json"))
    assert (status, body["ignored"]) == (200, True)
    assert len(stored(store_url)) == 5


def test_label_studio_malformed_and_rejected(stack):
    store_url, port = stack
    status, body = post(port, "/label-studio", payload("label_studio_annotation_bad_rating.json"))
    assert (status, body["field"]) == (400, "annotation.result[1].value.rating"), body
    event = json.loads(payload("label_studio_annotation_created.json"))
    del event["task"]  # a webhook configured without payloads
    status, body = post(port, "/label-studio", json.dumps(event).encode())
    assert (status, body["field"]) == (400, "task"), body
    # well-formed, but the service does not know the task: its validation answers
    event = json.loads(payload("label_studio_annotation_created.json"))
    event["task"]["data"]["task_id"] = "no-such-task"
    status, body = post(port, "/label-studio", json.dumps(event).encode())
    assert (status, body["field"]) == (422, "task_id"), body
    assert stored(store_url) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_adapters_serve(tmp_path):
    store_url = f"sqlite:///{tmp_path / 'f.db'}"
    publish(store_url, "t-argilla-1", "t-ls-1")
    with running_server(store_url) as srv:
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "hitl.cli", "adapters", "serve", "--feedback", srv.address, "--port", str(port), "--argilla-secret", SECRET],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            import urllib.request

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
            assert (status, body["accepted"]) == (200, 2), body
            status, _ = post(port, "/argilla", created, signed(created, "msg_2", secret="whsec_QUJD"))
            assert status == 401
            status, body = post(port, "/label-studio", payload("label_studio_annotation_created.json"))
            assert (status, body["accepted"]) == (200, 2), body
        finally:
            proc.terminate()
            proc.wait(30)
    assert len(stored(store_url)) == 4


def test_label_studio_token_and_unreachable_service():
    from services.feedback.client import Backoff

    client = FeedbackClient(f"127.0.0.1:{_free_port()}", timeout_s=1.0, backoff=Backoff(initial_s=0.01, max_s=0.05, give_up_after_s=0.5))
    receiver = Receiver(make_app(client, label_studio_token="ls-secret")).start()
    try:
        created = payload("label_studio_annotation_created.json")
        status, body = post(receiver.port, "/label-studio", created, {"Authorization": "Token wrong"})
        assert (status, body["field"]) == (401, "Authorization")
        # the right token gets as far as the service, which is not there
        status, body = post(receiver.port, "/label-studio", created, {"Authorization": "Token ls-secret"})
        assert (status, body["field"]) == (502, "feedback"), body
    finally:
        receiver.stop()
        client.close()
