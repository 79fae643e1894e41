"""The generation server's HTTP routes as an attacker and as the `openai` client see them:
closed off the loopback address, API keys, bounds on every field, a bad request failing
alone, unknown models refused, and secret files that others can read refused."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import subprocess
import urllib.error
import urllib.request

import pytest

from rlhf.models import LoraConfig, ModelConfig
from services.exposure import (
    ExposureError,
    check_exposure,
    check_secret_file,
    is_loopback,
    key_matches,
    read_api_keys,
    redact_url,
)
from services.generation.config import GenerationConfig, SamplingDefaults

MODEL = ModelConfig(source="tiny")
KEY = "hitl-test-key-0123456789abcdef"
PORT = 8793


# -- without a server -------------------------------------------------------------------


def test_loopback_addresses_are_told_apart():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.10")


def test_off_loopback_a_surface_needs_authentication_and_tls_or_an_explicit_insecure():
    check_exposure("127.0.0.1", authenticated=False, tls=False, insecure=False, field="generation")  # open on loopback
    with pytest.raises(ExposureError, match="generation.api_keys_file"):
        check_exposure("0.0.0.0", authenticated=False, tls=False, insecure=True, field="generation")
    with pytest.raises(ExposureError, match="generation.tls_cert_file"):
        check_exposure("0.0.0.0", authenticated=True, tls=False, insecure=False, field="generation")
    check_exposure("0.0.0.0", authenticated=True, tls=True, insecure=False, field="generation")
    check_exposure("0.0.0.0", authenticated=True, tls=False, insecure=True, field="generation")


def test_the_generation_config_refuses_an_open_server_before_anything_starts():
    with pytest.raises(ValueError, match="api_keys_file"):
        GenerationConfig(http_host="0.0.0.0")
    with pytest.raises(ValueError, match="tls_cert_file"):
        GenerationConfig(http_host="0.0.0.0", api_keys_file="/keys")
    with pytest.raises(ValueError, match="give both or neither"):
        GenerationConfig(tls_cert_file="/c.pem")
    assert GenerationConfig(http_host="0.0.0.0", api_keys_file="/keys", insecure_http=True).insecure_http


def test_secret_files_that_others_can_read_are_refused(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# the labeling team\n{KEY}\n\nsecond-key-0123456789abcdef  # ops\n")
    path.chmod(0o644)
    with pytest.raises(ExposureError, match="readable by others"):
        read_api_keys(path)
    path.chmod(0o640)  # group read is how Kubernetes hands a secret to a pod's fsGroup
    assert read_api_keys(path) == (KEY, "second-key-0123456789abcdef")
    path.write_text("short\n")
    with pytest.raises(ExposureError, match="line 1"):
        read_api_keys(path)
    path.write_text("# nothing\n")
    with pytest.raises(ExposureError, match="no key"):
        read_api_keys(path)
    with pytest.raises(ExposureError, match="does not exist"):
        check_secret_file(tmp_path / "missing", "api_keys_file")


def test_passwords_never_reach_a_printed_url():
    assert redact_url("postgresql://hitl:s3cret@db:5432/hitl?sslmode=require") == "postgresql://hitl:***@db:5432/hitl?sslmode=require"
    assert redact_url("postgresql://hitl@db/hitl") == "postgresql://hitl@db/hitl"
    assert redact_url("sqlite:///data/feedback.db") == "sqlite:///data/feedback.db"
    from services.feedback.store import open_store

    with pytest.raises(ValueError) as err:
        open_store("mysql://root:hunter2@db/x")
    assert "hunter2" not in str(err.value) and "***" in str(err.value)


def test_keys_match_exactly():
    keys = (KEY, "another-key-0123456789abcdef")
    assert key_matches(KEY, keys) and key_matches("another-key-0123456789abcdef", keys)
    assert not key_matches(KEY[:-1], keys) and not key_matches(KEY + "x", keys) and not key_matches(None, keys)


# -- a running server --------------------------------------------------------------------


def _keys_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    return str(path)


def _non_loopback_address() -> str:
    """An address of this machine that is not a loopback one (what a LAN client would reach)."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False).stdout.split()
    addresses = [a for a in out if ":" not in a and not is_loopback(a)]
    if not addresses:
        pytest.fail("this machine has no non-loopback IPv4 address to serve on (hostname -I)")
    return addresses[0]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    """One server on a non-loopback address, with API keys and (explicitly) plain HTTP."""
    from ray import serve

    from services.generation.server import APP_NAME, start_engines, start_generation_server

    serve.shutdown()  # an earlier test's Serve instance may hold other HTTP options
    host = _non_loopback_address()
    cfg = GenerationConfig(replicas=1, num_cpus=0.5, http_host=host, http_port=PORT, api_keys_file=_keys_file(tmp_path_factory),
                           insecure_http=True, max_prompts=4, max_prompt_chars=200, max_tokens_limit=16,
                           max_body_bytes=4096, max_batch_size=8, batch_wait_timeout_s=0.05,
                           sampling=SamplingDefaults(max_new_tokens=4, temperature=0.0))
    engines = start_engines(MODEL, LoraConfig(enabled=False), cfg)
    handle = start_generation_server(MODEL, LoraConfig(enabled=False), cfg, engines=engines)
    yield f"http://{host}:{PORT}", handle
    serve.delete(APP_NAME)
    engines.shutdown()
    serve.shutdown()  # the next test starts Serve with its own HTTP options


