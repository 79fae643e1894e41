"""The `hitl feedback` commands, run as a user would run them."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TASKS = [
    {"task_id": "t1", "project": "demo", "prompt_id": "p1", "prompt": "Say hi",
     "candidates": [{"candidate_id": "a", "text": "Hi!", "policy_version": 1}, {"candidate_id": "b", "text": "Hello there.", "policy_version": 1}],
     "annotations_wanted": 2},
    {"task_id": "t2", "project": "demo", "prompt_id": "p2", "prompt": "Count to three",
     "candidates": [{"candidate_id": "a", "text": "1 2 3"}, {"candidate_id": "b", "text": "one"}, {"candidate_id": "c", "text": "1, 2, 3."}]},
]
RECORDS = [
    {"feedback_id": "r1", "project": "demo", "task_id": "t1", "annotator_id": "alice", "preference": {"candidate_a_id": "a", "candidate_b_id": "b", "choice": "CHOICE_B"}},
    {"feedback_id": "r2", "project": "demo", "task_id": "t2", "annotator_id": "alice",
     "ranking": {"entries": [{"candidate_id": "a", "rank": 2}, {"candidate_id": "b", "rank": 3}, {"candidate_id": "c", "rank": 1}]}},
    {"feedback_id": "r3", "project": "demo", "task_id": "t1", "annotator_id": "bob", "preference": {"candidate_a_id": "a", "candidate_b_id": "b", "choice": "CHOICE_TIE"}},
]


def hitl(*args, check=True, **kw):
    proc = subprocess.run([sys.executable, "-m", "hitl.cli", *args], capture_output=True, text=True, timeout=120, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"hitl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def served(tmp_path):
    db = f"sqlite:///{tmp_path / 'f.db'}"
    hitl("feedback", "tasks", "load", str(write_jsonl(tmp_path / "tasks.jsonl", TASKS)), "--store", db)
    ready = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hitl.cli", "feedback", "serve", "--store", db, "--port", "0", "--no-metrics", "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        for _ in range(300):
            if ready.exists() and ready.read_text().strip():
                break
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read())
            time.sleep(0.05)
        yield db, f"127.0.0.1:{ready.read_text().strip()}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


@pytest.mark.slow
def test_load_submit_stats_export(tmp_path, served):
    db, address, proc = served
    out = hitl("feedback", "submit", str(write_jsonl(tmp_path / "r.jsonl", RECORDS)), "--server", address)
    assert json.loads(out.stdout) == {"accepted": 3, "duplicate": 0, "rejected": 0}
    out = hitl("feedback", "submit", str(tmp_path / "r.jsonl"), "--server", address, "--unary")
    assert json.loads(out.stdout) == {"accepted": 0, "duplicate": 3, "rejected": 0}
    stats = json.loads(hitl("feedback", "stats", "--server", address).stdout)
    assert stats["total_records"] == "3" and stats["by_kind"] == {"preference": "2", "ranking": "1"}

    pairs = [json.loads(l) for l in hitl("feedback", "export", "--format", "hh-rlhf", "--store", db).stdout.splitlines()]
    # r1: B over A; r2: c > a > b gives three pairs; r3 is a tie: no pair
    assert len(pairs) == 4
    assert pairs[0] == {"chosen": "\n\nHuman: Say hi\n\nAssistant: Hello there.", "rejected": "\n\nHuman: Say hi\n\nAssistant: Hi!"}
    assert {(p["chosen"].rsplit(": ", 1)[1], p["rejected"].rsplit(": ", 1)[1]) for p in pairs[1:]} == {
        ("1, 2, 3.", "1 2 3"), ("1, 2, 3.", "one"), ("1 2 3", "one")}
    raw = [json.loads(l) for l in hitl("feedback", "export", "--format", "jsonl", "--store", db, "-o", str(tmp_path / "raw.jsonl")).stdout.splitlines() or (tmp_path / "raw.jsonl").read_text().splitlines()]
    assert [r["record"]["feedback_id"] for r in raw] == ["r1", "r2", "r3"]
    assert [r["record"] for r in raw] == RECORDS  # raw export round-trips the submitted JSON

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "shutting down" in proc.stdout.read()


@pytest.mark.slow
def test_submit_reports_rejections_by_line(tmp_path, served):
    _, address, _ = served
    bad = dict(RECORDS[0], feedback_id="bad", task_id="t9")
    out = hitl("feedback", "submit", str(write_jsonl(tmp_path / "r.jsonl", [RECORDS[0], bad])), "--server", address, check=False)
    assert out.returncode == 1
    assert json.loads(out.stdout) == {"accepted": 1, "duplicate": 0, "rejected": 1}
    assert "r.jsonl:2: rejected 'bad': task_id: unknown task 't9'" in out.stderr


def test_unreadable_jsonl_names_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    out = hitl("feedback", "submit", str(path), "--server", "127.0.0.1:1", check=False)
    assert out.returncode == 2 and f"{path}:2: not JSON" in out.stderr
    path.write_text(json.dumps({"feedback_id": "x", "colour": "red"}) + "\n")
    out = hitl("feedback", "submit", str(path), "--server", "127.0.0.1:1", check=False)
    assert out.returncode == 2 and f"{path}:1:" in out.stderr and "colour" in out.stderr


@pytest.mark.slow
def test_serve_config_errors_name_the_field_before_starting(tmp_path):
    out = hitl("feedback", "serve", "--port", "99999", "--store", f"sqlite:///{tmp_path / 'x.db'}", check=False)
    assert out.returncode == 2 and "port:" in out.stderr
    out = hitl("feedback", "serve", "--tls-cert", "c.pem", "--store", f"sqlite:///{tmp_path / 'x.db'}", check=False)
    assert out.returncode == 2 and "tls_cert, tls_key" in out.stderr
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens:\n  - token: x\n")
    tokens.chmod(0o600)
    out = hitl("feedback", "serve", "--tokens", str(tokens), "--store", f"sqlite:///{tmp_path / 'x.db'}", check=False)
    assert out.returncode == 2 and "tokens[0].projects" in out.stderr
    out = hitl("feedback", "serve", "--host", "0.0.0.0", "--store", f"sqlite:///{tmp_path / 'x.db'}", check=False)
    assert out.returncode == 2 and "needs authentication" in out.stderr and "--tokens" in out.stderr  # closed by default
    assert not (tmp_path / "x.db").exists()  # nothing started


@pytest.mark.slow
def test_health_answers_for_a_probe(served):
    _, address, _ = served
    assert hitl("feedback", "health", "--server", address).stdout.strip() == f"{address}: SERVING"
    down = subprocess.run([sys.executable, "-m", "hitl.cli", "feedback", "health", "--server", "127.0.0.1:9", "--timeout", "1"],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "127.0.0.1:9: UNAVAILABLE" in down.stderr
