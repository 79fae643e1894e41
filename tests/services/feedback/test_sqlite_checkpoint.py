"""SQLite: the WAL is copied into the database file by a thread of the store's own, not by commits."""

import sqlite3
import threading
import time

from services.feedback.store import open_store
from services.feedback.store.sqlite import _BACKSTOP_CHECKPOINT_PAGES
from tests.services.feedback.conftest import make_task, preference


def _records(prefix, n):
    out = []
    for i in range(n):
        r = preference(f"{prefix}-{i}")
        r.metadata["notes"] = "n" * 1000
        out.append(r)
    return out


def _wait_for(predicate, deadline_s=30.0):
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_writes_are_checkpointed_in_the_background_and_survive_reopening(tmp_path):
    path = tmp_path / "feedback.db"
    store = open_store(f"sqlite:///{path}")
    store.add_tasks([make_task()])
    conn = store._conn()._conn
    # commits checkpoint only as a backstop, far beyond SQLite's default of 1000 pages
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == _BACKSTOP_CHECKPOINT_PAGES
    size_before = path.stat().st_size
    for k in range(4):
        assert all(o.status.value == "accepted" for o in store.write_batch(_records(f"b{k}", 250)))
    # ~1 MB went to the WAL; the checkpointer thread copies it into the database file
    assert _wait_for(lambda: path.stat().st_size > size_before + 500_000)
    checkpointer = store._d._checkpointer
    thread = checkpointer._thread
    assert thread is not None and thread.name == "sqlite-checkpoint"
    store.close()
    assert checkpointer._thread is None and not thread.is_alive()
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert check.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 1000
    again = open_store(f"sqlite:///{path}")
    try:
        assert [o.status.value for o in again.write_batch(_records("b0", 3))] == ["duplicate"] * 3
        assert again.stats().total_records == 1000
    finally:
        again.close()


def test_checkpoints_run_while_a_writer_keeps_writing(tmp_path):
    """Concurrent checkpoints and commits: every accepted record is there once, in seq order."""
    store = open_store(f"sqlite:///{tmp_path / 'feedback.db'}")
    store.add_tasks([make_task()])
    seqs = []
    stop = threading.Event()

    def reader():
        reading = open_store(f"sqlite:///{tmp_path / 'feedback.db'}")
        try:
            while not stop.is_set():
                reading.stats()
        finally:
            reading.close()

    t = threading.Thread(target=reader)
    t.start()
    try:
        for k in range(20):
            seqs += [o.seq for o in store.write_batch(_records(f"c{k}", 100))]
    finally:
        stop.set()
        t.join()
    assert seqs == sorted(seqs) and len(set(seqs)) == 2000
    assert [r.seq for r in store.iter_after(0)] == seqs
    store.close()
