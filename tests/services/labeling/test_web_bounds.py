"""What the labeling page's server keeps stays bounded, whatever is sent, and bad bodies are
answered 4xx naming `body` (never 500): deep nesting, oversized bodies, non-objects, ids
over 128 bytes. Real aiohttp server in front of a real feedback gRPC server on SQLite;
the bounds are shown by counting entries in the server's structures, not by memory."""

from __future__ import annotations

import http.client
import json
import uuid

import pytest

from services.labeling.web.app import MAX_JSON_DEPTH, SMALL_BODY_BYTES
from tests.services.feedback.conftest import make_task
from tests.services.labeling.conftest import publish, start_server, stored
from tests.services.labeling.test_web_http import PREFER_A, Http, WebFront, judgement, web_config

LIMITS = {"max_annotators": 3, "max_tasks_per_annotator": 4, "prefetch": 1, "max_body_bytes": 64 * 1024}


@pytest.fixture
def bounded(url):
    """Twenty tasks, and a page whose bounds are small enough to reach."""
    publish(url, *[make_task(f"t{i:02d}") for i in range(20)])
    srv = start_server(url)
    front = WebFront(web_config(srv.address, guidelines_version="g-7", auth={"max_sessions": 5}, **LIMITS)).start()
    try:
        yield front
    finally:
        front.stop()
        srv.stop()


def signed_in(front: WebFront, annotator: str) -> Http:
    http = Http(front.base)
    assert http.call("POST", "/api/signin", {"annotator_id": annotator}) == (200, {"annotator_id": annotator})
    return http


def held_task(http: Http) -> dict:
    status, data = http.call("GET", "/api/task")
    assert status == 200 and data["task"], data
    return data["task"]


def judge(http: Http, task: dict) -> dict:
    order = [c["candidate_id"] for c in task["candidates"]]
    body = judgement(task["task_id"], display_order=order,
                     preference={"candidate_a_id": order[0], "candidate_b_id": order[1], "choice": "tie"})
    status, data = http.call("POST", "/api/judgements", body)
    assert (status, data.get("status")) == (200, "accepted"), data
    return data


