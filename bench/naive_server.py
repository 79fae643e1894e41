"""The reference a user would write by hand: one record per call, one commit per record.

    python bench/naive_server.py --db /tmp/naive.db --ready-file /tmp/port

A minimal `grpc.aio` FeedbackService that implements only SubmitFeedback and
writes each record with its own sqlite3 `INSERT` + `COMMIT`, with the same
durability as the real store (WAL, synchronous=FULL). It keeps the same
idempotency key (project, feedback_id) but does no validation against tasks,
no counters and no leases, so it does less work per record than the real
service. `bench/ingest.py` starts it in a separate process and drives it with
one-record unary calls.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sqlite3
from pathlib import Path

import grpc

from hitl.feedback.v1 import feedback_pb2 as pb
from hitl.feedback.v1 import feedback_pb2_grpc as pb_grpc


class NaiveServicer(pb_grpc.FeedbackServiceServicer):
    def __init__(self, db: Path):
        self._conn = sqlite3.connect(db, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS feedback ("
            " seq INTEGER PRIMARY KEY AUTOINCREMENT, project TEXT NOT NULL, feedback_id TEXT NOT NULL,"
            " record BLOB NOT NULL, UNIQUE (project, feedback_id))"
        )

    async def SubmitFeedback(self, request: pb.SubmitFeedbackRequest, context) -> pb.SubmitFeedbackResponse:
        results = []
        for record in request.records:
            self._conn.execute("BEGIN")
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO feedback (project, feedback_id, record) VALUES (?, ?, ?)",
                (record.project, record.feedback_id, record.SerializeToString()),
            )
            self._conn.execute("COMMIT")
            status = pb.RecordResult.STATUS_ACCEPTED if cur.rowcount == 1 else pb.RecordResult.STATUS_DUPLICATE
            results.append(pb.RecordResult(feedback_id=record.feedback_id, status=status, seq=cur.lastrowid or 0))
        return pb.SubmitFeedbackResponse(results=results)


async def serve(db: Path, port: int, ready_file: Path | None) -> None:
    server = grpc.aio.server()
    pb_grpc.add_FeedbackServiceServicer_to_server(NaiveServicer(db), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if ready_file is not None:
        ready_file.write_text(f"{bound}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", type=Path, default=None)
    args = parser.parse_args()
    asyncio.run(serve(args.db, args.port, args.ready_file))


if __name__ == "__main__":
    main()
