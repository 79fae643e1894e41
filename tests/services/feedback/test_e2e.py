"""Every RPC and record kind over real gRPC on localhost, against both stores."""

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hitl.feedback.v1 import feedback_pb2 as pb
from hitl.feedback.v1 import feedback_pb2_grpc as pb_grpc
from services.feedback.client import FeedbackClient, FeedbackClientError
from services.feedback.server import SERVICE_NAME
from tests.services.feedback.conftest import make_task, preference

ACCEPTED, DUPLICATE, REJECTED = (
    pb.RecordResult.STATUS_ACCEPTED,
    pb.RecordResult.STATUS_DUPLICATE,
    pb.RecordResult.STATUS_REJECTED,
)


def one_of_each_kind(task_id="t1"):
    base = dict(project="demo", task_id=task_id, annotator_id="alice", prompt_id=f"p-{task_id}")
    return [
        pb.FeedbackRecord(feedback_id=f"{task_id}-pref", confidence=0.8, lead_time_seconds=12.5,
                          preference=pb.Preference(candidate_a_id="c0", candidate_b_id="c1", choice=pb.Preference.CHOICE_B, strength=0.7),
                          metadata={"tool": "test"}, guidelines_version="v2", **base),
        pb.FeedbackRecord(feedback_id=f"{task_id}-rank",
                          ranking=pb.Ranking(entries=[pb.Ranking.Entry(candidate_id="c0", rank=2), pb.Ranking.Entry(candidate_id="c1", rank=1),
                                                      pb.Ranking.Entry(candidate_id="c2", rank=2)]), **base),
        pb.FeedbackRecord(feedback_id=f"{task_id}-rate",
                          ratings=pb.Ratings(entries=[pb.Ratings.Entry(candidate_id="c2", aspect="helpfulness", value=6)]), **base),
        pb.FeedbackRecord(feedback_id=f"{task_id}-fix", correction=pb.Correction(candidate_id="c0", corrected_text="A better answer.", note="tone"), **base),
        pb.FeedbackRecord(feedback_id=f"{task_id}-flag", flag=pb.Flag(candidate_id="c1", kind=pb.Flag.KIND_HARMFUL), **base),
    ]


def publish(server, *tasks):
    server.server.store.add_tasks(list(tasks))


def test_submit_every_kind_and_resubmit(server):
    publish(server, make_task(n=3, scales=[("helpfulness", 1, 7)]))
    records = one_of_each_kind()
    with FeedbackClient(server.address) as client:
        results = client.submit(records)
        assert [r.status for r in results] == [ACCEPTED] * 5
        assert [r.feedback_id for r in results] == [r.feedback_id for r in records]
        assert sorted(r.seq for r in results) == [1, 2, 3, 4, 5]
        again = client.submit(records)
        assert [r.status for r in again] == [DUPLICATE] * 5
        assert [r.seq for r in again] == [r.seq for r in results]
        stats = client.stats()
    assert stats.total_records == 5 and stats.watermark == 5
    assert dict(stats.by_kind) == {"preference": 1, "ranking": 1, "ratings": 1, "correction": 1, "flag": 1}
    stored = {s.record.feedback_id: s.record for s in server.server.store.iter_after(0)}
    assert stored == {r.feedback_id: r for r in records}  # every field round-trips


def test_rejected_record_alone_with_its_field(server):
    publish(server, make_task())
    bad = preference("bad")
    bad.preference.candidate_b_id = "nope"
    with FeedbackClient(server.address) as client:
        results = client.submit([preference("ok1"), bad, preference("ok2")])
    assert [r.status for r in results] == [ACCEPTED, REJECTED, ACCEPTED]
    assert results[1].field == "preference.candidate_b_id" and "nope" in results[1].reason
    assert [s.record.feedback_id for s in server.server.store.iter_after(0)] == ["ok1", "ok2"]


def test_stream_acks_every_batch_in_order(server):
    publish(server, *(make_task(f"t{i}", n=3, scales=[("helpfulness", 1, 7)]) for i in range(40)))
    records = [r for i in range(40) for r in one_of_each_kind(f"t{i}")]
    acks = []
    with FeedbackClient(server.address, batch_size=7) as client:
        report = client.stream(records, window=4, on_ack=acks.append)
    assert [a.sequence for a in acks] == list(range(1, 30))  # 200 records in batches of 7
    assert [r.feedback_id for r in report.results] == [r.feedback_id for r in records]
    assert report.count(ACCEPTED) == 200 and report.reconnects == 0
    assert server.server.store.watermark() == 200


def test_stream_resend_after_reconnect_is_deduplicated(server):
    publish(server, make_task())
    with FeedbackClient(server.address) as client:
        first = client.stream([preference(f"r{i}") for i in range(10)])
        again = client.stream([preference(f"r{i}") for i in range(15)])
    assert first.count(ACCEPTED) == 10
    assert again.count(DUPLICATE) == 10 and again.count(ACCEPTED) == 5
    assert server.server.store.stats().total_records == 15