def chunked_post(front: WebFront, path: str, body: bytes, cookie: str) -> tuple[int, dict]:
    """POST without a Content-Length (chunked): the limit must hold while reading, too."""
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
    try:
        chunks = (body[i:i + 8192] for i in range(0, len(body), 8192))
        conn.request("POST", path, body=chunks, encode_chunked=True,
                     headers={"Content-Type": "application/json", "Cookie": f"hitl_session={cookie}"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


# -- the bounds -----------------------------------------------------------------------------------


def test_per_annotator_and_per_task_state_stays_within_its_bounds(bounded, url):
    front = bounded.front
    # many annotators, each with a session, a held task and a tally
    clients = {f"annotator-{i:02d}-" + "x" * 100: None for i in range(12)}
    for name in clients:
        clients[name] = signed_in(bounded, name)
        held_task(clients[name])
        assert front.book.sizes()["annotators"] <= LIMITS["max_annotators"]
        assert len(front.gate.sessions) <= 5
    assert front.book.sizes()["annotators"] == LIMITS["max_annotators"] and len(front.gate.sessions) == 5
    assert len(front.locks) == 0  # a lock lives only while a request holds it
    first, last = list(clients.values())[0], list(clients.values())[-1]
    assert first.call("GET", "/api/task")[0] == 401  # the oldest session went first
    assert last.call("GET", "/api/stats")[1]["session"]["pulled"] == 1

    # one annotator: many unique task ids of the largest size, skipped and judged
    for i in range(40):
        task_id = f"{i:03d}-" + uuid.uuid4().hex * 3 + "y" * 28  # 128 bytes
        assert len(task_id.encode()) == 128
        assert last.call("POST", "/api/skip", {"task_id": task_id}) == (200, {"task_id": task_id, "skipped": False})
        big = judgement(task_id, prompt_id="p", correction={"candidate_id": "c0", "corrected_text": "z" * 60_000})
        assert last.call("POST", "/api/judgements", big)[0] == 422  # no such task on the service: nothing kept
    sizes = front.book.sizes()
    assert sizes["held"] <= LIMITS["prefetch"] and sizes["finished"] == 0

    # judged tasks: the remembered ids stop at max_tasks_per_annotator
    for _ in range(LIMITS["max_tasks_per_annotator"] + 3):
        judge(last, held_task(last))
        assert front.book.sizes()["finished"] <= LIMITS["max_tasks_per_annotator"]
    assert front.book.sizes()["finished"] == LIMITS["max_tasks_per_annotator"]
    assert front.book.sizes()["annotators"] <= LIMITS["max_annotators"] and len(front.locks) == 0
    assert len(stored(url)) == LIMITS["max_tasks_per_annotator"] + 3


def test_ids_over_128_bytes_are_refused_naming_the_field(bounded, url):
    long_id = "é" * 65  # 130 bytes of UTF-8, 65 characters
    http = Http(bounded.base)
    status, data = http.call("POST", "/api/signin", {"annotator_id": long_id})
    assert (status, data["field"]) == (400, "annotator_id") and len(bounded.front.gate.sessions) == 0
    http = signed_in(bounded, "alice")
    for path, body, field in [
        ("/api/skip", {"task_id": long_id}, "task_id"),
        ("/api/skip", {"task_id": ""}, "task_id"),
        ("/api/skip", {"task_id": ["t00"]}, "task_id"),
        ("/api/skip", {"task_id": "t00", "annotator_id": "bob"}, "annotator_id"),
        ("/api/judgements", judgement(long_id, **PREFER_A), "task_id"),
        ("/api/judgements", judgement("t00", **PREFER_A) | {"feedback_id": long_id}, "feedback_id"),
    ]:
        status, data = http.call("POST", path, body)
        assert (status, data["field"]) == (400, field), (path, body)
    assert bounded.front.book.sizes() == {"annotators": 0, "held": 0, "finished": 0} and stored(url) == []


# -- malformed bodies ---------------------------------------------------------------------------------


def test_malformed_json_is_400_and_oversized_is_413_naming_body(bounded, url):
    http = signed_in(bounded, "alice")
    # json.loads recursed into these until RecursionError (500); each is within every route's size limit
    deep = [b"[" * 4000, b'{"a":' * 800, b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),
            b'{"task_id": ' + b"[" * 2000 + b"]" * 2000 + b"}",
            b'{"task_id": ' + b"[" * 40 + b"]" * 40 + b"}"]  # parses, but deeper than a judgement ever is
    not_objects = [b"[]", b'"t00"', b"3", b"null", b"true"]
    for path in ("/api/signin", "/api/skip", "/api/judgements"):
        for raw in deep + not_objects + [b"{nope", b"\xff\xfe"]:
            status, data = http.call("POST", path, raw=raw)
            assert (status, data["field"]) == (400, "body"), (path, raw[:20], data)
    for raw in (b"[" * 60_000, b'{"a":' * 12_000):  # the judgement route's limit is larger
        status, data = http.call("POST", "/api/judgements", raw=raw)
        assert (status, data["field"]) == (400, "body"), (raw[:20], data)

    limits = {"/api/signin": SMALL_BODY_BYTES, "/api/skip": SMALL_BODY_BYTES, "/api/judgements": LIMITS["max_body_bytes"]}
    cookie = http.session_cookie()
    for path, limit in limits.items():
        raw = json.dumps({"task_id": "t00", "pad": "p" * limit}).encode()
        status, data = http.call("POST", path, raw=raw)
        assert (status, data["field"]) == (413, "body"), path
        status, data = chunked_post(bounded, path, raw, cookie)
        assert (status, data["field"]) == (413, "body"), path
    assert stored(url) == []

    # brackets inside strings are text, not nesting: a correction full of them is stored
    task = held_task(http)
    text = "[" * 5000 + "{" * 5000 + '"\\'
    body = judgement(task["task_id"], correction={"candidate_id": "c0", "corrected_text": text})
    status, data = http.call("POST", "/api/judgements", body)
    assert (status, data["status"]) == (200, "accepted"), data
    (record,) = stored(url)
    assert record.correction.corrected_text == text and record.annotator_id == "alice"