def _post(url: str, path: str, body, key: str | None = KEY, raw: bytes | None = None, headers: dict | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data, h)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_no_answer_without_a_valid_key(server):
    url, _ = server
    body = {"prompt": "Hello", "max_tokens": 4}
    for key in (None, "wrong-key-0123456789abcdef", KEY[:-1]):
        status, answer = _post(url, "/v1/completions", body, key=key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key", (key, answer)
    status, _ = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, key=None)
    assert status == 401
    req = urllib.request.Request(url + "/v1/models")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 401


def test_the_openai_client_with_its_key_gets_answers_and_unknown_models_are_404(server):
    import openai

    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    [model] = client.models.list().data
    done = client.completions.create(model=model.id, prompt="Hello", max_tokens=4)
    assert len(done.choices) == 1 and done.usage.completion_tokens <= 4
    chat = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.choices[0].message.role == "assistant"
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        client.completions.create(model="gpt-4o", prompt="Hello", max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="not-a-key-0123456789", max_retries=0).models.list()


@pytest.mark.parametrize(("body", "status", "names"), [
    ({"prompt": ["a"] * 5, "max_tokens": 2}, 400, "prompt"),                  # too many prompts
    ({"prompt": "x" * 201, "max_tokens": 2}, 400, "prompt"),                  # too long a prompt
    ({"prompt": "Hi", "max_tokens": 17}, 400, "max_tokens"),                  # over the server's limit
    ({"prompt": "Hi", "seed": 2**64}, 422, "seed"),                           # outside a 64-bit seed
    ({"prompt": "Hi", "seed": -1}, 422, "seed"),
    ({"messages": [{"role": "user", "content": "y" * 201}]}, 400, "messages"),
])
def test_requests_outside_the_bounds_are_refused_by_name(server, body, status, names):
    url, _ = server
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    got, answer = _post(url, path, body)
    assert got == status, answer
    assert names in json.dumps(answer)


def test_oversized_unsized_and_deeply_nested_bodies_are_refused(server):
    url, _ = server
    status, answer = _post(url, "/v1/completions", None, raw=b'{"prompt": "' + b"x" * 5000 + b'"}')
    assert status == 413 and answer["error"]["code"] == "body_too_large"
    status, answer = _post(url, "/v1/completions", None, raw=b"[" * 1800 + b"]" * 1800)  # within the size limit
    assert status in (400, 422), answer  # never a 500
    # no Content-Length (chunked): refused before the body is read
    with socket.create_connection((url.split("//")[1].split(":")[0], PORT), timeout=30) as sock:
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                      "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n5\r\n{\"a\":\r\n").encode())
        reply = sock.recv(4096).decode(errors="replace")
    assert reply.split()[1] == "411", reply[:200]


def test_a_bad_request_fails_alone_and_the_server_keeps_answering(server):
    """A request the engine cannot run (a seed torch refuses) batched with good ones: only it fails."""
    from services.generation.engine import GenerateRequest

    url, handle = server
    good = [GenerateRequest(prompt=f"Hello {i}", max_new_tokens=3, temperature=0.0) for i in range(3)]
    bad = GenerateRequest(prompt="Hello", max_new_tokens=3, temperature=1.0, seed=2**64)  # only HTTP bounds the seed
    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(lambda r=r: handle.generate.remote(r).result()) for r in [*good, bad]]
        results = []
        for f in futures:
            try:
                results.append(f.result())
            except Exception as err:  # noqa: BLE001 - the bad one's error
                results.append(err)
    assert all(r.completion_tokens > 0 for r in results[:3]), results
    assert isinstance(results[3], Exception) and "overflow" in str(results[3]).lower()
    status, answer = _post(url, "/v1/completions", {"prompt": "Still there?", "max_tokens": 2})
    assert status == 200 and answer["choices"]


def test_a_keys_file_others_can_read_stops_the_server_before_it_starts(ray_session, tmp_path):
    from services.generation.server import start_generation_server

    path = tmp_path / "keys"
    path.write_text(KEY + "\n")
    os.chmod(path, 0o644)
    cfg = GenerationConfig(api_keys_file=str(path), http_port=PORT + 1)
    with pytest.raises(ExposureError, match="readable by others"):
        start_generation_server(MODEL, LoraConfig(enabled=False), cfg)


def test_the_openai_client_streams_the_text_of_the_plain_call(server):
    """`stream: true` on both routes: server-sent events as the tokens are drawn, the same
    text as the call without streaming, the finish reason and (asked for) the usage."""
    import openai

    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == plain.choices[0].message.content
    assert len(pieces) >= 2  # text arrived in pieces, not as one answer at the end
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    done = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
    streamed = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == done.choices[0].text
    with pytest.raises(openai.AuthenticationError):  # streaming is behind the key too
        list(openai.OpenAI(base_url=url + "/v1", api_key="wrong-key-0123456789", max_retries=0).chat.completions.create(
            model=model, messages=messages, stream=True))
