"""Tokens, project scopes, TLS and mutual TLS; every refused call stores nothing."""

import hashlib
import urllib.error
import urllib.request

import grpc
import pytest

from hitl.feedback.v1 import feedback_pb2 as pb
from services.feedback.auth import TokenAuth, TokensFileError
from services.feedback.client import Backoff, FeedbackClient, FeedbackClientError
from tests.services.feedback.certs import make_tls_files
from tests.services.feedback.conftest import make_task, preference, running_server

TOKENS = """
tokens:
  - name: tool-a
    token: alpha-secret
    projects: [alpha]
    annotators: ["*"]
  - name: ops
    sha256: {ops_digest}
    projects: ["*"]
    annotators: ["*"]
  - name: alice
    token: alice-secret
    projects: [alpha]
    max_leases: 2
    max_streams: 1
"""


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(TOKENS.format(ops_digest=hashlib.sha256(b"ops-secret").hexdigest()))
    path.chmod(0o600)
    return path


@pytest.fixture
def authed(store_url, tokens_file):
    with running_server(store_url, tokens_file=tokens_file) as srv:
        srv.server.store.add_tasks([make_task("ta", "alpha"), make_task("tb", "beta")])
        yield srv


def stored(server):
    return server.server.store.stats().total_records


def no_retry_client(address, token=None, **kw):
    return FeedbackClient(address, token, backoff=Backoff(give_up_after_s=0), **kw)


def test_no_token_is_unauthenticated_and_stores_nothing(authed):
    with no_retry_client(authed.address) as client:
        for call in (lambda: client.submit([preference("x", "ta", "alpha")]),
                     lambda: client.stream([preference("x", "ta", "alpha")]),
                     lambda: client.stats(),
                     lambda: list(client.pull_tasks("alpha", "me"))):
            with pytest.raises(FeedbackClientError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with no_retry_client(authed.address, "wrong") as client:
        with pytest.raises(FeedbackClientError) as err:
            client.submit([preference("x", "ta", "alpha")])
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert stored(authed) == 0


def test_out_of_scope_project_is_denied_and_stores_nothing(authed):
    mixed = [preference("in", "ta", "alpha"), preference("out", "tb", "beta")]
    with no_retry_client(authed.address, "alpha-secret") as client:
        with pytest.raises(FeedbackClientError) as err:
            client.submit(mixed)
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(FeedbackClientError) as err:
            client.stream(mixed)
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(FeedbackClientError) as err:
            list(client.pull_tasks("beta", "me"))
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(FeedbackClientError) as err:
            client.stats("beta")
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert stored(authed) == 0
        # in scope: fine
        assert [t.task_id for t in client.pull_tasks("alpha", "me")] == ["ta"]
        assert client.submit([preference("in", "ta", "alpha")])[0].status == pb.RecordResult.STATUS_ACCEPTED
        assert dict(client.stats().by_project) == {"alpha": 1}


def test_wildcard_token_by_digest_sees_every_project(authed):
    with no_retry_client(authed.address, "ops-secret") as client:
        client.submit([preference("b1", "tb", "beta")])
        with no_retry_client(authed.address, "alpha-secret") as alpha:
            alpha.submit([preference("a1", "ta", "alpha")])
        assert dict(client.stats().by_project) == {"alpha": 1, "beta": 1}


@pytest.mark.parametrize(
    "text, message",
    [
        ("tokens: []", "non-empty list"),
        ("tokens:\n  - token: x\n", "projects"),
        ("tokens:\n  - token: x\n    sha256: ab\n    projects: [p]\n", "exactly one"),
        ("tokens:\n  - sha256: nothex\n    projects: [p]\n", "64 hex"),
        ("tokens:\n  - token: x\n    projects: [p]\n    role: admin\n", "unknown field"),
        ("tokens:\n  - token: x\n    projects: [p]\n", r"tokens\[0\]\.annotators: a token without a name"),
        ("tokens:\n  - token: x\n    projects: [p]\n    annotators: []\n", r"tokens\[0\]\.annotators: expected a non-empty list"),
        ("tokens:\n  - name: a\n    token: x\n    projects: [p]\n    max_leases: 0\n", r"tokens\[0\]\.max_leases"),
        ("tokens:\n  - name: a\n    token: x\n    projects: [p]\n    require_lease: maybe\n", r"tokens\[0\]\.require_lease"),
    ],
)
def test_bad_tokens_files_name_the_entry(tmp_path, text, message):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(TokensFileError, match=message):
        TokenAuth.from_file(path)


def test_a_tokens_file_others_can_read_is_refused(tokens_file):
    tokens_file.chmod(0o644)
    with pytest.raises(TokensFileError, match="readable by others"):
        TokenAuth.from_file(tokens_file)
    tokens_file.chmod(0o640)  # its group may (how Kubernetes gives a secret to the pod's fsGroup)
    assert TokenAuth.from_file(tokens_file) is not None


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def test_tls_serves_clients_that_trust_its_ca(store_url, tls):
    with running_server(store_url, tls_cert=tls.server.cert, tls_key=tls.server.key) as srv:
        srv.server.store.add_tasks([make_task()])
        with FeedbackClient(srv.address, root_certificates=tls.ca.cert) as client:
            assert client.submit([preference("x")])[0].status == pb.RecordResult.STATUS_ACCEPTED
        # a client that does not trust the CA, or speaks plaintext, gets nowhere and stores nothing
        with no_retry_client(srv.address, root_certificates=tls.rogue_ca.cert) as client:
            with pytest.raises(FeedbackClientError) as err:
                client.submit([preference("y")])
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        with no_retry_client(srv.address) as client:
            with pytest.raises(FeedbackClientError):
                client.submit([preference("z")])
        assert stored(srv) == 1


def test_mutual_tls_requires_a_client_certificate_from_the_ca(store_url, tls):
    with running_server(store_url, tls_cert=tls.server.cert, tls_key=tls.server.key, tls_client_ca=tls.ca.cert) as srv:
        srv.server.store.add_tasks([make_task()])
        with FeedbackClient(srv.address, root_certificates=tls.ca.cert, client_cert=tls.client.cert, client_key=tls.client.key) as client:
            assert client.submit([preference("ok")])[0].status == pb.RecordResult.STATUS_ACCEPTED
        for extra in ({}, {"client_cert": tls.rogue_client.cert, "client_key": tls.rogue_client.key}):
            with no_retry_client(srv.address, root_certificates=tls.ca.cert, **extra) as client:
                with pytest.raises(FeedbackClientError) as err:
                    client.submit([preference("no")])
                assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert stored(srv) == 1


def test_tls_config_errors_name_the_field(tmp_path):
    from services.feedback.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="tls_cert, tls_key"):
        build_config({"tls_cert": tmp_path / "c.pem"})
    with pytest.raises(ConfigError, match="tls_client_ca"):
        build_config({"tls_client_ca": tmp_path / "ca.pem"})
    with pytest.raises(ConfigError, match="port"):
        build_config({"port": 70000})
    with pytest.raises(ConfigError, match="unknown_key"):
        build_config({"unknown_key": 1})


