"""`hitl label`: a terminal labeling session for one person.

The screen shows one leased task at a time: the prompt, the candidates side by
side (two columns sized to the terminal; a stacked list for more than two
candidates or a narrow terminal), the policy versions that wrote them, the
connection state and progress. One key makes one judgement (see KEYS_HELP).

Nothing is lost when the connection drops. Each judgement gets its
feedback_id when it is made and is fsynced to a local journal (see
journal.py) before it is sent; a sender thread resends the journal's unacked
records with the same ids until the server acks them, so a record is stored
once however often it travels. Tasks are pulled ahead (--prefetch) and
journaled, so labeling goes on offline with the tasks already pulled, and
they come back after a restart while their leases last. On start, the
journal's unsent judgements are sent before anything else.

The terminal runs in cbreak mode (termios) on the alternate screen, drawn
with plain ANSI sequences; task text is stripped of control characters so a
candidate cannot drive the terminal.
"""

from __future__ import annotations

import codecs
import fcntl
import os
import random
import re
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import termios
import threading
import time
import tty
import unicodedata
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

from hitl.feedback.v1 import feedback_pb2 as pb
from services.feedback.client import Backoff, FeedbackClient, FeedbackClientError
from services.labeling.journal import Journal

KEYS_HELP = """\
Keys (the left answer is A, the right one B; with more than two they are numbered):
  a / b        A / B is better (strength 0.5)
  A / B        (Shift) A / B is clearly better (strength 1.0)
  t            tie: equally good
  x            both bad
  1-9 ... Enter  a ranking, best first: "312" ranks 3 over 1 over 2; "3=12" ties 3 and 1;
               the last candidate may be left out (any number of candidates; with more
               than nine, separate numbers by spaces)
  r            ratings on the task's rating scales: one number per aspect, per candidate
  e            a correction: edit one candidate ($EDITOR when set, else type it here,
               ending with a line holding a single '.')
  f            flag the prompt or a candidate: harmful, PII, spam or other (with a note)
  s            skip the task (its lease runs out and frees it for others)
  j / k, arrows, space   scroll
  ?            this help
  q            quit (unsent judgements stay in the journal and are sent next time)
Corrections and flags add to the task; a preference, a ranking, ratings or a skip
finish it and show the next one. Lead time (from showing the task to the judgement)
is stored with every judgement; with --ask-confidence each finishing judgement also
asks for a confidence 1-5 (stored as 0.2-1.0; Enter leaves it unstated).
"""

_TRANSIENT_CODES = {
    None,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
}

# -- text -------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]")


def sanitize(text: str) -> str:
    """Task text made safe to print: no escape sequences or control characters."""
    text = _ANSI.sub("", text).replace("\r\n", "\n").replace("\t", "    ")
    return "".join(
        ch
        for ch in text
        if ch == "\n" or not (unicodedata.category(ch) in ("Cc", "Cs") or (unicodedata.category(ch) == "Cf" and ch not in "\u200d"))
    )


def char_width(ch: str) -> int:
    if unicodedata.combining(ch) or ch == "\u200d":
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def text_width(text: str) -> int:
    return sum(char_width(ch) for ch in text)


def _cut(text: str, width: int) -> tuple[str, str]:
    """Split text after at most `width` columns (at least one character)."""
    used = 0
    for i, ch in enumerate(text):
        w = char_width(ch)
        if used + w > width and i > 0:
            return text[:i], text[i:]
        used += w
    return text, ""


def wrap(text: str, width: int) -> list[str]:
    """Word-wrap to `width` columns, keeping paragraphs and leading indentation."""
    width = max(1, width)
    out: list[str] = []
    for para in text.split("\n"):
        line, used = "", 0
        for tok in re.findall(r"\s+|\S+", para):
            tw = text_width(tok)
            if used + tw <= width:
                line, used = line + tok, used + tw
                continue
            if tok.isspace():
                out.append(line.rstrip())
                line, used = "", 0
                continue
            if line.strip():
                out.append(line.rstrip())
                line, used = "", 0
            while tw > width:
                head, tok = _cut(tok, width)
                out.append(head)
                tw = text_width(tok)
            line, used = line + tok, used + tw
        out.append(line.rstrip())
    return out


def fit(text: str, width: int, pad: bool = True) -> str:
    """Truncate to `width` columns (with an ellipsis) and optionally pad with spaces."""
    if width <= 0:
        return ""
    if text_width(text) > width:
        text = _cut(text, width - 1)[0] + "…"
    return text + " " * (width - text_width(text)) if pad else text


