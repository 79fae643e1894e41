"""Durability: kill -9 the server in the middle of 8 streaming clients.

The server runs as its own process (`python -m hitl.cli feedback serve`).
Eight client processes stream records with `FeedbackClient.stream`, each
writing every ack it receives to a file. Once some thousands of records have
been acked, the server gets SIGKILL while commits and acks are in flight, and
after a short pause it is started again on the same port; the clients resume
from their last ack by resending every unacked batch. Afterwards:

* every record a client saw acked (ACCEPTED or DUPLICATE) is in the store,
  byte for byte, exactly once, and in particular every record acked by the
  killed server survived the kill (an ack sent before the commit would not);
* the store holds no feedback_id twice and exactly the unique records sent
  (a client that dropped unacked batches would leave holes; a server that did
  not deduplicate the resends would hold more);
* the clients really reconnected: the kill hit the streams, not an idle server.

Each client also sends some records of its neighbour (same ids, same content),
so cross-client duplicates are part of the load and "unique records sent" is
less than "records sent".

Both backends run the scenario: it takes about 15 s on SQLite and about the
same on PostgreSQL (a fresh schema of its own).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from hitl.feedback.v1 import feedback_pb2 as pb
from services.feedback.client import Backoff, FeedbackClient
from services.feedback.store import open_store
from tests.services.feedback.conftest import fresh_store_url, make_task

REPO = Path(__file__).resolve().parents[3]

CLIENTS = 8
PER_CLIENT = 2_600  # records each client owns: 20,800 unique in all
OVERLAP = 100  # records of its neighbour each client sends as well
TASKS = 64
BATCH = 100
WINDOW = 16
RATE_PER_CLIENT = 500.0  # records/s a client offers at most, so the kill finds the streams busy
KILL_AFTER_ACKS = 5_000  # acks seen across all clients before the kill
RESTART_PAUSE_S = 1.0
ACCEPTED = pb.RecordResult.STATUS_ACCEPTED
DUPLICATE = pb.RecordResult.STATUS_DUPLICATE


def _fid(owner: int, k: int) -> str:
    return f"dur-{owner}-{k:05d}"


def _record(owner: int, k: int) -> pb.FeedbackRecord:
    """The record with id _fid(owner, k): its content depends on the id alone."""
    choices = (pb.Preference.CHOICE_A, pb.Preference.CHOICE_B, pb.Preference.CHOICE_TIE, pb.Preference.CHOICE_BOTH_BAD)
    return pb.FeedbackRecord(
        feedback_id=_fid(owner, k),
        project="demo",
        task_id=f"dur-t{k % TASKS}",
        annotator_id=f"annotator-{owner}",
        confidence=0.5,
        lead_time_seconds=float(k % 97),
        metadata={"owner": str(owner), "k": str(k)},
        preference=pb.Preference(candidate_a_id="c0", candidate_b_id="c1", choice=choices[k % 4]),
    )


def _planned(client_no: int) -> list[tuple[int, int]]:
    """(owner, k) of every record the client sends, in order: its own, with its
    neighbour's first OVERLAP records in the middle."""
    own = [(client_no, k) for k in range(PER_CLIENT)]
    neighbour = [((client_no + 1) % CLIENTS, k) for k in range(OVERLAP)]
    middle = PER_CLIENT // 2
    return own[:middle] + neighbour + own[middle:]


def _paced(records, rate: float):
    start = time.monotonic()
    for n, record in enumerate(records):
        if n % 20 == 0:
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield record