def test_off_loopback_the_service_will_not_start_open_and_answers_no_one_without_a_token(store_url, tokens_file):
    """Closed by default: on a non-loopback address, no tokens (or client certificates) means no
    start, no TLS means no start unless `insecure` says so; and then a call without a token is
    refused like on loopback."""
    import subprocess

    from services.feedback.config import FeedbackServiceConfig

    addresses = [a for a in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split() if ":" not in a]
    if not addresses:
        pytest.fail("this machine has no non-loopback IPv4 address to serve on (hostname -I)")
    host = addresses[0]
    with pytest.raises(ValueError, match="needs authentication: set tokens_file"):
        FeedbackServiceConfig(store=store_url, host=host)
    with pytest.raises(ValueError, match="needs TLS"):
        FeedbackServiceConfig(store=store_url, host=host, tokens_file=tokens_file)
    with pytest.raises(ValueError, match="metrics_port: .* needs authentication: set metrics_keys_file"):
        FeedbackServiceConfig(store=store_url, host=host, tokens_file=tokens_file, insecure=True, metrics_port=0)
    keys = tokens_file.parent / "metrics-keys"
    keys.write_text("metrics-key-0123456789abcdef\n")
    keys.chmod(0o600)
    with running_server(store_url, host=host, tokens_file=tokens_file, insecure=True, metrics_port=0, metrics_keys_file=keys) as srv:
        srv.server.store.add_tasks([make_task("ta", "alpha")])
        with no_retry_client(f"{host}:{srv.server.port}") as client:
            for call in (lambda: client.submit([preference("x", "ta", "alpha")]), lambda: client.stream([preference("x", "ta", "alpha")]),
                         lambda: client.stats(), lambda: list(client.pull_tasks("alpha", "me"))):
                with pytest.raises(FeedbackClientError) as err:
                    call()
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert stored(srv) == 0
        with no_retry_client(f"{host}:{srv.server.port}", "ops-secret") as client:
            assert client.stats() is not None
        metrics = f"http://{host}:{srv.server.metrics_port}/metrics"
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789abcdef"}):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(urllib.request.Request(metrics, headers=headers), timeout=10)
            assert err.value.code == 401
        body = urllib.request.urlopen(urllib.request.Request(metrics, headers={"Authorization": "Bearer metrics-key-0123456789abcdef"}), timeout=10).read()
        assert b"hitl_feedback_store_up 1.0" in body


