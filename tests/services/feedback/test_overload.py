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


def test_byte_budget_refills_at_its_rate_and_bursts_to_its_cap():
    from services.feedback.budget import ByteBudget

    now = [0.0]
    budget = ByteBudget(rate=100, burst=300, clock=lambda: now[0])
    assert budget.take("a", 300) == 0.0  # the whole burst
    assert budget.take("a", 50) == 0.5  # 50 bytes short at 100 bytes/s
    assert budget.take("b", 300) == 0.0  # another principal has its own bucket
    now[0] = 10.0
    assert budget.take("a", 300) == 0.0  # refilled, but never past the burst
    assert budget.take("a", 1) > 0


def test_a_token_over_its_byte_budget_is_told_to_retry_and_its_stream_is_slowed(tmp_path):
    """Per principal: unary calls over the budget get RESOURCE_EXHAUSTED with a retry hint
    (the client waits and succeeds), a stream is read more slowly; nothing is lost."""
    with running_server(f"sqlite:///{tmp_path / 'f.db'}", max_message_bytes=1024, max_bytes_per_second_per_principal=2048,
                        metrics_port=None) as srv:
        srv.server.store.add_tasks([make_task()])
        stub = pb_grpc.FeedbackServiceStub(grpc.insecure_channel(srv.address))
        refused = None
        for i in range(20):  # ~4 KiB burst, then refused
            try:
                stub.SubmitFeedback(pb.SubmitFeedbackRequest(records=[preference(f"u{i}", metadata={"pad": "x" * 600})]), timeout=10)
            except grpc.RpcError as err:
                refused = err
                break
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "byte budget" in refused.details() and retry_hint_s(refused) > 0
        assert metric(srv, "hitl_feedback_refused_total", reason="byte_budget") == 1
        with FeedbackClient(srv.address, batch_size=2) as client:
            assert all(r.status == pb.RecordResult.STATUS_ACCEPTED for r in client.submit([preference(f"r{i}", metadata={"pad": "y" * 300}) for i in range(6)]))
            report = client.stream([preference(f"s{i}", metadata={"pad": "z" * 300}) for i in range(30)])
        assert report.count(pb.RecordResult.STATUS_ACCEPTED) == 30 and report.reconnects == 0
        assert metric(srv, "hitl_feedback_throttled_seconds_total") > 0  # held back, not refused
        assert srv.server.store.watermark() == i + 6 + 30