def parse_ranking(text: str, k: int) -> list[list[int]]:
    """Groups of 1-based candidate numbers, best first; raises ValueError with a reason."""
    compact = text.strip()
    if k > 9 or re.search(r"[\s,]", compact):
        tokens = re.findall(r"\d+|=|[^\d\s,=]", compact)
    else:
        tokens = list(compact.replace(" ", ""))
    groups: list[list[int]] = []
    seen: set[int] = set()
    tie = False
    for tok in tokens:
        if tok == "=":
            tie = True
            continue
        if not tok.isdigit():
            raise ValueError(f"{tok!r} is not a candidate number")
        n = int(tok)
        if not 1 <= n <= k:
            raise ValueError(f"{n} is not a candidate (1-{k})")
        if n in seen:
            raise ValueError(f"{n} appears twice")
        seen.add(n)
        if tie and groups:
            groups[-1].append(n)
        else:
            groups.append([n])
        tie = False
    missing = [n for n in range(1, k + 1) if n not in seen]
    if len(missing) == 1 and seen:
        groups.append(missing)
    elif missing:
        raise ValueError(f"rank every candidate; missing {', '.join(map(str, missing))}")
    return groups


def competition_ranks(groups: list[list[int]]) -> dict[int, int]:
    """1-based candidate number -> rank (ties share a rank: 1, 1, 3)."""
    ranks: dict[int, int] = {}
    done = 0
    for group in groups:
        for n in group:
            ranks[n] = done + 1
        done += len(group)
    return ranks


# -- the network side -----------------------------------------------------------


@dataclass
class SessionOptions:
    project: str
    annotator_id: str
    prefetch: int = 5
    lease_seconds: int = 0
    guidelines_version: str = ""
    ask_confidence: bool = False
    shuffle: bool = True
    flush_seconds: float = 5.0
    poll_seconds: float = 2.0
    stats_seconds: float = 10.0


@dataclass
class LeasedTask:
    task: pb.LabelingTask
    lease_expires_at: float
    order: list[int] = field(default_factory=list)  # display position -> candidate index