def test_stream_rejects_a_sequence_that_does_not_increase(server):
    publish(server, make_task())
    stub = pb_grpc.FeedbackServiceStub(grpc.insecure_channel(server.address))
    batches = [pb.FeedbackBatch(sequence=5, records=[preference("a")]), pb.FeedbackBatch(sequence=5, records=[preference("b")])]
    acks = []
    with pytest.raises(grpc.RpcError) as err:
        for ack in stub.StreamFeedback(iter(batches)):
            acks.append(ack)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [a.sequence for a in acks] == [5]
    assert [s.record.feedback_id for s in server.server.store.iter_after(0)] == ["a"]


def test_pull_tasks_leases_and_never_repeats(server):
    publish(server, *(make_task(f"t{i}", wanted=2) for i in range(5)))
    with FeedbackClient(server.address) as client:
        first = list(client.pull_tasks("demo", "alice", max_tasks=3, lease_seconds=30))
        rest = list(client.pull_tasks("demo", "alice", max_tasks=10))
        none = list(client.pull_tasks("demo", "alice", max_tasks=10))
        bob = list(client.pull_tasks("demo", "bob", max_tasks=2))
    assert [t.task_id for t in first] == ["t0", "t1", "t2"]
    assert [t.task_id for t in rest] == ["t3", "t4"] and none == []
    assert [t.task_id for t in bob] == ["t0", "t1"]
    task = first[0]
    assert task.prompt == "prompt of t0" and [c.candidate_id for c in task.candidates] == ["c0", "c1"]
    assert task.candidates[0].policy_version == 3
    assert 25 < task.lease_expires_at.ToSeconds() - time.time() <= 30


def test_pull_tasks_follow_sends_new_tasks(store_url):
    from tests.services.feedback.conftest import running_server

    with running_server(store_url, follow_poll_seconds=0.1) as server:
        got = []
        with FeedbackClient(server.address) as client:
            def pull():
                got.extend(client.pull_tasks("demo", "alice", max_tasks=2, follow=True, timeout_s=20))
            reader = threading.Thread(target=pull)
            reader.start()
            deadline = time.monotonic() + 10
            while not server.server.metrics.registry.get_sample_value("hitl_feedback_pull_followers"):
                assert time.monotonic() < deadline, "the pull never started waiting for tasks"
                time.sleep(0.01)
            assert got == []
            publish(server, make_task("late1"), make_task("late2"))
            reader.join(20)
        assert [t.task_id for t in got] == ["late1", "late2"]


def test_pull_tasks_needs_project_and_annotator(server):
    with FeedbackClient(server.address) as client:
        with pytest.raises(FeedbackClientError) as err:
            list(client.pull_tasks("", "alice"))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(FeedbackClientError, match="annotator_id"):
            list(client.pull_tasks("demo", ""))


def test_health_and_graceful_shutdown(store_url):
    from tests.services.feedback.conftest import running_server

    with running_server(store_url) as server:
        channel = grpc.insecure_channel(server.address)
        health = health_pb2_grpc.HealthStub(channel)
        check = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        publish(server, make_task())
        with FeedbackClient(server.address) as client:
            client.submit([preference("before-stop")])
        server.run(server.server._health.enter_graceful_shutdown())
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        channel.close()
    # the store was closed cleanly with the acked record in it
    from services.feedback.store import open_store
    s = open_store(store_url)
    assert [r.record.feedback_id for r in s.iter_after(0)] == ["before-stop"]
    s.close()


def test_metrics_are_served(store_url):
    import urllib.request

    from tests.services.feedback.conftest import running_server

    with running_server(store_url, metrics_port=0) as server:
        publish(server, make_task())
        with FeedbackClient(server.address) as client:
            client.submit([preference("a"), preference("a"), preference("b", task_id="zz")])
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'hitl_feedback_records_total{kind="preference",reason="",result="accepted"} 1.0' in body
    assert 'hitl_feedback_records_total{kind="preference",reason="",result="duplicate"} 1.0' in body
    assert 'hitl_feedback_records_total{kind="preference",reason="task_id",result="rejected"} 1.0' in body
    assert "hitl_feedback_commit_seconds_count" in body


def test_reflection_only_when_asked(store_url):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from tests.services.feedback.conftest import running_server

    def services(server):
        stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(server.address))
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        return {s.name for s in reply.list_services_response.service}

    with running_server(store_url) as server:
        with pytest.raises(grpc.RpcError) as err:
            services(server)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with running_server(store_url, reflection=True) as server:
        assert SERVICE_NAME in services(server)


def test_nul_in_request_ids_is_invalid_argument(server):
    with FeedbackClient(server.address) as client:
        for call in (lambda: list(client.pull_tasks("de\x00mo", "alice")),
                     lambda: list(client.pull_tasks("demo", "al\x00ice")),
                     lambda: client.stats("de\x00mo")):
            with pytest.raises(FeedbackClientError) as err:
                call()
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert client.stats().total_records == 0  # still serving
