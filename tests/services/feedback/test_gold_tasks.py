"""Gold tasks in the store (both backends), the migration that added them, k distinct
annotators per task over real gRPC, and gold answers that never leave through PullTasks."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import pytest

from hitl.feedback.v1 import feedback_pb2 as pb
from services.feedback.client import FeedbackClient
from services.feedback.records import GoldAnswer
from services.feedback.store import Status, open_store
from services.feedback.store.base import SCHEMA_VERSION, _migrations, _task_blob
from services.feedback.store.postgres import PostgresDialect, split_schema
from services.feedback.store.sqlite import SqliteDialect
from tests.services.feedback.conftest import fresh_store_url, make_task, preference
from tests.services.feedback.test_cli import hitl, write_jsonl


def gold_task(task_id: str, better: str | None = "c1", **kw):
    return replace(make_task(task_id, **kw), gold=GoldAnswer(better))


def test_gold_answers_are_stored_and_read_back(store):
    outcomes = store.add_tasks([gold_task("g1", "c1"), gold_task("g2", None), make_task("t1"), gold_task("o1", "c0", project="other")])
    assert [o.created for o in outcomes] == [True] * 4
    assert store.get_task("g1").gold == GoldAnswer("c1")
    assert store.get_task("g2").gold == GoldAnswer(None) and store.get_task("g2").gold.is_tie
    assert store.get_task("t1").gold is None
    assert store.gold_answers(["demo"]) == {"g1": GoldAnswer("c1"), "g2": GoldAnswer(None)}
    assert store.gold_answers() == {"g1": GoldAnswer("c1"), "g2": GoldAnswer(None), "o1": GoldAnswer("c0")}
    assert store.gold_answers([]) == {}
    assert [(t.task_id, t.gold) for t in store.iter_tasks(["demo"])] == [("g1", GoldAnswer("c1")), ("g2", GoldAnswer(None)), ("t1", None)]
    # publishing an existing id again changes nothing, gold included
    assert not store.add_tasks([gold_task("t1", "c0")])[0].created
    assert store.get_task("t1").gold is None and "t1" not in store.gold_answers()
    # what annotators are handed carries no gold
    assert [(l.task.task_id, l.task.gold) for l in store.lease_tasks("demo", "alice", 5, 60)] == [("g1", None), ("g2", None), ("t1", None)]


def test_bad_gold_is_rejected_naming_the_field(store):
    three = replace(make_task("g3", n=3), gold=GoldAnswer("c0"))
    unknown = gold_task("g4", "c9")
    hinted = replace(gold_task("g5", "c1"), metadata={"is_gold": "yes"})
    ok_meta = replace(make_task("t6"), metadata={"is_gold": "no gold here"})  # a task without gold may say what it likes
    outcomes = store.add_tasks([three, unknown, hinted, ok_meta])
    assert [(o.rejection.field if o.rejection else None) for o in outcomes] == ["gold", "gold.better", "metadata[is_gold]", None]
    assert "exactly 2 candidates" in outcomes[0].rejection.reason and "'c9'" in outcomes[1].rejection.reason
    assert store.gold_answers() == {} and store.get_task("g4") is None


def _version_1_store(url: str) -> None:
    """A store as hitl with schema version 1 left it: its DDL, a task and a record."""
    if url.startswith("sqlite"):
        dialect = SqliteDialect(Path(url[len("sqlite:///"):]))
    else:
        dialect = PostgresDialect(*split_schema(url))
    conn = dialect.connect()
    cur = conn.cursor()
    dialect.begin_write(conn)
    cur.execute("CREATE TABLE hitl_schema (version INTEGER NOT NULL)")
    for statement in _migrations(dialect)[1]:
        cur.execute(statement)
    cur.execute(dialect.sql("INSERT INTO hitl_schema (version) VALUES (?)"), (1,))
    task = make_task("old", wanted=2)
    cur.execute(
        dialect.sql("INSERT INTO tasks (task_id, project, prompt_id, task, annotations_wanted, annotations_done, is_open,"
                    " created_at, created_order) VALUES (?, ?, ?, ?, ?, 0, 1, ?, 1)"),
        (task.task_id, task.project, task.prompt_id, _task_blob(task), task.annotations_wanted, time.time()),
    )
    conn.commit()
    conn.close()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_version_1_store_migrates_and_keeps_its_data(backend, tmp_path):
    assert SCHEMA_VERSION >= 2  # gold_answers came with version 2
    with fresh_store_url(backend, tmp_path) as url:
        _version_1_store(url)
        store = open_store(url)
        try:
            assert store.schema_version() == SCHEMA_VERSION
            old = store.get_task("old")
            assert old.gold is None and old.annotations_wanted == 2 and old.candidates[1].text == "answer 1 to old"
            assert store.write_batch([preference("r1", "old")])[0].status is Status.ACCEPTED
            assert store.add_tasks([gold_task("g1", None)])[0].created
            assert store.gold_answers() == {"g1": GoldAnswer(None)}
        finally:
            store.close()
        again = open_store(url)  # a migrated store opens as it is
        try:
            assert again.schema_version() == SCHEMA_VERSION and again.get_task("g1").gold == GoldAnswer(None)
            assert again.write_batch([preference("r1", "old")])[0].status is Status.DUPLICATE
        finally:
            again.close()


def test_pull_tasks_never_sends_the_gold_answer(server):
    task = replace(gold_task("g1", "c1", wanted=3), metadata={"source": "ops"})
    server.server.store.add_tasks([task, make_task("t1", wanted=3)])
    assert not any("gold" in f.name for f in pb.LabelingTask.DESCRIPTOR.fields)  # the wire has no place for it
    without_gold = replace(task, gold=None).to_proto()
    with FeedbackClient(server.address) as client:
        for annotator in ("a1", "a2", "a3"):
            pulled = {t.task_id: t for t in client.pull_tasks("demo", annotator, max_tasks=5)}
            assert set(pulled) == {"g1", "t1"}
            sent = pulled["g1"]
            assert sent.lease_expires_at.seconds > 0
            sent.ClearField("lease_expires_at")
            # byte for byte what the same task without gold would be: nothing names or orders by the answer
            assert sent.SerializeToString(deterministic=True) == without_gold.SerializeToString(deterministic=True)
            assert [c.candidate_id for c in sent.candidates] == ["c0", "c1"]
            assert dict(sent.metadata) == {"source": "ops"}
        assert list(client.pull_tasks("demo", "a4", max_tasks=5)) == []  # k = 3 leases are out


@pytest.mark.slow
def test_each_task_goes_to_k_distinct_annotators_over_grpc(server):
    k = 3
    server.server.store.add_tasks([make_task(f"t{i}", wanted=k) for i in range(6)])
    handed: Counter = Counter()
    judged: dict[str, set[str]] = defaultdict(set)
    annotators = [f"a{i}" for i in range(5)]
    with FeedbackClient(server.address) as client:
        # a0 leases two tasks for one second and never answers: the slots come free again
        skipped = [0.0]
        server.server.store.clock = lambda: time.time() + skipped[0]  # time the test can move on
        for task in client.pull_tasks("demo", "a0", max_tasks=2, lease_seconds=1):
            handed[(task.task_id, "a0")] += 1
        skipped[0] = 1.5  # past a0's leases
        for _ in range(4):  # everyone pulls a few at a time, in turns, and answers what they pulled
            for who in annotators[1:]:
                pulled = list(client.pull_tasks("demo", who, max_tasks=2, lease_seconds=60))
                for task in pulled:
                    handed[(task.task_id, who)] += 1
                results = client.submit([preference(f"{who}:{t.task_id}", t.task_id, annotator=who) for t in pulled])
                assert all(r.status == pb.RecordResult.STATUS_ACCEPTED for r in results)
                for task in pulled:
                    judged[task.task_id].add(who)
        # a0 comes back: its two expired tasks are never handed to it again, and the rest is closed
        assert list(client.pull_tasks("demo", "a0", max_tasks=10)) == []
    assert max(handed.values()) == 1  # never twice to one annotator
    assert {task_id: len(who) for task_id, who in judged.items()} == {f"t{i}": k for i in range(6)}
    assert all("a0" not in who for who in judged.values())
    assert server.server.store.stats(["demo"]).open_tasks == 0


@pytest.mark.slow
def test_tasks_load_reads_gold_and_export_writes_it_back(tmp_path):
    db = f"sqlite:///{tmp_path / 'f.db'}"
    candidates = [{"candidate_id": "a", "text": "Hi!"}, {"candidate_id": "b", "text": "Hello there."}]
    rows = [
        {"task_id": "g1", "project": "demo", "prompt_id": "p1", "prompt": "Say hi", "candidates": candidates, "gold": {"better": "b"}},
        {"task_id": "g2", "project": "demo", "prompt_id": "p2", "prompt": "Say hi again", "candidates": candidates, "gold": {"tie": True}},
        {"task_id": "t3", "project": "demo", "prompt_id": "p3", "prompt": "Say bye", "candidates": candidates, "annotations_wanted": 2},
    ]
    out = hitl("feedback", "tasks", "load", str(write_jsonl(tmp_path / "tasks.jsonl", rows)), "--store", db)
    assert json.loads(out.stdout) == {"created": 3, "existing": 0, "rejected": 0}
    store = open_store(db)
    try:
        assert store.gold_answers() == {"g1": GoldAnswer("b"), "g2": GoldAnswer(None)}
    finally:
        store.close()
    exported = [json.loads(line) for line in hitl("feedback", "export", "--format", "tasks-jsonl", "--store", db).stdout.splitlines()]
    assert [e.get("gold") for e in exported] == [{"better": "b"}, {"tie": True}, None]

    bad = dict(rows[0], task_id="g9", gold={"better": "z"})
    out = hitl("feedback", "tasks", "load", str(write_jsonl(tmp_path / "bad.jsonl", [bad])), "--store", db, check=False)
    assert out.returncode == 1 and "gold.better: unknown candidate 'z'" in out.stderr
    malformed = dict(rows[0], task_id="g10", gold="b")
    out = hitl("feedback", "tasks", "load", str(write_jsonl(tmp_path / "malformed.jsonl", [malformed])), "--store", db, check=False)
    assert out.returncode == 2 and f"{tmp_path / 'malformed.jsonl'}:1: gold must be" in out.stderr