def test_a_person_token_acts_only_as_its_annotator(authed):
    """Identity comes from the credential: alice's token cannot write, stream or lease as bob."""
    as_bob = [preference("b1", "ta", "alpha", annotator="bob")]
    with no_retry_client(authed.address, "alice-secret") as client:
        for call in (lambda: client.submit(as_bob), lambda: client.stream(as_bob), lambda: list(client.pull_tasks("alpha", "bob"))):
            with pytest.raises(FeedbackClientError) as err:
                call()
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and "'bob'" in str(err.value)
        assert stored(authed) == 0
        assert [t.task_id for t in client.pull_tasks("alpha", "alice")] == ["ta"]
        assert client.submit([preference("a1", "ta", "alpha", annotator="alice")])[0].status == pb.RecordResult.STATUS_ACCEPTED
    assert [r.record.annotator_id for r in authed.server.store.iter_after(0)] == ["alice"]


def test_a_person_answers_only_tasks_handed_to_them(authed):
    """A named annotator's judgement needs the task's lease; a tool relaying anyone ("*") does not lease."""
    authed.server.store.add_tasks([make_task("tc", "alpha", wanted=2)])
    with no_retry_client(authed.address, "alice-secret") as client:
        unleased = client.submit([preference("u1", "ta", "alpha", annotator="alice")])
        assert unleased[0].status == pb.RecordResult.STATUS_REJECTED and unleased[0].field == "task_id"
        assert "never handed task 'ta'" in unleased[0].reason
        leased = [t.task_id for t in client.pull_tasks("alpha", "alice")]
        assert leased == ["ta"]
        mixed = client.stream([preference("s1", "ta", "alpha", annotator="alice"), preference("s2", "tc", "alpha", annotator="alice")])
        assert [r.status for r in mixed.results] == [pb.RecordResult.STATUS_ACCEPTED, pb.RecordResult.STATUS_REJECTED]
        edit = client.submit([preference("s3", "ta", "alpha", annotator="alice", choice=pb.Preference.CHOICE_B)])
        assert edit[0].status == pb.RecordResult.STATUS_ACCEPTED  # a second answer to a task handed over: an edit
    with no_retry_client(authed.address, "alpha-secret") as tool:
        assert tool.submit([preference("w1", "tc", "alpha", annotator="dora")])[0].status == pb.RecordResult.STATUS_ACCEPTED
    assert [r.record.feedback_id for r in authed.server.store.iter_after(0)] == ["s1", "s3", "w1"]


def test_lease_quota_per_token(authed):
    authed.server.store.add_tasks([make_task(f"q{i}", "alpha", wanted=3) for i in range(5)])
    with no_retry_client(authed.address, "alice-secret") as client:
        got = [t.task_id for t in client.pull_tasks("alpha", "alice", max_tasks=10)]
        assert len(got) == 2  # max_leases: 2
        with pytest.raises(FeedbackClientError) as err:
            list(client.pull_tasks("alpha", "alice", max_tasks=1))
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_leases" in str(err.value)
    with no_retry_client(authed.address, "alpha-secret") as tool:  # another token's quota is its own
        assert len(list(tool.pull_tasks("alpha", "carol", max_tasks=3))) == 3


def test_stream_budget_per_token(authed):
    import threading
    import time

    with no_retry_client(authed.address, "alice-secret") as client:
        opened = threading.Event()
        follower = client._stub.PullTasks(pb.PullTasksRequest(project="alpha", annotator_id="alice", max_tasks=50, follow=True),
                                          metadata=client._metadata, timeout=30)
        def follow() -> None:
            opened.set()
            try:
                list(follower)
            except grpc.RpcError:
                pass  # cancelled below

        first = threading.Thread(target=follow, daemon=True)
        first.start()
        opened.wait(5)
        deadline = time.monotonic() + 10
        while authed.server._servicer._streams.get("alice", 0) < 1:  # the follow stream is open on the server
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(FeedbackClientError) as err:
            client.stream([preference("s1", "ta", "alpha", annotator="alice")])
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams" in str(err.value)
        follower.cancel()
        first.join(10)
        deadline = time.monotonic() + 10
        while authed.server._servicer._streams.get("alice", 0):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.stream([preference("s1", "ta", "alpha", annotator="alice")]).count(pb.RecordResult.STATUS_ACCEPTED) == 1


def test_an_unauthenticated_call_is_refused_before_its_request_is_parsed(authed):
    """Bytes that do not parse would be INVALID_ARGUMENT for a known token; without one the
    answer is UNAUTHENTICATED: the interceptor refused the call before parsing."""
    garbage = b"\x0a\xff\xff" + b"z" * (2 << 20)
    with grpc.insecure_channel(authed.address) as channel:
        call = channel.unary_unary("/hitl.feedback.v1.FeedbackService/SubmitFeedback", request_serializer=lambda b: b,
                                   response_deserializer=pb.SubmitFeedbackResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            call(garbage, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            call(garbage, timeout=10, metadata=(("authorization", "Bearer alpha-secret"),))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