class LabelSession:
    """Pulls tasks ahead, sends journaled judgements until acked, tracks the connection."""

    def __init__(self, client: FeedbackClient, journal: Journal, opts: SessionOptions, wake: Callable[[], None]):
        self.client = client
        self.journal = journal
        self.opts = opts
        self._wake_ui = wake
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._send_wake = threading.Event()
        self._pull_wake = threading.Event()
        self._rng = random.Random()
        self.tasks: deque[LeasedTask] = deque()
        self.state = "connecting"
        self.state_detail = ""
        self.pulled = 0
        self.restored = 0
        self.judged = 0
        self.skipped = 0
        self.sent = 0
        self.server_total: int | None = None
        self._stats_due = True
        self.server_empty = False
        self.rejections: list[str] = []
        for open_task in journal.open_tasks.values():
            if open_task.task.project == opts.project:
                self._queue(open_task.task, open_task.lease_expires_at)
                self.restored += 1
        self._threads = [
            threading.Thread(target=self._sender, name="label-sender", daemon=True),
            threading.Thread(target=self._puller, name="label-puller", daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._send_wake.set()
        self._pull_wake.set()
        for t in self._threads:
            t.join(timeout)

    # -- used by the UI ---------------------------------------------------------

    def current(self) -> LeasedTask | None:
        with self._lock:
            return self.tasks[0] if self.tasks else None

    def queued(self) -> int:
        with self._lock:
            return len(self.tasks)

    def record(self, record: pb.FeedbackRecord, summary: str) -> None:
        """Journal (durably) and queue a judgement for sending."""
        self.journal.add_judgement(record, summary)
        self._send_wake.set()

    def finish(self, task_id: str, how: str) -> None:
        with self._lock:
            for i, item in enumerate(self.tasks):
                if item.task.task_id == task_id:
                    del self.tasks[i]
                    break
            if how == "judged":
                self.judged += 1
            else:
                self.skipped += 1
        self.journal.task_done(task_id, how)
        self._pull_wake.set()

    def unsent(self) -> int:
        return self.journal.unsent_count()

    # -- threads ------------------------------------------------------------------

    def _queue(self, task: pb.LabelingTask, lease_expires_at: float) -> bool:
        with self._lock:
            if any(item.task.task_id == task.task_id for item in self.tasks):
                return False
            order = list(range(len(task.candidates)))
            if self.opts.shuffle:
                self._rng.shuffle(order)
            self.tasks.append(LeasedTask(task, lease_expires_at, order))
            return True

    def _ok(self) -> None:
        changed = self.state != "online"
        self.state, self.state_detail = "online", ""
        if changed:
            self._wake_ui()

    def _failed(self, err: FeedbackClientError) -> None:
        if err.code in _TRANSIENT_CODES:
            self.state, self.state_detail = "offline", err.code.name if err.code else ""
        else:
            self.state, self.state_detail = "error", str(err)
        self._wake_ui()

    def _sender(self) -> None:
        try:
            self._send_loop()
        except Exception:  # noqa: BLE001 - the channel or journal closed under a stopping session
            if not self._stop.is_set():
                raise

    def _puller(self) -> None:
        try:
            self._pull_loop()
        except Exception:  # noqa: BLE001 - as above
            if not self._stop.is_set():
                raise

    def _send_loop(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            batch = self.journal.pending(100)
            if not batch:
                self._send_wake.wait(1.0)
                self._send_wake.clear()
                continue
            by_project: dict[str, list[pb.FeedbackRecord]] = {}
            for record in batch:
                by_project.setdefault(record.project, []).append(record)
            failed = False
            for records in by_project.values():
                try:
                    results = self.client.submit(records)
                except FeedbackClientError as err:
                    self._failed(err)
                    failed = True
                    continue
                for record, result in zip(records, results):
                    if result.status in (pb.RecordResult.STATUS_ACCEPTED, pb.RecordResult.STATUS_DUPLICATE):
                        status = "accepted" if result.status == pb.RecordResult.STATUS_ACCEPTED else "duplicate"
                        self.journal.acked(record.feedback_id, status, result.seq)
                        self.sent += 1
                    else:
                        self.journal.rejected(record.feedback_id, result.field, result.reason)
                        self.rejections.append(f"{record.task_id}: {record.WhichOneof('judgement')}: {result.field}: {result.reason}")
                self._ok()
                self._stats_due = True  # refresh the server's counts
                self._pull_wake.set()
            self._wake_ui()
            if failed:
                self._stop.wait(delay)
                delay = min(2.0, delay * 2)
            else:
                delay = 0.2

    def _pull_loop(self) -> None:
        last_stats = 0.0
        while not self._stop.is_set():
            self._pull_wake.clear()
            need = self.opts.prefetch - self.queued()
            reachable = True
            if need > 0:
                got = 0
                try:
                    for task in self.client.pull_tasks(
                        self.opts.project, self.opts.annotator_id, max_tasks=need, lease_seconds=self.opts.lease_seconds, timeout_s=15.0
                    ):
                        lease = task.lease_expires_at.seconds + task.lease_expires_at.nanos / 1e9
                        self.journal.add_task(task, lease)
                        if self._queue(task, lease):
                            self.pulled += 1
                            got += 1
                            self._wake_ui()
                    self.server_empty = got < need
                    self._ok()
                except FeedbackClientError as err:
                    self._failed(err)
                    reachable = False
            if reachable and (self._stats_due or time.monotonic() - last_stats > self.opts.stats_seconds):
                self._stats_due = False
                try:
                    stats = self.client.stats(self.opts.project)
                    self.server_total = int(stats.by_annotator.get(self.opts.annotator_id, 0))
                    last_stats = time.monotonic()
                    self._ok()
                except FeedbackClientError as err:
                    self._stats_due = True
                    self._failed(err)
                    reachable = False
                self._wake_ui()
            if self._pull_wake.is_set() and reachable:
                continue
            busy = reachable and not self.server_empty and self.queued() < self.opts.prefetch
            self._pull_wake.wait(0.2 if busy else self.opts.poll_seconds)


# -- the terminal ------------------------------------------------------------------

_SGR_RESET = "\x1b[0m"
_STYLE = {"": "", "head": "\x1b[7m", "bold": "\x1b[1m", "dim": "\x1b[2m", "warn": "\x1b[33;1m", "bad": "\x1b[31;1m", "ok": "\x1b[32m"}

_KEYNAMES = {
    "\x1b[A": "UP", "\x1b[B": "DOWN", "\x1b[5~": "PGUP", "\x1b[6~": "PGDN", "\x1bOA": "UP", "\x1bOB": "DOWN",
    "\n": "ENTER", "\r": "ENTER", "\x7f": "BS", "\x08": "BS", "\x0c": "REDRAW", "\x03": "INTR", "\x04": "EOF",
}


class Cancelled(Exception):
    """The annotator pressed Esc in a prompt."""


class TerminalUI:
    def __init__(self, session: LabelSession, opts: SessionOptions, journal_path: Path, fd_in: int = 0, fd_out: int = 1):
        self.session = session
        self.opts = opts
        self.journal_path = journal_path
        self.fd_in, self.fd_out = fd_in, fd_out
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._keys: deque[str] = deque()
        self._saved_attrs = None
        self._last_frame: str | None = None
        self.message = ("", "")  # (style, text)
        self.prompt: str | None = None
        self.overlay: Callable[[int], list[tuple[str, str]]] | None = None
        self.scroll = 0
        self._shown_id: str | None = None
        self._shown_at = time.monotonic()

    # -- terminal mode ------------------------------------------------------------

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def enter(self) -> None:
        self._saved_attrs = termios.tcgetattr(self.fd_in)
        tty.setcbreak(self.fd_in)
        self._write("\x1b[?1049h\x1b[?25l")
        self._last_frame = None

    def leave(self) -> None:
        if self._saved_attrs is not None:
            self._write(_SGR_RESET + "\x1b[?25h\x1b[?1049l")
            termios.tcsetattr(self.fd_in, termios.TCSADRAIN, self._saved_attrs)
            self._saved_attrs = None

    def _write(self, data: str) -> None:
        raw = data.encode("utf-8")
        while raw:
            n = os.write(self.fd_out, raw)
            raw = raw[n:]

    def size(self) -> tuple[int, int]:
        try:
            cols, rows = os.get_terminal_size(self.fd_out)
        except OSError:
            cols, rows = 80, 24
        return max(cols, 20), max(rows, 8)

    # -- input --------------------------------------------------------------------

    def _read_keys(self) -> None:
        data = os.read(self.fd_in, 4096)
        if not data:
            self._keys.append("EOF")
            return
        text = self._decoder.decode(data)
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "\x1b":
                if i + 1 < len(text) and text[i + 1] in "[O":
                    j = i + 2
                    while j < len(text) and not ("@" <= text[j] <= "~"):
                        j += 1
                    seq = text[i : j + 1]
                    self._keys.append(_KEYNAMES.get(seq, "UNKNOWN"))
                    i = j + 1
                    continue
                self._keys.append("ESC")
            else:
                self._keys.append(_KEYNAMES.get(ch, ch))
            i += 1

    def next_key(self, timeout: float | None = None) -> str | None:
        """The next key; redraws while waiting. None when `timeout` passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._keys:
            self.draw()
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            ready, _, _ = select.select([self.fd_in, self._wake_r], [], [], wait)
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            if self.fd_in in ready:
                self._read_keys()
            if not self._keys and deadline is not None and time.monotonic() >= deadline:
                self.draw()
                return None
        key = self._keys.popleft()
        if key == "INTR":
            raise KeyboardInterrupt
        if key == "REDRAW":
            self._last_frame = None
            return self.next_key(timeout)
        return key

    def ask(self, label: str, initial: str = "") -> str:
        """A one-line answer; Enter ends it, Esc raises Cancelled."""
        buf = initial
        try:
            while True:
                self.prompt = label + buf
                key = self.next_key()
                if key == "ENTER":
                    return buf
                if key in ("ESC", "EOF"):
                    raise Cancelled
                if key == "BS":
                    buf = buf[:-1]
                elif key is not None and len(key) == 1 and key.isprintable():
                    buf += key
        finally:
            self.prompt = None

    def choose(self, label: str, options: dict[str, object]) -> object:
        """One key out of `options`; Esc raises Cancelled."""
        try:
            while True:
                self.prompt = label
                key = self.next_key()
                if key in ("ESC", "EOF"):
                    raise Cancelled
                if key in options:
                    return options[key]
                self.say("warn", f"press one of {' '.join(options)} (Esc cancels)")
        finally:
            self.prompt = None

    def say(self, style: str, text: str) -> None:
        self.message = (style, text)

    # -- drawing --------------------------------------------------------------------

    def _labels(self, item: LeasedTask) -> list[str]:
        k = len(item.task.candidates)
        return ["A", "B"] if k == 2 else [str(i + 1) for i in range(k)]

    def _status(self) -> tuple[str, str]:
        s = self.session
        unsent = s.unsent()
        if s.state == "online":
            conn, style = "● online", "ok"
        elif s.state == "offline":
            conn, style = "○ offline, retrying (keep labeling)", "warn"
        elif s.state == "error":
            conn, style = f"✖ {s.state_detail}", "bad"
        else:
            conn, style = "… connecting", "warn"
        total = "?" if s.server_total is None else str(s.server_total)
        text = (
            f"{conn} │ unsent {unsent} │ session: judged {s.judged} / pulled {s.pulled + s.restored}"
            f"{f', skipped {s.skipped}' if s.skipped else ''} │ server total: {total} records by {self.opts.annotator_id}"
        )
        if unsent and style == "ok":
            style = "warn"
        if s.rejections:
            text += f" │ REJECTED {len(s.rejections)}, last: {s.rejections[-1]}"
            style = "bad"
        return style, text

    def _task_body(self, item: LeasedTask, cols: int) -> list[tuple[str, str]]:
        task = item.task
        labels = self._labels(item)
        cands = [task.candidates[i] for i in item.order]
        body: list[tuple[str, str]] = [("bold", "Prompt")]
        body += [("", line) for line in wrap(sanitize(task.prompt), cols)]
        body.append(("dim", "─" * cols))
        if len(cands) == 2 and cols >= 50:
            colw = (cols - 3) // 2
            heads = [f"{lab} · policy v{c.policy_version}" for lab, c in zip(labels, cands)]
            body.append(("bold", fit(heads[0], colw) + " │ " + fit(heads[1], colw, pad=False)))
            left, right = (wrap(sanitize(c.text), colw) for c in cands)
            for i in range(max(len(left), len(right))):
                lft = left[i] if i < len(left) else ""
                rgt = right[i] if i < len(right) else ""
                body.append(("", fit(lft, colw) + " │ " + fit(rgt, colw, pad=False)))
        else:
            for lab, c in zip(labels, cands):
                body.append(("bold", f"[{lab}] · policy v{c.policy_version}"))
                body += [("", "  " + line) for line in wrap(sanitize(c.text), cols - 2)]
                body.append(("", ""))
        return body

    def _keys_line(self, item: LeasedTask | None) -> str:
        if item is None:
            return "? help · q quit"
        k = len(item.task.candidates)
        rate = " · r rate" if item.task.rating_scales else ""
        if k == 2:
            return f"a/b better (A/B: clearly) · t tie · x both bad · 12 rank{rate} · e correct · f flag · s skip · ? help · q quit"
        return f"1-{k} then Enter: rank, best first (= ties){rate} · e correct · f flag · s skip · ? help · q quit"

    def frame(self) -> str:
        cols, rows = self.size()
        item = self.session.current()
        if item is not None and item.task.task_id != self._shown_id:
            self._shown_id, self._shown_at, self.scroll = item.task.task_id, time.monotonic(), 0
        head: list[tuple[str, str]] = []
        title = f" hitl label · {self.opts.project} · {self.opts.annotator_id}"
        if item is not None:
            versions = sorted({c.policy_version for c in item.task.candidates})
            left = item.lease_expires_at - time.time()
            lease = f"lease {int(left // 60)}m left" if left > 0 else "lease expired"
            title += (
                f" · task {item.task.task_id} ({self.session.queued()} queued) · prompt {item.task.prompt_id}"
                f" · policy {', '.join(f'v{v}' for v in versions)} · {lease}"
            )
        head.append(("head", fit(title, cols)))
        head.append(self._status())
        if self.overlay is not None:
            body = self.overlay(cols)
        elif item is not None:
            body = self._task_body(item, cols)
        else:
            state = self.session.state
            if state == "online" or state == "connecting":
                body = [("", ""), ("bold", "No tasks to judge right now; waiting for new ones (q quits).")]
            else:
                body = [("", ""), ("warn", "No tasks pulled and the server cannot be reached; waiting for it (q quits).")]
        foot: list[tuple[str, str]] = [("dim", "─" * cols), self.message, ("dim", self._keys_line(item))]
        if self.prompt is not None:
            foot.append(("bold", self.prompt + "█"))
        room = max(1, rows - len(head) - len(foot))
        self.scroll = max(0, min(self.scroll, max(0, len(body) - room)))
        shown = body[self.scroll : self.scroll + room]
        if self.scroll + room < len(body):
            shown[-1] = ("dim", f"↓ {len(body) - self.scroll - room + 1} more lines (j / space)")
        if self.scroll > 0:
            shown[0] = ("dim", f"↑ {self.scroll + 1} lines above (k)")
        lines = head + shown + [("", "")] * (room - len(shown)) + foot
        out = []
        for style, text in lines[:rows]:
            out.append(_STYLE.get(style, "") + fit(text, cols, pad=False) + _SGR_RESET + "\x1b[K")
        return "\x1b[H" + "\r\n".join(out) + "\x1b[J"

    def draw(self) -> None:
        data = self.frame()
        if data != self._last_frame:
            self._write(data)
            self._last_frame = data

    # -- judgements -------------------------------------------------------------------

    def _record(self, item: LeasedTask, **judgement) -> pb.FeedbackRecord:
        record = pb.FeedbackRecord(
            feedback_id=str(uuid.uuid4()),
            project=item.task.project,
            task_id=item.task.task_id,
            prompt_id=item.task.prompt_id,
            annotator_id=self.opts.annotator_id,
            lead_time_seconds=round(time.monotonic() - self._shown_at, 3),
            guidelines_version=self.opts.guidelines_version,
            metadata={
                "client": "hitl-label",
                "display_order": ",".join(item.task.candidates[i].candidate_id for i in item.order),
            },
            **judgement,
        )
        record.client_time.GetCurrentTime()
        return record

    def _confidence(self, record: pb.FeedbackRecord) -> None:
        if not self.opts.ask_confidence:
            return
        while True:
            answer = self.ask("confidence 1 (guess) to 5 (sure); Enter leaves it unstated: ").strip()
            if not answer:
                return
            if answer in ("1", "2", "3", "4", "5"):
                record.confidence = int(answer) / 5
                return
            self.say("warn", "a number from 1 to 5, or Enter")

    def _save(self, item: LeasedTask, record: pb.FeedbackRecord, summary: str, finishes: bool) -> None:
        if finishes:
            self._confidence(record)
        self.session.record(record, summary)
        if finishes:
            self.session.finish(item.task.task_id, "judged")
            self.say("ok", f"saved: {summary} ({item.task.task_id})")
        else:
            self.say("ok", f"saved: {summary} ({item.task.task_id}); now judge the task, or s to skip it")

    def _candidate(self, item: LeasedTask, label: str, allow_prompt: bool = False) -> pb.Candidate | None:
        labels = self._labels(item)
        options: dict[str, object] = {lab.lower(): pos for pos, lab in enumerate(labels)}
        options.update({str(pos + 1): pos for pos in range(min(9, len(labels)))})
        if allow_prompt:
            options["p"] = None
        pos = self.choose(label, options)
        return None if pos is None else item.task.candidates[item.order[pos]]

    def preference(self, item: LeasedTask, key: str) -> None:
        if len(item.task.candidates) != 2:
            self.say("warn", f"this task has {len(item.task.candidates)} candidates: rank them (digits, best first, then Enter)")
            return
        choice, strength, summary = {
            "a": (pb.Preference.CHOICE_A, 0.5, "A better"),
            "A": (pb.Preference.CHOICE_A, 1.0, "A clearly better"),
            "b": (pb.Preference.CHOICE_B, 0.5, "B better"),
            "B": (pb.Preference.CHOICE_B, 1.0, "B clearly better"),
            "t": (pb.Preference.CHOICE_TIE, None, "tie"),
            "x": (pb.Preference.CHOICE_BOTH_BAD, None, "both bad"),
        }[key]
        left, right = (item.task.candidates[i] for i in item.order)
        pref = pb.Preference(candidate_a_id=left.candidate_id, candidate_b_id=right.candidate_id, choice=choice)
        if strength is not None:
            pref.strength = strength
        self._save(item, self._record(item, preference=pref), summary, finishes=True)

    def ranking(self, item: LeasedTask, first: str) -> None:
        k = len(item.task.candidates)
        text = first
        while True:
            text = self.ask(f"rank 1-{k}, best first (= ties), Enter saves, Esc cancels: ", text)
            try:
                groups = parse_ranking(text, k)
                break
            except ValueError as err:
                self.say("warn", str(err))
        ranks = competition_ranks(groups)
        entries = [
            pb.Ranking.Entry(candidate_id=item.task.candidates[item.order[n - 1]].candidate_id, rank=rank) for n, rank in sorted(ranks.items())
        ]
        labels = self._labels(item)
        summary = "ranking " + " > ".join("=".join(labels[n - 1] for n in g) for g in groups)
        self._save(item, self._record(item, ranking=pb.Ranking(entries=entries)), summary, finishes=True)

    def ratings(self, item: LeasedTask) -> None:
        scales = list(item.task.rating_scales)
        if not scales:
            self.say("warn", "this task declares no rating scales")
            return
        spec = ", ".join(f"{s.aspect} {s.min:g}-{s.max:g}" for s in scales)
        entries: list[pb.Ratings.Entry] = []
        for label, idx in zip(self._labels(item), item.order):
            cand = item.task.candidates[idx]
            while True:
                answer = self.ask(f"rate {label}: {spec} (numbers separated by spaces; Enter skips {label}): ").strip()
                if not answer:
                    break
                try:
                    values = [float(v) for v in answer.replace(",", " ").split()]
                except ValueError:
                    self.say("warn", "numbers only")
                    continue
                if len(values) != len(scales):
                    self.say("warn", f"give {len(scales)} numbers: {spec}")
                    continue
                bad = [f"{s.aspect} must lie in {s.min:g}-{s.max:g}" for s, v in zip(scales, values) if not s.min <= v <= s.max]
                if bad:
                    self.say("warn", "; ".join(bad))
                    continue
                entries += [pb.Ratings.Entry(candidate_id=cand.candidate_id, aspect=s.aspect, value=v) for s, v in zip(scales, values)]
                break
        if not entries:
            self.say("warn", "no ratings given; nothing saved")
            return
        summary = f"ratings ({len(entries)} values)"
        self._save(item, self._record(item, ratings=pb.Ratings(entries=entries)), summary, finishes=True)

    def correction(self, item: LeasedTask) -> None:
        cand = self._candidate(item, "correct which answer? (letter or number; Esc cancels)")
        label = self._labels(item)[item.order.index(list(item.task.candidates).index(cand))]
        editor = os.environ.get("EDITOR", "").strip()
        text = self._edit_external(editor, cand.text) if editor else self._edit_inline(label, cand.text)
        if text is None or text.strip() == cand.text.strip():
            self.say("warn", "correction cancelled (text unchanged)")
            return
        note = self.ask("note on the correction (Enter for none): ").strip()
        corr = pb.Correction(candidate_id=cand.candidate_id, corrected_text=text, note=note)
        self._save(item, self._record(item, correction=corr), f"correction of {label}", finishes=False)

    def _edit_external(self, editor: str, original: str) -> str | None:
        fd, path = tempfile.mkstemp(prefix="hitl-correction-", suffix=".txt")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(original)
            self.leave()
            try:
                done = subprocess.run([*shlex.split(editor), path], check=False)
            except (OSError, ValueError) as err:
                self.say("bad", f"cannot run $EDITOR ({editor}): {err}")
                return None
            finally:
                self.enter()
            if done.returncode != 0:
                self.say("warn", f"the editor exited with status {done.returncode}")
                return None
            with open(path, encoding="utf-8", errors="replace") as fh:
                return fh.read().rstrip("\n")
        finally:
            os.unlink(path)

    def _edit_inline(self, label: str, original: str) -> str:
        lines: list[str] = []

        def overlay(cols: int) -> list[tuple[str, str]]:
            view = [("bold", f"Correcting {label}. The answer now:")]
            view += [("dim", "  " + line) for line in wrap(sanitize(original), cols - 2)]
            view.append(("bold", "Type the corrected answer; end with a line holding a single '.' (Esc cancels):"))
            view += [("", "  " + line) for line in lines]
            return view

        self.overlay = overlay
        try:
            while True:
                self.scroll = 10**6  # keep the newest lines in view
                line = self.ask(f"line {len(lines) + 1}> ")
                if line == ".":
                    return "\n".join(lines)
                lines.append(line)
        finally:
            self.overlay = None
            self.scroll = 0

    def flag(self, item: LeasedTask) -> None:
        cand = self._candidate(item, "flag what? a candidate (letter or number) or p the prompt (Esc cancels)", allow_prompt=True)
        kind = self.choose(
            "flag as: h harmful · p PII · s spam · o other (Esc cancels)",
            {"h": pb.Flag.KIND_HARMFUL, "p": pb.Flag.KIND_PII, "s": pb.Flag.KIND_SPAM, "o": pb.Flag.KIND_OTHER},
        )
        while True:
            note = self.ask("note (required): " if kind == pb.Flag.KIND_OTHER else "note (Enter for none): ").strip()
            if note or kind != pb.Flag.KIND_OTHER:
                break
            self.say("warn", "a flag of kind 'other' needs a note")
        target = "the prompt"
        if cand is not None:
            target = self._labels(item)[item.order.index(list(item.task.candidates).index(cand))]
        flag = pb.Flag(candidate_id=cand.candidate_id if cand is not None else "", kind=kind, note=note)
        name = pb.Flag.Kind.Name(kind).removeprefix("KIND_").lower()
        self._save(item, self._record(item, flag=flag), f"flag {name} on {target}", finishes=False)

    def help(self) -> None:
        self.overlay = lambda cols: [("", line) for line in KEYS_HELP.splitlines()] + [("", ""), ("bold", "Press any key to go back.")]
        try:
            self.next_key()
        finally:
            self.overlay = None

    # -- the loop ---------------------------------------------------------------------

    def quit(self) -> bool:
        """Wait a little for unsent judgements when the server answers; True to leave."""
        deadline = time.monotonic() + self.opts.flush_seconds
        while self.session.unsent() and self.session.state == "online" and time.monotonic() < deadline:
            self.say("warn", f"sending {self.session.unsent()} unsent judgement(s)… (q again leaves now)")
            if self.next_key(timeout=0.1) == "q":
                break
        return True

    def run(self) -> None:
        while True:
            key = self.next_key()
            item = self.session.current()
            if item is not None and item.task.task_id != self._shown_id:
                # typed ahead, before this task was on screen: a judgement needs a task seen
                self.draw()
                if key not in ("q", "EOF", "?"):
                    if key not in (None, "ESC"):
                        self.say("warn", f"{key!r} ignored: it was typed before task {item.task.task_id} was shown")
                    continue
            try:
                if key in ("q", "EOF"):
                    if self.quit():
                        return
                elif key == "?":
                    self.help()
                elif key in ("j", "DOWN"):
                    self.scroll += 1
                elif key in ("k", "UP"):
                    self.scroll = max(0, self.scroll - 1)
                elif key in (" ", "PGDN"):
                    self.scroll += max(1, self.size()[1] - 8)
                elif key == "PGUP":
                    self.scroll = max(0, self.scroll - max(1, self.size()[1] - 8))
                elif item is None:
                    self.say("warn", "no task to judge yet")
                elif key in ("a", "A", "b", "B", "t", "x"):
                    self.preference(item, key)
                elif key is not None and key.isdigit() and key != "0":
                    self.ranking(item, key)
                elif key == "r":
                    self.ratings(item)
                elif key == "e":
                    self.correction(item)
                elif key == "f":
                    self.flag(item)
                elif key == "s":
                    self.session.finish(item.task.task_id, "skipped")
                    self.say("", f"skipped {item.task.task_id}")
                elif key not in ("ESC", None):
                    self.say("warn", f"{key!r} does nothing here; ? shows the keys")
            except Cancelled:
                self.say("", "cancelled")


# -- entry point ------------------------------------------------------------------------


def run_label(
    *,
    server: str,
    token: str | None,
    opts: SessionOptions,
    journal_path: Path,
    root_certificates: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
) -> int:
    """Run one labeling session in this terminal; the process's exit status."""
    if not (os.isatty(0) and os.isatty(1)):
        print("hitl label: needs a terminal (stdin and stdout must be a tty)", file=sys.stderr)
        return 2
    from services.labeling.journal import JournalLocked

    try:
        journal = Journal(journal_path)
    except JournalLocked as err:
        print(f"hitl label: {err}", file=sys.stderr)
        return 2
    client = FeedbackClient(
        server,
        token,
        root_certificates=root_certificates,
        client_cert=client_cert,
        client_key=client_key,
        timeout_s=10.0,
        backoff=Backoff(give_up_after_s=0.0),  # the session retries itself, and shows the state meanwhile
        channel_options=(
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ),
    )
    holder: list[TerminalUI] = []
    session = LabelSession(client, journal, opts, wake=lambda: holder[0].wake() if holder else None)
    ui = TerminalUI(session, opts, journal_path)
    holder.append(ui)
    old_winch = signal.signal(signal.SIGWINCH, lambda *_: ui.wake())

    def _terminate(*_) -> None:
        raise KeyboardInterrupt

    def _suspend(*_) -> None:  # Ctrl-Z: give the terminal back, take it again on `fg`
        ui.leave()
        os.kill(os.getpid(), signal.SIGSTOP)
        ui.enter()
        ui.wake()

    old_term = signal.signal(signal.SIGTERM, _terminate)
    old_tstp = signal.signal(signal.SIGTSTP, _suspend)
    ui.enter()
    try:
        session.start()
        try:
            ui.run()
        except KeyboardInterrupt:
            pass
    finally:
        ui.leave()
        signal.signal(signal.SIGWINCH, old_winch)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGTSTP, old_tstp)
        session.stop()
        client.close()
        unsent = journal.unsent_count()
        journal.close()
    print(f"hitl label: judged {session.judged} task(s), skipped {session.skipped}, {session.sent} judgement(s) delivered this session.")
    for line in session.rejections:
        print(f"hitl label: rejected by the server: {line}")
    if unsent:
        print(f"hitl label: {unsent} judgement(s) not delivered yet; they are kept in {journal_path} and sent first by the next `hitl label`.")
    else:
        print("hitl label: every judgement is delivered.")
    return 0
