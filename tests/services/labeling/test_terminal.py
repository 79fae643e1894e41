"""`hitl label` driven as a person would drive it: the real program in a
pseudo-terminal, single keys written to it, against a real gRPC feedback server
on a SQLite store; what counts is what ends up in the store."""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from hitl.feedback.v1 import feedback_pb2 as pb
from services.labeling.journal import Journal
from services.labeling.terminal import (
    competition_ranks,
    parse_ranking,
    sanitize,
    text_width,
    wrap,
)
from tests.services.feedback.conftest import make_task
from tests.services.labeling.conftest import (
    by_task,
    publish,
    start_server,
    stored,
    wait_stored,
)

ROOT = Path(__file__).resolve().parents[3]
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")


class Terminal:
    """A program running in a pseudo-terminal of a fixed size."""

    def __init__(self, args: list[str], env: dict[str, str], rows: int = 40, cols: int = 120):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, start_new_session=True, close_fds=True)
        os.close(slave)
        self.master = master
        self._raw = b""
        self._lock = threading.Lock()
        self.pos = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self._raw += data

    def text(self) -> str:
        with self._lock:
            raw = self._raw
        return _ANSI.sub("", raw.decode("utf-8", errors="replace"))

    def expect(self, pattern: str, timeout: float = 20.0) -> re.Match:
        """Wait for `pattern` in the output after the last match; move past it."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            m = re.compile(pattern).search(text, self.pos)
            if m:
                self.pos = m.end()
                return m
            if time.monotonic() > deadline or (self.proc.poll() is not None and not self._reader.is_alive()):
                raise AssertionError(f"{pattern!r} did not appear; the last output:\n{text[-3000:]}")
            time.sleep(0.03)

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def wait(self, timeout: float = 20.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        os.close(self.master)


def start_label(address: str, journal: Path, tmp_path: Path, *extra: str, editor: str | None = None) -> Terminal:
    env = {k: v for k, v in os.environ.items() if k not in ("EDITOR", "VISUAL", "HITL_TOKEN")}
    env.update(HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"), TERM="xterm-256color", PYTHONUNBUFFERED="1")
    if editor:
        env["EDITOR"] = editor
    args = [sys.executable, "-m", "hitl.cli", "label", "--server", address, "--project", "demo", "--annotator-id", "alice",
            "--journal", str(journal), "--flush-seconds", "3", *extra]
    return Terminal(args, env)


# -- the program in a terminal ----------------------------------------------------------


@pytest.mark.slow
def test_single_keys_judge_tasks_into_the_store(url, tmp_path):
    publish(url, *(make_task(t) for t in ("t1", "t2", "t3", "t4")))
    srv = start_server(url)
    term = start_label(srv.address, tmp_path / "journal.jsonl", tmp_path)
    try:
        term.expect(r"task t1 ")
        term.expect(r"A · policy v3 +│ B · policy v3")  # side by side
        time.sleep(0.6)
        term.send("a")
        term.expect(r"task t2 ")
        term.send("B")
        term.expect(r"task t3 ")
        term.send("t")
        term.expect(r"task t4 ")
        term.send("x")
        term.expect(r"No tasks to judge right now")
        records = wait_stored(url, 4)
        term.expect(r"unsent 0 │ session: judged 4 / pulled 4 │ server total: 4 records by alice")
        term.send("q")
        assert term.wait() == 0
        assert "every judgement is delivered" in term.text()
    finally:
        term.close()
        srv.stop()
    got = {task: rs[0] for task, rs in by_task(records).items()}
    assert sorted(got) == ["t1", "t2", "t3", "t4"] and len(records) == 4
    expected = {
        "t1": (pb.Preference.CHOICE_A, 0.5),
        "t2": (pb.Preference.CHOICE_B, 1.0),
        "t3": (pb.Preference.CHOICE_TIE, None),
        "t4": (pb.Preference.CHOICE_BOTH_BAD, None),
    }
    for task_id, (choice, strength) in expected.items():
        r = got[task_id]
        assert r.annotator_id == "alice" and r.project == "demo" and r.prompt_id == f"p-{task_id}"
        assert r.preference.choice == choice
        assert (r.preference.strength if r.preference.HasField("strength") else None) == strength
        # A is whatever was shown on the left: the display order is recorded with the judgement
        assert r.metadata["display_order"] == f"{r.preference.candidate_a_id},{r.preference.candidate_b_id}"
        assert {r.preference.candidate_a_id, r.preference.candidate_b_id} == {"c0", "c1"}
        assert r.HasField("lead_time_seconds") and 0 <= r.lead_time_seconds < 30
        assert r.client_time.seconds > 0
    assert got["t1"].lead_time_seconds >= 0.5


def test_ranking_ratings_correction_and_flag(url, tmp_path):
    publish(url, make_task("r1", n=3), make_task("q1", scales=[("helpfulness", 1, 7), ("honesty", 1, 5)]))
    srv = start_server(url)
    term = start_label(srv.address, tmp_path / "journal.jsonl", tmp_path, "--no-shuffle", "--ask-confidence")
    try:
        term.expect(r"task r1 ")
        term.expect(r"\[3\] · policy v3")  # stacked layout for three candidates
        term.send("a")
        term.expect(r"this task has 3 candidates")
        term.send("31\n")  # 3 over 1 over 2 (the last one may be left out)
        term.expect(r"confidence 1")
        term.send("4\n")
        term.expect(r"task q1 ")
        term.send("eb")
        term.expect(r"Type the corrected answer")
        term.send("a better answer\n")
        term.send("  with an indented line\n.\n")
        term.expect(r"note on the correction")
        term.send("fixed the facts\n")
        term.expect(r"saved: correction of B")
        term.send("fao\n")  # a flag of kind other needs a note
        term.expect(r"needs a note")
        term.send("off topic\n")
        term.expect(r"saved: flag other on A")
        term.send("r9 4\n")
        term.expect(r"helpfulness must lie in 1-7")
        term.send("6 4\n\n\n")  # A rated; B skipped; confidence left unstated
        term.expect(r"No tasks to judge right now")
        records = wait_stored(url, 4)
        term.send("q")
        assert term.wait() == 0
    finally:
        term.close()
        srv.stop()
    tasks = by_task(records)
    (ranking,) = tasks["r1"]
    assert {e.candidate_id: e.rank for e in ranking.ranking.entries} == {"c2": 1, "c0": 2, "c1": 3}
    assert ranking.confidence == pytest.approx(0.8)
    kinds = {r.WhichOneof("judgement"): r for r in tasks["q1"]}
    assert sorted(kinds) == ["correction", "flag", "ratings"]
    corr = kinds["correction"].correction
    assert (corr.candidate_id, corr.corrected_text, corr.note) == ("c1", "a better answer\n  with an indented line", "fixed the facts")
    flag = kinds["flag"].flag
    assert (flag.candidate_id, flag.kind, flag.note) == ("c0", pb.Flag.KIND_OTHER, "off topic")
    entries = {(e.candidate_id, e.aspect): e.value for e in kinds["ratings"].ratings.entries}
    assert entries == {("c0", "helpfulness"): 6.0, ("c0", "honesty"): 4.0}
    assert not kinds["ratings"].HasField("confidence")
    assert all(r.annotator_id == "alice" for r in records)


@pytest.mark.slow
def test_offline_judgements_are_delivered_exactly_once_after_the_server_returns(url, tmp_path):
    publish(url, *(make_task(t) for t in ("t1", "t2", "t3", "t4")))
    srv = start_server(url)
    port = srv.server.port
    journal = tmp_path / "journal.jsonl"
    term = start_label(srv.address, journal, tmp_path, "--prefetch", "10")
    try:
        term.expect(r"task t1 ")
        term.expect(r"pulled 4")
        term.send("a")
        wait_stored(url, 1)
        srv.stop()
        term.send("b")
        term.expect(r"task t3 ")
        term.send("t")
        term.expect(r"task t4 ")
        term.expect(r"offline, retrying")
        term.expect(r"unsent 2")
        assert len(stored(url)) == 1
        srv = start_server(url, port)  # a new server on the same store and port
        records = wait_stored(url, 3)
        term.expect(r"● online │ unsent 0")
        term.send("x")
        records = wait_stored(url, 4)
        term.send("q")
        assert term.wait() == 0
    finally:
        term.close()
        srv.stop()
    tasks = by_task(records)
    assert sorted(tasks) == ["t1", "t2", "t3", "t4"] and all(len(rs) == 1 for rs in tasks.values())
    assert tasks["t2"][0].preference.choice == pb.Preference.CHOICE_B
    assert tasks["t3"][0].preference.choice == pb.Preference.CHOICE_TIE
    # the journal shows the offline judgements made once and acked
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    made = [e["feedback_id"] for e in entries if e["op"] == "judgement"]
    acked = [e["feedback_id"] for e in entries if e["op"] == "ack"]
    assert sorted(made) == sorted(r.feedback_id for r in records)
    assert set(acked) == set(made)


@pytest.mark.slow
def test_quitting_offline_and_restarting_delivers_the_unacked(url, tmp_path):
    publish(url, *(make_task(t) for t in ("t1", "t2", "t3")))
    journal = tmp_path / "journal.jsonl"
    srv = start_server(url)
    term = start_label(srv.address, journal, tmp_path)
    try:
        term.expect(r"pulled 3")
        term.expect(r"task t1 ")
        srv.stop()
        term.send("a")
        term.expect(r"task t2 ")
        term.send("B")
        term.expect(r"task t3 ")
        term.expect(r"unsent 2")
        term.send("q")
        assert term.wait() == 0
        assert "2 judgement(s) not delivered yet" in term.text()
    finally:
        term.close()
    assert stored(url) == []
    editor = tmp_path / "editor.py"
    editor.write_text("import sys\np = sys.argv[1]\ntext = open(p).read()\nopen(p, 'w').write(text.upper() + '\\n')\n")
    srv = start_server(url)
    term = start_label(srv.address, journal, tmp_path, "--no-shuffle", editor=f"{sys.executable} {editor}")
    try:
        first = wait_stored(url, 2)  # sent on start, before anything else
        term.expect(r"task t3 ")  # the pulled, unjudged task comes back from the journal
        term.send("ea\n")  # correction of A in $EDITOR; no note
        term.expect(r"saved: correction of A")
        term.send("fph\n")  # flag the prompt as harmful
        term.expect(r"saved: flag harmful on the prompt")
        term.send("s")
        term.expect(r"No tasks to judge right now")
        records = wait_stored(url, 4)
        term.send("q")
        assert term.wait() == 0
    finally:
        term.close()
        srv.stop()
    assert sorted(r.task_id for r in first) == ["t1", "t2"]
    tasks = by_task(records)
    assert len(tasks["t1"]) == 1 and len(tasks["t2"]) == 1
    assert tasks["t1"][0].preference.choice == pb.Preference.CHOICE_A and tasks["t1"][0].preference.strength == 0.5
    assert tasks["t2"][0].preference.choice == pb.Preference.CHOICE_B and tasks["t2"][0].preference.strength == 1.0
    kinds = {r.WhichOneof("judgement"): r for r in tasks["t3"]}
    assert kinds["correction"].correction.corrected_text == "ANSWER 0 TO T3"
    assert kinds["correction"].correction.candidate_id == "c0"
    assert (kinds["flag"].flag.candidate_id, kinds["flag"].flag.kind) == ("", pb.Flag.KIND_HARMFUL)


# -- the pieces ------------------------------------------------------------------------------


def test_ranking_parse():
    assert parse_ranking("312", 3) == [[3], [1], [2]]
    assert parse_ranking("31", 3) == [[3], [1], [2]]
    assert parse_ranking("3=12", 3) == [[3, 1], [2]]
    assert parse_ranking("10 2=1 3 4 5 6 7 8", 10)[:2] == [[10], [2, 1]]
    assert competition_ranks([[3, 1], [2]]) == {3: 1, 1: 1, 2: 3}
    for bad in ("4", "11", "3", "1x"):
        with pytest.raises(ValueError):
            parse_ranking(bad, 3)


def test_text_is_wrapped_to_columns_and_stripped_of_escapes():
    lines = wrap("word " * 30 + "\n  indented\n" + "x" * 25 + " 漢字漢字漢字", 20)
    assert all(text_width(line) <= 20 for line in lines)
    assert "  indented" in lines
    assert sanitize("ok\x1b[2J\x1b]0;title\x07\x07 fine\r\n") == "ok fine\n"


def test_journal_keeps_unsent_and_open_tasks_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "j.jsonl"
    j = Journal(path)
    task = pb.LabelingTask(task_id="t1", project="demo", candidates=[pb.Candidate(candidate_id="c0"), pb.Candidate(candidate_id="c1")])
    j.add_task(task, time.time() + 600)
    j.add_task(pb.LabelingTask(task_id="t2", project="demo"), time.time() + 600)
    r1 = pb.FeedbackRecord(feedback_id="f1", project="demo", task_id="t2", lead_time_seconds=1.234)
    r2 = pb.FeedbackRecord(feedback_id="f2", project="demo", task_id="t2")
    j.add_judgement(r1)
    j.add_judgement(r2)
    j.task_done("t2", "judged")
    j.acked("f2", "accepted", 7)
    j.close()
    with open(path, "a") as fh:
        fh.write('{"op": "judgement", "feedback_id": "f3", "rec')  # a crash while writing
    j = Journal(path)
    assert list(j.unsent) == ["f1"] and j.unsent["f1"].SerializeToString(deterministic=True) == r1.SerializeToString(deterministic=True)
    assert list(j.open_tasks) == ["t1"] and j.skipped_lines == 1
    with pytest.raises(Exception, match="another labeling session"):
        Journal(path)
    j.close()
    assert len(path.read_text().splitlines()) == 2  # compacted to what is still needed