def _client_main(address: str, client_no: int, workdir: str) -> None:
    """One client process: stream the planned records, log every ack, summarise."""
    work = Path(workdir)
    summary: dict = {"client": client_no}
    try:
        records = [_record(owner, k) for owner, k in _planned(client_no)]
        with open(work / f"acks-{client_no}.txt", "w", encoding="utf-8") as acks:

            def on_ack(ack: pb.BatchAck) -> None:
                acks.write("".join(f"{r.feedback_id} {r.status}\n" for r in ack.results))
                acks.flush()

            backoff = Backoff(initial_s=0.05, max_s=1.0, give_up_after_s=90.0)
            with FeedbackClient(address, batch_size=BATCH, timeout_s=60.0, backoff=backoff) as client:
                report = client.stream(_paced(records, RATE_PER_CLIENT), window=WINDOW, on_ack=on_ack)
        summary.update(
            results=len(report.results),
            reconnects=report.reconnects,
            in_order=[r.feedback_id for r in report.results] == [r.feedback_id for r in records],
            statuses=dict(Counter(int(r.status) for r in report.results)),
        )
    except BaseException as err:  # noqa: BLE001 - reported to the test through the summary
        summary["error"] = f"{type(err).__name__}: {err}"
        (work / f"summary-{client_no}.json").write_text(json.dumps(summary))
        raise
    (work / f"summary-{client_no}.json").write_text(json.dumps(summary))


