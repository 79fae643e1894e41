"""The batched write path keeps the guarantees of record-by-record writes:
seqs in row order, content hashes, lease and task bookkeeping, and (on
PostgreSQL) a write lock of the store's own."""

import threading
import uuid

import pytest

from hitl.feedback.v1 import feedback_pb2 as pb
from services.feedback.records import content_hash
from services.feedback.store import Status, open_store
from tests.services.feedback.conftest import drop_postgres_schema, make_task, postgres_schema_url, preference


def _rows(store, query):
    conn = store._conn()
    try:
        cur = conn.cursor()
        cur.execute(query)
        return cur.fetchall()
    finally:
        conn.rollback()


def correction(fid, task_id="t1", annotator="alice", text="a better answer"):
    return pb.FeedbackRecord(
        feedback_id=fid,
        project="demo",
        task_id=task_id,
        annotator_id=annotator,
        correction=pb.Correction(candidate_id="c0", corrected_text=text),
    )


def test_seqs_follow_the_order_of_the_batch_and_match_the_stored_rows(store):
    store.add_tasks([make_task("t1"), make_task("t2")])
    records = [preference(f"r{i}", "t1" if i % 2 else "t2", annotator=f"a{i % 3}") for i in range(50)]
    records.insert(10, pb.FeedbackRecord(feedback_id="bad", project="demo"))  # rejected: no task, no judgement
    records.insert(20, records[5])  # an in-batch duplicate
    outcomes = store.write_batch(records)
    accepted = [(r.feedback_id, o.seq) for r, o in zip(records, outcomes) if o.status is Status.ACCEPTED]
    assert len(accepted) == 50
    seqs = [seq for _, seq in accepted]
    assert seqs == sorted(seqs) and len(set(seqs)) == 50
    assert outcomes[10].status is Status.REJECTED
    assert outcomes[20].status is Status.DUPLICATE and outcomes[20].seq == outcomes[5].seq
    stored = [(s.record.feedback_id, s.seq) for s in store.read_after(0, limit=100)]
    assert stored == accepted


def test_stored_content_hash_is_the_records_content_hash(store):
    store.add_tasks([make_task("t1")])
    records = [preference("p1"), correction("c1")]
    store.write_batch(records)
    stored = dict(_rows(store, "SELECT feedback_id, content_hash FROM feedback"))
    assert {fid: bytes(h) for fid, h in stored.items()} == {r.feedback_id: content_hash(r) for r in records}
    # and a resend is recognised by it
    assert [o.status for o in store.write_batch(records)] == [Status.DUPLICATE, Status.DUPLICATE]


def test_one_batch_does_the_lease_and_task_bookkeeping_of_one_record_at_a_time(store):
    store.add_tasks([make_task("t1", wanted=2), make_task("t2", wanted=2), make_task("t3", wanted=3), make_task("t4", wanted=1)])
    store.lease_tasks("demo", "alice", 4, 60)  # alice holds unanswered leases on every task
    store.write_batch([preference("early", "t4", annotator="bob")])  # t4: answered by bob, closed
    batch = [
        preference("a1", "t1", annotator="alice"),  # leased, now answered: t1 1/2
        correction("a2", "t1", annotator="alice"),  # same annotator again: not counted twice
        preference("b1", "t1", annotator="bob"),  # no lease: t1 2/2, closes
        preference("c1", "t2", annotator="carol"),  # t2 1/2, stays open
        preference("b2", "t4", annotator="bob"),  # bob answered t4 before: not counted
        preference("a3", "t4", annotator="alice"),  # t4 2/1, stays closed
    ]
    assert all(o.status is Status.ACCEPTED for o in store.write_batch(batch))
    tasks = {t: (done, is_open) for t, done, is_open in _rows(store, "SELECT task_id, annotations_done, is_open FROM tasks")}
    assert tasks == {"t1": (2, 0), "t2": (1, 1), "t3": (0, 1), "t4": (2, 0)}
    leases = {(t, a): answered for t, a, answered in _rows(store, "SELECT task_id, annotator_id, answered FROM leases")}
    assert leases == {
        ("t1", "alice"): 1,
        ("t2", "alice"): 0,
        ("t3", "alice"): 0,
        ("t4", "alice"): 1,
        ("t1", "bob"): 1,
        ("t4", "bob"): 1,
        ("t2", "carol"): 1,
    }
    assert store.stats().open_tasks == 2


