"""Dependency faults: the database restarted under streaming clients, malformed
stream messages, a server that ends streams early, unknown fields, unbounded
metric labels. Real gRPC, real PostgreSQL (a private server the test restarts)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from hitl.feedback.v1 import feedback_pb2 as pb
from hitl.feedback.v1 import feedback_pb2_grpc as pb_grpc
from services.feedback.client import Backoff, FeedbackClient, FeedbackClientError
from services.feedback.server import SERVICE_NAME
from services.feedback.store import StoreUnavailable, open_store
from tests.services.feedback.conftest import make_task, preference, running_server
from tests.services.feedback.private_postgres import PrivatePostgres

ACCEPTED, DUPLICATE, REJECTED = (
    pb.RecordResult.STATUS_ACCEPTED,
    pb.RecordResult.STATUS_DUPLICATE,
    pb.RecordResult.STATUS_REJECTED,
)
CLIENTS = 4
PER_CLIENT = 1500


@pytest.fixture
def private_postgres():
    pg = PrivatePostgres()
    pg.start()
    try:
        yield pg
    finally:
        pg.close()


def _health(address: str, service: str = SERVICE_NAME) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _wait_health(address: str, status: int, within_s: float) -> None:
    """Poll until health reports `status`; fail after `within_s` (a bound the issue sets, not a timing)."""
    deadline = time.monotonic() + within_s
    while _health(address) != status:
        assert time.monotonic() < deadline, f"health did not turn {health_pb2.HealthCheckResponse.ServingStatus.Name(status)} within {within_s}s"
        time.sleep(0.1)


@pytest.mark.postgres
def test_postgres_restart_under_four_streaming_clients(private_postgres):
    url = private_postgres.url + "?schema=hitl_restart"
    with running_server(url, store_check_seconds=0.2) as server:
        server.server.store.add_tasks([make_task(f"t{c}") for c in range(CLIENTS)])
        reports: dict[int, object] = {}
        errors: list[BaseException] = []
        acked = [0] * CLIENTS

        def stream(c: int) -> None:
            records = [preference(f"c{c}-r{i}", task_id=f"t{c}", annotator=f"a{c}-{i}") for i in range(PER_CLIENT)]

            def on_ack(ack: pb.BatchAck) -> None:
                acked[c] += len(ack.results)
                time.sleep(0.01)  # keep the stream open across the restart

            try:
                with FeedbackClient(server.address, batch_size=10, backoff=Backoff(initial_s=0.05, max_s=0.5, give_up_after_s=60)) as client:
                    reports[c] = client.stream(records, window=4, on_ack=on_ack)
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=stream, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        while min(acked) < 50:  # every client is mid-stream
            assert all(t.is_alive() for t in threads), errors
            time.sleep(0.05)
        private_postgres.stop()
        _wait_health(server.address, health_pb2.HealthCheckResponse.NOT_SERVING, within_s=10)
        assert _health(server.address, "") == health_pb2.HealthCheckResponse.SERVING  # liveness: the process serves
        during = sum(acked)
        time.sleep(1.0)
        assert sum(acked) == during, "nothing is acknowledged while the database is down"
        private_postgres.start()
        _wait_health(server.address, health_pb2.HealthCheckResponse.SERVING, within_s=10)
        # writes resume: a fresh client whose whole retry budget is 10 s gets its record stored
        with FeedbackClient(server.address, backoff=Backoff(give_up_after_s=10)) as probe:
            assert [r.status for r in probe.submit([preference("after-restart", task_id="t0", annotator="probe")])] == [ACCEPTED]
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert all(not t.is_alive() for t in threads)
        assert sum(r.reconnects for r in reports.values()) >= CLIENTS  # every stream broke and resumed
        for c in range(CLIENTS):
            statuses = {r.feedback_id: r.status for r in reports[c].results}
            assert len(statuses) == PER_CLIENT
            assert set(statuses.values()) <= {ACCEPTED, DUPLICATE}  # a resend of a committed batch is a duplicate
    store = open_store(url)
    try:
        ids = [r.record.feedback_id for r in store.iter_after(0)]
    finally:
        store.close()
    assert len(ids) == len(set(ids)) == CLIENTS * PER_CLIENT + 1  # each record stored exactly once


@pytest.mark.postgres
def test_store_reconnects_after_restart_and_spaces_attempts(private_postgres):
    store = open_store(private_postgres.url + "?schema=hitl_reconnect")
    try:
        store.add_tasks([make_task()])
        assert store.write_batch([preference("before")])[0].status.value == "accepted"
        private_postgres.stop()
        with pytest.raises(Exception):
            store.write_batch([preference("during")])  # the lost connection: this call fails, unacked
        with pytest.raises(StoreUnavailable, match="cannot connect"):
            store.ping()
        with pytest.raises(StoreUnavailable, match="next connection attempt"):
            store.ping()  # within the backoff: no new attempt, a fast answer
        private_postgres.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                store.ping()
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert store.write_batch([preference("after")])[0].status.value == "accepted"
        assert [r.record.feedback_id for r in store.iter_after(0)] == ["before", "after"]
    finally:
        store.close()


def test_malformed_stream_message_is_invalid_argument_naming_the_batch(server):
    server.server.store.add_tasks([make_task()])
    channel = grpc.insecure_channel(server.address)
    call = channel.stream_stream(
        "/hitl.feedback.v1.FeedbackService/StreamFeedback", request_serializer=lambda b: b, response_deserializer=pb.BatchAck.FromString
    )
    good = pb.FeedbackBatch(sequence=1, records=[preference("ok")]).SerializeToString()
    later = pb.FeedbackBatch(sequence=3, records=[preference("later")]).SerializeToString()
    acks = []
    with pytest.raises(grpc.RpcError) as err:
        for ack in call(iter([good, b"\xff\xff\xff\xff", later])):
            acks.append(ack)
    channel.close()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "after sequence 1" in err.value.details() and "FeedbackBatch" in err.value.details()
    assert [a.sequence for a in acks] == [1]  # the batch before it was acked
    assert [r.record.feedback_id for r in server.server.store.iter_after(0)] == ["ok"]


def test_malformed_unary_request_is_invalid_argument(server):
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/hitl.feedback.v1.FeedbackService/SubmitFeedback", request_serializer=lambda b: b,
                                   response_deserializer=pb.SubmitFeedbackResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            call(b"\x0a\xff\xff", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "SubmitFeedbackRequest" in err.value.details()


class _EndsEarly(pb_grpc.FeedbackServiceServicer):
    """A server that ends every stream after one ack, without an error."""

    def __init__(self):
        self.streams: list[float] = []

    def StreamFeedback(self, request_iterator, context):
        self.streams.append(time.monotonic())
        for batch in request_iterator:
            yield pb.BatchAck(sequence=batch.sequence, results=[pb.RecordResult(feedback_id=r.feedback_id, status=ACCEPTED) for r in batch.records])
            return


def test_client_backs_off_and_gives_up_when_streams_keep_ending_early():
    from concurrent.futures import ThreadPoolExecutor

    servicer = _EndsEarly()
    server = grpc.server(ThreadPoolExecutor(4))
    pb_grpc.add_FeedbackServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        records = [preference(f"r{i}") for i in range(20)]
        # every stream acks one batch: progress, so it goes on to the end, pausing between streams
        with FeedbackClient(f"127.0.0.1:{port}", batch_size=5, backoff=Backoff(initial_s=0.2, max_s=0.2, give_up_after_s=5)) as client:
            report = client.stream(records, window=1)
        assert report.count(ACCEPTED) == 20 and report.reconnects >= 3
        gaps = [b - a for a, b in zip(servicer.streams, servicer.streams[1:])]
        assert min(gaps) >= 0.09  # jittered 0.2 s: at least half of it between two streams, never a tight loop
    finally:
        server.stop(0)


def test_client_gives_up_with_a_clear_error():
    with FeedbackClient("127.0.0.1:9", backoff=Backoff(initial_s=0.05, max_s=0.1, give_up_after_s=0.5), timeout_s=1) as client:
        with pytest.raises(FeedbackClientError, match="UNAVAILABLE") as err:
            client.stream([preference("x")])
    assert "no batch acknowledged for 0.5s" in str(err.value)


def test_unknown_fields_are_rejected_naming_where(server):
    server.server.store.add_tasks([make_task()])
    plain = preference("plain")
    top = pb.FeedbackRecord.FromString(preference("top").SerializeToString() + b"\xfa\x06\x04" + b"x" * 4)
    nested = preference("nested")
    nested.preference.CopyFrom(pb.Preference.FromString(nested.preference.SerializeToString() + b"\xfa\x06\x03abc"))
    huge = pb.FeedbackRecord.FromString(preference("huge").SerializeToString() + b"\xfa\x06\x80\x80\x40" + b"y" * (1 << 20))
    with FeedbackClient(server.address) as client:
        results = client.submit([plain, top, nested, huge])
    assert [r.status for r in results] == [ACCEPTED, REJECTED, REJECTED, REJECTED]
    assert [r.field for r in results[1:]] == ["unknown_fields", "preference.unknown_fields", "unknown_fields"]
    assert "111" in results[1].reason
    assert [r.record.feedback_id for r in server.server.store.iter_after(0)] == ["plain"]


def test_rejection_reasons_are_a_fixed_label_set(store_url):
    with running_server(store_url, metrics_port=0) as server:
        server.server.store.add_tasks([make_task()])
        bad = []
        for i in range(50):
            r = preference(f"m{i}")
            r.metadata[f"k{i}]x{i}"] = "v" * 5000  # a key that would survive index stripping
            bad.append(r)
        with FeedbackClient(server.address) as client:
            results = client.submit(bad)
        assert {r.status for r in results} == {REJECTED}
        text = generate_latest(server.server.metrics.registry).decode()
    rejected = [line for line in text.splitlines() if line.startswith("hitl_feedback_records_total{") and 'result="rejected"' in line]
    assert len(rejected) == 1 and 'reason="other"' in rejected[0] and rejected[0].endswith(" 50.0")
