"""Overload answers RESOURCE_EXHAUSTED with a retry hint; the client waits and retries."""

import threading
import time

import grpc

from hitl.feedback.v1 import feedback_pb2 as pb
from hitl.feedback.v1 import feedback_pb2_grpc as pb_grpc
from services.feedback.client import FeedbackClient, retry_hint_s
from tests.services.feedback.conftest import make_task, preference, running_server


def hold_writer(srv) -> threading.Event:
    """Keep the store's writer thread busy until the event is set (a slow disk)."""
    release = threading.Event()
    srv.server._writer.submit(release.wait, 30)
    return release


def wait_pending(srv, n):
    for _ in range(200):
        if srv.server._committer.pending >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"pending never reached {n}")


def metric(srv, name: str, **labels) -> float:
    return srv.server.metrics.registry.get_sample_value(name, labels or None) or 0.0


def wait_for(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s:g}s")
        time.sleep(0.01)


def test_overloaded_unary_call_gets_a_retry_hint_and_stores_nothing(tmp_path):
    with running_server(f"sqlite:///{tmp_path / 'f.db'}", max_pending_records=10) as srv:
        srv.server.store.add_tasks([make_task()])
        stub = pb_grpc.FeedbackServiceStub(grpc.insecure_channel(srv.address))
        release = hold_writer(srv)
        first = stub.SubmitFeedback.future(pb.SubmitFeedbackRequest(records=[preference(f"a{i}") for i in range(5)]))
        wait_pending(srv, 5)
        try:
            stub.SubmitFeedback(pb.SubmitFeedbackRequest(records=[preference(f"b{i}") for i in range(10)]))
            raise AssertionError("expected RESOURCE_EXHAUSTED")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert retry_hint_s(err) is not None and retry_hint_s(err) > 0
        release.set()
        assert [r.status for r in first.result(30).results] == [pb.RecordResult.STATUS_ACCEPTED] * 5
        assert [r.record.feedback_id for r in srv.server.store.iter_after(0)] == [f"a{i}" for i in range(5)]


def test_client_retries_after_overload(tmp_path):
    with running_server(f"sqlite:///{tmp_path / 'f.db'}", max_pending_records=10) as srv:
        srv.server.store.add_tasks([make_task()])
        release = hold_writer(srv)
        with FeedbackClient(srv.address) as first, FeedbackClient(srv.address) as second:
            results = {}
            a = threading.Thread(target=lambda: results.__setitem__("a", first.submit([preference(f"a{i}") for i in range(5)])))
            a.start()
            wait_pending(srv, 5)
            b = threading.Thread(target=lambda: results.__setitem__("b", second.submit([preference(f"b{i}") for i in range(10)])))
            b.start()
            wait_for(lambda: metric(srv, "hitl_feedback_refused_total", reason="overloaded") >= 1, "a refusal")
            assert "b" not in results  # refused and waiting to retry
            release.set()
            a.join(30)
            b.join(30)
        assert all(r.status == pb.RecordResult.STATUS_ACCEPTED for r in results["a"] + results["b"])
        assert srv.server.store.stats().total_records == 15


def test_stream_waits_instead_of_failing(tmp_path):
    """A stream is back-pressured (the server stops reading), not refused."""
    with running_server(f"sqlite:///{tmp_path / 'f.db'}", max_pending_records=10, max_inflight_batches=2) as srv:
        srv.server.store.add_tasks([make_task()])
        release = hold_writer(srv)
        with FeedbackClient(srv.address, batch_size=4) as client:
            done = {}
            t = threading.Thread(target=lambda: done.__setitem__("r", client.stream([preference(f"s{i}") for i in range(40)])))
            t.start()
            wait_pending(srv, 8)  # the in-flight window (2 batches of 4) is full: the server stops reading
            assert "r" not in done
            release.set()
            t.join(30)
        report = done["r"]
        assert report.count(pb.RecordResult.STATUS_ACCEPTED) == 40 and report.reconnects == 0