def test_sqlite_seqs_are_right_when_autoincrement_skips_keys(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    try:
        store.add_tasks([make_task("t1")])
        store.write_batch([preference("a"), preference("b")])
        conn = store._conn()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE sqlite_sequence SET seq = seq + 10 WHERE name = 'feedback'")
        conn.commit()
        outcomes = store.write_batch([preference("c"), preference("d"), preference("e")])
        assert [o.seq for o in outcomes] == [13, 14, 15]
        assert [(s.seq, s.record.feedback_id) for s in store.read_after(2)] == [(13, "c"), (14, "d"), (15, "e")]
    finally:
        store.close()


@pytest.mark.postgres
def test_postgres_write_lock_is_the_stores_own():
    schemas = [f"hitl_test_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    stores = []
    try:
        stores = [open_store(postgres_schema_url(s)) for s in schemas]
        first, second = stores
        assert first._d.lock_key != second._d.lock_key
        for s in stores:
            s.add_tasks([make_task("t1")])

        def write_in_thread(store, fid):
            done = threading.Event()
            threading.Thread(target=lambda: (store.write_batch([preference(fid)]), done.set()), daemon=True).start()
            return done

        holder = first._d.connect()  # holds the first store's write lock in an open transaction
        first._d.begin_write(holder)
        try:
            # another store (schema) does not wait for it ...
            assert write_in_thread(second, "x").wait(10), "a write to another schema waited for this store's lock"
            # ... while a writer of the same store does
            same = write_in_thread(first, "y")
            assert not same.wait(0.5)
        finally:
            holder.rollback()
            holder.close()
        assert same.wait(10)
    finally:
        for s in stores:
            s.close()
        for schema in schemas:
            drop_postgres_schema(schema)


@pytest.mark.postgres
def test_postgres_duplicate_lookup_probes_the_unique_index_before_any_analyze():
    schema = f"hitl_test_{uuid.uuid4().hex[:12]}"
    store = open_store(postgres_schema_url(schema))
    try:
        conn = store._conn()
        with conn.cursor() as cur:
            # one project with many records and no statistics yet: the case that used to scan the project
            cur.execute(
                "INSERT INTO feedback (project, feedback_id, kind, task_id, annotator_id, content_hash, record, received_at)"
                " SELECT 'demo', 'id' || g, 'preference', 't1', 'alice', '\\x00'::bytea, repeat('x', 500)::bytea, 0"
                " FROM generate_series(1, 20000) AS g"
            )
            statement, args = store._d.find_feedback_ids("demo", [f"new{i}" for i in range(500)] + ["id7"])
            cur.execute("EXPLAIN " + statement, args)
            plan = "\n".join(row[0] for row in cur.fetchall())
            cur.execute(statement, args)
            found = cur.fetchall()
        conn.rollback()
        assert "Index Cond: ((project = 'demo'::text) AND (feedback_id = k.feedback_id))" in plan, plan
        assert [row[0] for row in found] == ["id7"]
    finally:
        store.close()
        drop_postgres_schema(schema)


def test_the_lease_lookup_probes_an_index_per_pair(store):
    """A group's lease lookup reads the leases of its (task, annotator) pairs only, one probe
    of an index on both columns per pair, not every lease of the group's tasks."""
    store.add_tasks([make_task("t1", wanted=100)])
    for i in range(50):
        store.write_batch([preference(f"r{i}", annotator=f"a{i}")])
    pairs = [("t1", "a7"), ("t1", "nobody")]
    statement, args = store._d.find_leases(pairs)
    conn = store._conn()
    try:
        cur = conn.cursor()
        if store._d.name == "sqlite":
            cur.execute("EXPLAIN QUERY PLAN " + statement, args)
            plan = " ".join(str(row[-1]) for row in cur.fetchall())
            assert "SEARCH l USING" in plan and "SCAN l" not in plan, plan
        else:
            cur.execute("EXPLAIN " + statement, args)
            plan = "\n".join(row[0] for row in cur.fetchall())
            assert "Seq Scan" not in plan, plan
            assert "(task_id = k.task_id)" in plan and "(annotator_id = k.annotator_id)" in plan and "Index Cond" in plan, plan
        cur.execute(statement, args)
        assert [tuple(row[:2]) for row in cur.fetchall()] == [("t1", "a7")]
    finally:
        conn.rollback()


def test_the_writers_task_check_from_prepared_fields_agrees_with_the_full_check(store):
    """The writer checks common records against their task with the fields prepare() read; every
    record it lets through must pass check_against_task, and every one that fails it is rejected
    with the full check's field and reason."""
    from services.feedback.records import check_against_task

    store.add_tasks([make_task("t1", n=3), make_task("t2", project="other")])
    variants = []
    for a, b in (("c0", "c1"), ("c2", "c0"), ("c0", "c9"), ("c9", "c1"), ("x", "y")):
        variants.append(pb.FeedbackRecord(project="demo", task_id="t1", annotator_id="a",
                                          preference=pb.Preference(candidate_a_id=a, candidate_b_id=b, choice=pb.Preference.CHOICE_A)))
    for cid in ("c0", "c2", "c3", "C0"):
        variants.append(pb.FeedbackRecord(project="demo", task_id="t1", annotator_id="a",
                                          correction=pb.Correction(candidate_id=cid, corrected_text="better")))
    for prompt_id in ("", "p-t1", "p-t2", "p-t1 "):
        variants.append(pb.FeedbackRecord(project="demo", task_id="t1", annotator_id="a", prompt_id=prompt_id,
                                          preference=pb.Preference(candidate_a_id="c0", candidate_b_id="c1", choice=pb.Preference.CHOICE_B)))
    variants.append(pb.FeedbackRecord(project="demo", task_id="t2", annotator_id="a",  # another project's task
                                      preference=pb.Preference(candidate_a_id="c0", candidate_b_id="c1", choice=pb.Preference.CHOICE_B)))
    variants.append(pb.FeedbackRecord(project="demo", task_id="t9", annotator_id="a",  # an unknown task
                                      correction=pb.Correction(candidate_id="c0", corrected_text="better")))
    for i, record in enumerate(variants):
        record.feedback_id = f"v{i}"
    tasks = {t: store.get_task(t) for t in ("t1", "t2", "t9")}
    tasks = {t: task for t, task in tasks.items() if task is not None}
    expected = [check_against_task(r, tasks.get(r.task_id)) for r in variants]
    assert sum(e is None for e in expected) >= 5 and sum(e is not None for e in expected) >= 8
    # the group-wide check says "all fit" exactly when the full check passes (for one record)
    from services.feedback.store.base import _fits_tasks

    for record, rejection in zip(variants, expected):
        assert _fits_tasks(store.prepare([record]), tasks) == (rejection is None), record
    assert _fits_tasks(store.prepare([r for r, e in zip(variants, expected) if e is None]), tasks)
    outcomes = store.write_batch(variants)
    for record, outcome, rejection in zip(variants, outcomes, expected):
        if rejection is None:
            assert outcome.status is Status.ACCEPTED, (record, outcome)
        else:
            assert outcome.status is Status.REJECTED and outcome.rejection == rejection, (record, outcome)


def test_lease_bookkeeping_across_groups_and_stores_matches_one_record_at_a_time(store_url):
    """Pairs seen answered are not looked up again; the end state is still that of one record at
    a time, with another store (another process) answering pairs in between, and a failed
    transaction teaching the store nothing."""
    first, second = open_store(store_url), open_store(store_url)
    try:
        first.add_tasks([make_task("t1", wanted=3), make_task("t2", wanted=2)])
        first.lease_tasks("demo", "carol", 2, 60)
        assert first.write_batch([preference("a1", "t1", annotator="alice")])[0].status is Status.ACCEPTED
        assert first.write_batch([preference("a2", "t1", annotator="alice")])[0].status is Status.ACCEPTED  # known pair
        second.write_batch([preference("b1", "t1", annotator="bob"), preference("c1", "t2", annotator="carol")])
        # bob's pair was answered through the other store: this one looks it up and counts it once
        first.write_batch([preference("b2", "t1", annotator="bob"), preference("a3", "t2", annotator="alice")])

        # a transaction that fails after the bookkeeping leaves no trace, in the database or in memory
        conn = first._conn()
        real_commit = conn.commit

        def failing_commit():
            raise RuntimeError("disk full")

        conn.commit = failing_commit
        try:
            with pytest.raises(RuntimeError):
                first.write_batch([preference("c2", "t1", annotator="carol")])
        finally:
            conn.commit = real_commit
            conn.rollback()
        assert first.write_batch([preference("c3", "t1", annotator="carol")])[0].status is Status.ACCEPTED
        first.write_batch([preference("c4", "t1", annotator="carol")])

        tasks = {t: (done, is_open) for t, done, is_open in _rows(first, "SELECT task_id, annotations_done, is_open FROM tasks")}
        assert tasks == {"t1": (3, 0), "t2": (2, 0)}
        leases = {(t, a): answered for t, a, answered in _rows(first, "SELECT task_id, annotator_id, answered FROM leases")}
        assert leases == {("t1", "alice"): 1, ("t1", "bob"): 1, ("t1", "carol"): 1, ("t2", "carol"): 1, ("t2", "alice"): 1}
    finally:
        first.close()
        second.close()


def test_a_group_with_a_resent_record_among_new_ones(store):
    """SQLite inserts a clean-looking group without looking its ids up first; a record stored
    before makes it start over with the lookup. Either way: the resend is a duplicate of its
    stored seq (or rejected when its content differs), the new records are stored once, and
    the seqs of a group are consecutive."""
    store.add_tasks([make_task("t1", wanted=100)])
    first = store.write_batch([preference(f"a{i}", annotator=f"x{i}") for i in range(5)])
    group = [preference(f"b{i}", annotator=f"y{i}") for i in range(150)]
    group.insert(120, preference("a3", annotator="x3"))  # resent, same content
    group.insert(7, preference("a1", annotator="someone else"))  # resent id, other content
    outcomes = store.write_batch(group)
    assert outcomes[7].status is Status.REJECTED and outcomes[7].rejection.field == "feedback_id"
    assert outcomes[121].status is Status.DUPLICATE and outcomes[121].seq == first[3].seq
    new = [o.seq for i, o in enumerate(outcomes) if i not in (7, 121)]
    assert all(o.status is Status.ACCEPTED for i, o in enumerate(outcomes) if i not in (7, 121))
    assert new == list(range(first[-1].seq + 1, first[-1].seq + 151))
    stored = [(s.seq, s.record.feedback_id) for s in store.read_after(0, limit=1000)]
    assert len(stored) == 155 and len({fid for _, fid in stored}) == 155
    # and a group of new records only goes on from there
    more = store.write_batch([preference(f"c{i}", annotator=f"z{i}") for i in range(3)])
    assert [o.seq for o in more] == [new[-1] + 1, new[-1] + 2, new[-1] + 3]
    assert store.stats().by_annotator["y0"] == 1 and store.stats().total_records == 158


def test_records_stored_as_sent_are_recognised_when_resent_in_other_bytes(store):
    """A record stored from its bytes as sent (not canonical: map entries out of order) is a
    duplicate when resent in canonical bytes, in a group or within one; another record under
    its id is rejected; the stored bytes are those sent, and its content hash theirs."""
    import hashlib

    store.add_tasks([make_task("t1")])
    record = preference("m1")
    record.metadata["a"] = "1"
    record.metadata["b"] = "2"
    head = pb.FeedbackRecord()
    head.CopyFrom(record)
    del head.metadata["a"]
    sent = head.SerializeToString() + pb.FeedbackRecord(metadata={"a": "1"}).SerializeToString()
    assert pb.FeedbackRecord.FromString(sent) == record and sent != record.SerializeToString(deterministic=True)
    parsed = pb.FeedbackRecord.FromString(sent)
    (stored,) = store.write_prepared(store.prepare([parsed], [memoryview(sent)]))
    assert stored.status is Status.ACCEPTED
    assert [(bytes(b), bytes(h)) for b, h in _rows(store, "SELECT record, content_hash FROM feedback")] == [
        (sent, hashlib.sha256(sent).digest())
    ]
    again = store.write_batch([record])  # canonical bytes, another hash
    assert again[0].status is Status.DUPLICATE and again[0].seq == stored.seq
    other = preference("m1")
    other.metadata["a"] = "changed"
    assert store.write_batch([other])[0].rejection.field == "feedback_id"
    # within one group: the same record in two byte forms is one record
    twin = preference("m2")
    twin.metadata.update({"a": "1", "b": "2"})
    twin_head = pb.FeedbackRecord()
    twin_head.CopyFrom(twin)
    del twin_head.metadata["a"]
    twin_sent = twin_head.SerializeToString() + pb.FeedbackRecord(metadata={"a": "1"}).SerializeToString()
    outcomes = store.write_prepared(store.prepare([twin, twin], [twin.SerializeToString(deterministic=True), memoryview(twin_sent)]))
    assert [o.status for o in outcomes] == [Status.ACCEPTED, Status.DUPLICATE] and outcomes[1].seq == outcomes[0].seq


def test_the_answered_pairs_kept_in_memory_are_bounded(store, monkeypatch):
    """Past its bound the memory of answered pairs starts over; pairs it forgot are looked up
    again, and the counts stay those of one record at a time."""
    from services.feedback.store import base

    monkeypatch.setattr(base, "_ANSWERED_CACHE_PAIRS", 3)
    store.add_tasks([make_task("t1", wanted=100), make_task("t2", wanted=100)])
    for round_ in range(3):
        for i in range(4):
            store.write_batch([preference(f"r{round_}-{i}", "t1" if i % 2 else "t2", annotator=f"a{i}")])
            assert len(store._answered) <= 3
    tasks = dict(_rows(store, "SELECT task_id, annotations_done FROM tasks"))
    assert tasks == {"t1": 2, "t2": 2}
    assert store.stats().total_records == 12
