"""The store's guarantees, on SQLite and PostgreSQL alike."""

import sqlite3

import pytest

from hitl.feedback.v1 import feedback_pb2 as pb
from services.feedback.store import Status, StoreError, open_store
from services.feedback.store.base import SCHEMA_VERSION
from tests.services.feedback.conftest import make_task, preference


def statuses(outcomes):
    return [o.status for o in outcomes]


def test_idempotent_writes_store_once(store):
    store.add_tasks([make_task()])
    first = store.write_batch([preference("a"), preference("b")])
    assert statuses(first) == [Status.ACCEPTED, Status.ACCEPTED]
    again = store.write_batch([preference("b"), preference("c"), preference("c")])
    assert statuses(again) == [Status.DUPLICATE, Status.ACCEPTED, Status.DUPLICATE]
    assert again[0].seq == first[1].seq  # the duplicate points at the stored copy
    assert again[2].seq == again[1].seq
    assert [s.record.feedback_id for s in store.iter_after(0)] == ["a", "b", "c"]
    assert store.stats().total_records == 3


def test_same_id_different_content_is_rejected(store):
    store.add_tasks([make_task()])
    store.write_batch([preference("a")])
    changed = preference("a", choice=pb.Preference.CHOICE_B)
    [outcome] = store.write_batch([changed])
    assert outcome.status is Status.REJECTED and outcome.rejection.field == "feedback_id"
    [inside] = store.write_batch([preference("z"), preference("z", choice=pb.Preference.CHOICE_B)])[1:]
    assert inside.status is Status.REJECTED
    assert store.read_after(0)[0].record.preference.choice == pb.Preference.CHOICE_A


def test_same_id_in_two_projects_is_two_records(store):
    store.add_tasks([make_task("t1", "p1"), make_task("t2", "p2")])
    out = store.write_batch([preference("same", "t1", "p1"), preference("same", "t2", "p2")])
    assert statuses(out) == [Status.ACCEPTED, Status.ACCEPTED]


def test_bad_record_rejected_alone(store):
    store.add_tasks([make_task()])
    out = store.write_batch([preference("a"), preference("b", task_id="nope"), preference("c")])
    assert statuses(out) == [Status.ACCEPTED, Status.REJECTED, Status.ACCEPTED]
    assert out[1].rejection.field == "task_id"
    assert [s.record.feedback_id for s in store.iter_after(0)] == ["a", "c"]


def test_read_after_watermark_is_ordered_and_paged(store):
    store.add_tasks([make_task()])
    for start in range(0, 30, 10):
        store.write_batch([preference(f"r{i:02d}") for i in range(start, start + 10)])
    assert store.watermark() == 30
    page = store.read_after(12, limit=5)
    assert [s.seq for s in page] == [13, 14, 15, 16, 17]
    assert [s.record.feedback_id for s in page] == ["r12", "r13", "r14", "r15", "r16"]
    assert store.read_after(30) == []
    assert len(list(store.iter_after(0, page=7))) == 30


def test_read_after_filters_projects(store):
    store.add_tasks([make_task("t1", "p1"), make_task("t2", "p2")])
    store.write_batch([preference("a", "t1", "p1"), preference("b", "t2", "p2"), preference("c", "t1", "p1")])
    assert [s.record.feedback_id for s in store.read_after(0, projects=["p1"])] == ["a", "c"]
    assert store.read_after(0, projects=[]) == []


def test_read_after_uses_the_primary_key_index(store_url, store):
    """O(new): the watermark query is an index range scan, not a table scan."""
    if store_url.startswith("sqlite"):
        conn = sqlite3.connect(store_url[len("sqlite:///"):])
        plan = " ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN SELECT seq, record FROM feedback WHERE seq > 5 ORDER BY seq LIMIT 10"))
        conn.close()
        assert "USING INTEGER PRIMARY KEY" in plan, plan
    else:
        conn = store._conn()
        rows = conn.execute("EXPLAIN SELECT seq, record FROM feedback WHERE seq > 5 ORDER BY seq LIMIT 10").fetchall()
        conn.rollback()
        plan = " ".join(r[0] for r in rows)
        assert "Index" in plan and "feedback_pkey" in plan, plan


def test_stats_count_by_kind_project_and_annotator(store):
    store.add_tasks([make_task("t1", "p1"), make_task("t2", "p2", wanted=2)])
    flag = pb.FeedbackRecord(feedback_id="f", project="p2", task_id="t2", annotator_id="bob", flag=pb.Flag(kind=pb.Flag.KIND_SPAM))
    store.write_batch([preference("a", "t1", "p1"), preference("b", "t2", "p2", annotator="bob"), flag])
    s = store.stats()
    assert s.total_records == 3 and s.watermark == 3
    assert s.by_kind == {"preference": 2, "flag": 1}
    assert s.by_project == {"p1": 1, "p2": 2}
    assert s.by_annotator == {"alice": 1, "bob": 2}
    assert s.open_tasks == 1  # t1 answered once (wanted 1); t2 has 1 of 2
    only = store.stats(["p1"])
    assert only.total_records == 1 and only.open_tasks == 0 and only.watermark == 3


def test_tasks_are_published_once(store):
    assert [o.created for o in store.add_tasks([make_task("t1"), make_task("t1")])] == [True, False]
    bad = store.add_tasks([make_task("t2", n=1)])[0]
    assert not bad.created and bad.rejection.field == "candidates"
    assert store.get_task("t1").candidates[1].text == "answer 1 to t1"
    assert store.get_task("t2") is None