def _read_acks(path: Path) -> list[tuple[str, int]]:
    """The complete lines of an ack file (a client may be writing the last one)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    out = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            fid, status = line.split()
            out.append((fid, int(status)))
    return out


class ServerProcess:
    """`hitl feedback serve` in a process of its own."""

    command = [sys.executable, "-m", "hitl.cli"]

    def __init__(self, store_url: str, workdir: Path):
        self.store_url = store_url
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout_s: float = 60.0) -> None:
        self.starts += 1
        ready = self.workdir / f"ready-{self.starts}"
        log = open(self.workdir / f"server-{self.starts}.log", "wb")
        cmd = [
            *self.command, "feedback", "serve",
            "--store", self.store_url, "--port", str(self.port), "--no-metrics", "--ready-file", str(ready),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready.exists() and ready.read_text().endswith("\n"):
                self.port = int(ready.read_text())
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout_s}s:\n{self.log()}")

    def start_on_same_port(self, attempts: int = 20) -> None:
        """Restart on the port of the killed server (retrying while it is still being released)."""
        for _ in range(attempts):
            try:
                self.start()
                return
            except RuntimeError:
                if self.proc is not None and self.proc.poll() is None:
                    raise
                time.sleep(0.5)
        raise RuntimeError(f"could not restart on port {self.port}:\n{self.log()}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout_s: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            raise

    def log(self) -> str:
        logs = sorted(self.workdir.glob("server-*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in logs)


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_kill9_mid_stream_loses_and_doubles_nothing(backend: str, tmp_path: Path) -> None:
    with fresh_store_url(backend, tmp_path) as url:
        _run_scenario(url, tmp_path)


def _run_scenario(url: str, work: Path) -> None:
    store = open_store(url)
    try:
        created = store.add_tasks([make_task(f"dur-t{i}", n=2) for i in range(TASKS)])
        assert all(o.created for o in created)
    finally:
        store.close()

    planned = {c: _planned(c) for c in range(CLIENTS)}
    unique = {_fid(owner, k) for plan in planned.values() for owner, k in plan}
    assert len(unique) == CLIENTS * PER_CLIENT >= 20_000
    assert sum(len(p) for p in planned.values()) > len(unique)  # cross-client resends are part of the load

    server = ServerProcess(url, work)
    ctx = multiprocessing.get_context("spawn")
    clients: list = []
    try:
        server.start()
        clients = [ctx.Process(target=_client_main, args=(server.address, c, str(work)), name=f"client-{c}") for c in range(CLIENTS)]
        for p in clients:
            p.start()

        # wait until some thousands of records have been acked, then kill -9
        deadline = time.monotonic() + 120
        while True:
            acked = sum(len(_read_acks(work / f"acks-{c}.txt")) for c in range(CLIENTS))
            if acked >= KILL_AFTER_ACKS:
                break
            failed = [p.name for p in clients if p.exitcode not in (None, 0)]
            assert not failed, f"clients failed before the kill: {failed}\n{_summaries(work)}"
            assert server.alive(), f"server died on its own:\n{server.log()}"
            assert time.monotonic() < deadline, f"only {acked} acks after 120 s\n{server.log()}"
            time.sleep(0.02)
        server.kill9()
        before_kill = {c: _read_acks(work / f"acks-{c}.txt") for c in range(CLIENTS)}
        acked_by_killed = {fid for acks in before_kill.values() for fid, _ in acks}
        sent_total = sum(len(p) for p in planned.values())
        assert len(acked_by_killed) >= KILL_AFTER_ACKS
        assert sum(len(a) for a in before_kill.values()) < sent_total, "every record was acked before the kill: it hit nothing"
        # clients that were well short of their last ack when the server died must reconnect
        still_streaming = [c for c in range(CLIENTS) if len(before_kill[c]) < len(planned[c]) - BATCH]
        assert still_streaming, "every client had (nearly) finished before the kill"

        time.sleep(RESTART_PAUSE_S)
        server.start_on_same_port()

        for p in clients:
            p.join(180)
        stuck = [p.name for p in clients if p.exitcode is None]
        assert not stuck, f"clients did not finish: {stuck}\n{server.log()}"
        summaries = _summaries(work)
        failed = {c: s for c, s in summaries.items() if "error" in s or clients[c].exitcode != 0}
        assert not failed, f"clients failed: {failed}\n{server.log()}"

        with FeedbackClient(server.address) as client:
            stats = client.stats()
        assert server.terminate() == 0, server.log()
    finally:
        for p in clients:
            if p.is_alive():
                p.kill()
            p.join(10)
        if server.alive():
            server.proc.kill()
            server.proc.wait(30)

    # -- what the clients saw ------------------------------------------------
    for c, s in summaries.items():
        assert s["results"] == len(planned[c]), f"client {c}: {s}"
        assert s["in_order"], f"client {c}: results out of input order"
        assert set(s["statuses"]) <= {str(ACCEPTED), str(DUPLICATE)}, f"client {c}: {s}"
    assert sum(s["reconnects"] for s in summaries.values()) >= 1, "no client reconnected: the kill hit no stream"
    assert all(summaries[c]["reconnects"] >= 1 for c in still_streaming), summaries

    acks = {c: _read_acks(work / f"acks-{c}.txt") for c in range(CLIENTS)}
    for c in range(CLIENTS):
        seen = [fid for fid, _ in acks[c]]
        assert len(seen) == len(set(seen)) == len(planned[c]), f"client {c}: {len(seen)} acks for {len(planned[c])} records"
        assert set(seen) == {_fid(o, k) for o, k in planned[c]}
        assert {status for _, status in acks[c]} <= {ACCEPTED, DUPLICATE}
    acked = {fid for a in acks.values() for fid, _ in a}

    # -- what the store holds ------------------------------------------------
    store = open_store(url)
    try:
        stored = list(store.iter_after(0))
        watermark = store.watermark()
    finally:
        store.close()
    counts = Counter(s.record.feedback_id for s in stored)
    doubled = [fid for fid, n in counts.items() if n > 1]
    assert not doubled, f"stored more than once: {doubled[:10]}"
    missing_killed = acked_by_killed - counts.keys()
    assert not missing_killed, f"{len(missing_killed)} records acked before the kill are not stored: {sorted(missing_killed)[:10]}"
    missing = acked - counts.keys()
    assert not missing, f"{len(missing)} acked records are not stored: {sorted(missing)[:10]}"
    assert counts.keys() == unique
    assert len(stored) == len(unique) == stats.total_records
    assert watermark == stats.watermark == max(s.seq for s in stored)
    for s in stored:
        owner, k = s.record.feedback_id.split("-")[1:]
        assert s.record == _record(int(owner), int(k)), f"stored content differs for {s.record.feedback_id}"


def _summaries(work: Path) -> dict[int, dict]:
    out = {}
    for c in range(CLIENTS):
        path = work / f"summary-{c}.json"
        out[c] = json.loads(path.read_text()) if path.exists() else {"error": "no summary written"}
    return out