def test_leases_never_hand_a_task_to_the_same_annotator_twice(store):
    store.add_tasks([make_task(f"t{i}", wanted=2) for i in range(3)])
    first = store.lease_tasks("demo", "alice", 2, 60)
    assert [l.task.task_id for l in first] == ["t0", "t1"]
    assert [l.task.task_id for l in store.lease_tasks("demo", "alice", 5, 60)] == ["t2"]
    assert store.lease_tasks("demo", "alice", 5, 60) == []
    # bob may take the same tasks: each wants two annotators
    assert [l.task.task_id for l in store.lease_tasks("demo", "bob", 5, 60)] == ["t0", "t1", "t2"]
    assert store.lease_tasks("demo", "carol", 5, 60) == []  # all wanted judgements are leased


def test_expired_leases_free_the_task_for_others(store):
    now = [1_000_000.0]
    store.clock = lambda: now[0]  # time moves when the test says so
    store.add_tasks([make_task("t1")])
    [lease] = store.lease_tasks("demo", "alice", 1, 30)
    assert lease.lease_expires_at == now[0] + 30
    now[0] += 29.9
    assert store.lease_tasks("demo", "bob", 1, 60) == []
    now[0] += 0.2  # past the lease
    assert [l.task.task_id for l in store.lease_tasks("demo", "bob", 1, 60)] == ["t1"]
    assert store.lease_tasks("demo", "alice", 1, 60) == []  # never twice to alice


def test_answering_closes_the_task(store):
    store.add_tasks([make_task("t1"), make_task("t2")])
    store.lease_tasks("demo", "alice", 1, 60)
    store.write_batch([preference("a", "t1", annotator="alice"), preference("b", "t1", annotator="alice")])
    s = store.stats()
    assert s.open_tasks == 1
    # answered tasks are not handed out again, even after the lease would have expired
    assert [l.task.task_id for l in store.lease_tasks("demo", "bob", 5, 60)] == ["t2"]


def test_leases_are_per_project(store):
    store.add_tasks([make_task("t1", "p1"), make_task("t2", "p2")])
    assert [l.task.task_id for l in store.lease_tasks("p2", "alice", 5, 60)] == ["t2"]


def test_data_survives_reopening(store_url):
    s = open_store(store_url)
    s.add_tasks([make_task()])
    s.write_batch([preference("a"), preference("b")])
    s.close()
    s = open_store(store_url)
    try:
        assert s.watermark() == 2
        assert s.schema_version() == SCHEMA_VERSION
        assert s.write_batch([preference("a")])[0].status is Status.DUPLICATE
    finally:
        s.close()


def test_a_newer_schema_is_refused(store_url):
    s = open_store(store_url)
    conn = s._conn()
    conn.cursor().execute("UPDATE hitl_schema SET version = 99")
    conn.commit()
    s.close()
    with pytest.raises(StoreError, match="schema version 99"):
        open_store(store_url)


def test_sqlite_is_durable_by_configuration(tmp_path):
    s = open_store(f"sqlite:///{tmp_path / 'x.db'}")
    conn = s._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    s.close()


@pytest.mark.parametrize("url", ["mysql://x/y", "sqlite://relative.db", "sqlite:///"])
def test_bad_store_urls_are_named(url):
    with pytest.raises(ValueError, match="store url"):
        open_store(url)


def test_a_new_sqlite_store_is_its_owners_alone(tmp_path):
    """People's judgements and gold answers: the file (and SQLite's -wal and -shm beside it)
    is created readable by its owner only."""
    import stat

    path = tmp_path / "feedback.db"
    s = open_store(f"sqlite:///{path}")
    try:
        s.add_tasks([])
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.name.startswith("feedback.db")}
    finally:
        s.close()
    assert modes["feedback.db"] == 0o600 and all(m & 0o077 == 0 for m in modes.values()), modes


def test_open_tasks_counts_and_retirement_of_one_run(store):
    """What a continuous publisher reads and does: a run's open tasks with their live leases,
    how many it published, and retiring stale ones (still accepting what was leased before)."""
    store.add_tasks([make_task("runA-1"), make_task("runA-2"), make_task("runA-3", wanted=2), make_task("runB-1")])
    store.lease_tasks("demo", "alice", 1, 60)  # runA-1
    store.write_batch([preference("a", "runA-2", annotator="bob")])  # answers runA-2
    open_ = {o.task.task_id: o for o in store.open_tasks("demo", "runA-")}
    assert list(open_) == ["runA-1", "runA-3"]
    assert (open_["runA-1"].leased, open_["runA-1"].available) == (1, 0)
    assert (open_["runA-3"].leased, open_["runA-3"].available) == (0, 2)
    assert [o.task.task_id for o in store.open_tasks("demo")] == ["runA-1", "runA-3", "runB-1"]
    assert store.task_count("demo", "runA-") == 3 and store.task_count("demo", "runA_") == 0 and store.task_count("other") == 0
    assert store.retire_tasks(["runA-1", "runA-2", "nope"]) == 1  # runA-2 was closed by its answer
    assert [o.task.task_id for o in store.open_tasks("demo", "runA-")] == ["runA-3"]
    assert [lease.task.task_id for lease in store.lease_tasks("demo", "carol", 5, 60)] == ["runA-3", "runB-1"]
    # alice's judgement of the task she leased before it was retired is stored
    [outcome] = store.write_batch([preference("late", "runA-1", annotator="alice")])
    assert outcome.status is Status.ACCEPTED
    assert store.task_count("demo", "runA-") == 3
    # not counting runA-1's retirement: it got its judgement after all; runA-3 is open
    assert store.task_count("demo", "runA-", include_retired=False) == 3
    store.add_tasks([make_task("runA-4")])
    store.retire_tasks(["runA-4"])
    assert (store.task_count("demo", "runA-"), store.task_count("demo", "runA-", include_retired=False)) == (4, 3)
