"""PostgreSQL backend: the store at scale (several services, one database)."""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from services.feedback.records import Limits
from services.feedback.store.base import SqlStore


def write_lock_key(schema: str) -> int:
    """The advisory lock key of the store in `schema`.

    Every write transaction holds this transaction-level advisory lock, so the
    writers of one store are serialised and its BIGSERIAL values are committed
    in increasing order: a reader past watermark W can never later see a
    smaller seq appear. The key is the store's own (derived from its schema),
    so stores in other schemas of the same database never wait for it.
    """
    digest = hashlib.blake2b(f"hitl-feedback-writer:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


CONNECT_TIMEOUT_S = 5  # a connection attempt to an unreachable host gives up after this


class PostgresDialect:
    name = "postgresql"
    seq_column = "BIGSERIAL PRIMARY KEY"
    blob = "BYTEA"
    real = "DOUBLE PRECISION"
    insert_new = None  # the group's ids are looked up before its insert (RETURNING pairs seqs with rows)

    def __init__(self, conninfo: str, schema: str | None):
        self.conninfo = conninfo
        self.schema = schema
        self.lock_key: int | None = None  # set by the first connection, from the schema it writes to

    def connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self.conninfo, autocommit=False, connect_timeout=CONNECT_TIMEOUT_S)
        with conn.cursor() as cur:
            if self.schema:
                cur.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                cur.execute(f'SET search_path TO "{self.schema}"')
            if self.lock_key is None:
                cur.execute("SELECT current_schema()")  # where the store's tables are
                self.lock_key = write_lock_key(cur.fetchone()[0] or "")
        conn.commit()
        return conn

    def sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def begin_write(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock_key,))

    def begin_read(self, conn: Any) -> None:
        return None  # psycopg opens a transaction on the first statement

    def committed(self, conn: Any) -> None:
        return None

    def close(self) -> None:
        return None

    def is_broken(self, conn: Any) -> bool:
        return bool(conn.closed or conn.broken)

    def find_feedback_ids(self, project: str, ids: list[str]) -> tuple[str, tuple]:
        # Not `project = %s AND feedback_id IN (...)`: before ANALYZE has seen the table, the
        # planner guesses `project = %s` to be selective, scans every row of the project and
        # filters on the ids: O(table) per lookup when one project dominates. Here each id is
        # looked up by a subquery on the whole unique key; its LIMIT 1 (true anyway: the key
        # is unique) keeps the planner from flattening it into a join that could scan the
        # project again, so the plan is one unique-index probe per id, whatever the statistics.
        return (
            "SELECT f.feedback_id, f.seq, f.content_hash FROM unnest(%s::text[]) AS k(feedback_id)"
            " CROSS JOIN LATERAL (SELECT feedback_id, seq, content_hash FROM feedback"
            " WHERE project = %s AND feedback_id = k.feedback_id LIMIT 1) AS f",
            (list(ids), project),
        )

    def find_leases(self, pairs: list[tuple[str, str]]) -> tuple[str, tuple]:
        # as in find_feedback_ids: one probe of the (task_id, annotator_id) primary key per pair
        return (
            "SELECT l.task_id, l.annotator_id, l.answered FROM unnest(%s::text[], %s::text[]) AS k(task_id, annotator_id)"
            " CROSS JOIN LATERAL (SELECT task_id, annotator_id, answered FROM leases"
            " WHERE task_id = k.task_id AND annotator_id = k.annotator_id LIMIT 1) AS l",
            ([t for t, _ in pairs], [a for _, a in pairs]),
        )

    def insert_returning(self, cur: Any, table: str, statement: str, rows: list[tuple]) -> list[int]:
        """executemany the INSERT (pipelined by psycopg: one round trip, not one per row); seqs in row order."""
        cur.executemany(statement + " RETURNING seq", rows, returning=True)
        seqs: list[int] = []
        while True:
            seqs.append(int(cur.fetchone()[0]))
            if not cur.nextset():
                break
        return seqs


def split_schema(url: str) -> tuple[str, str | None]:
    """Take hitl's own `schema=NAME` query parameter out of a PostgreSQL URL."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), None)
    rest = [(k, v) for k, v in query if k != "schema"]
    if schema is not None and not schema.replace("_", "").isalnum():
        raise ValueError(f"store url: schema must be letters, digits and '_', got {schema!r}")
    scheme = "postgresql" if parts.scheme in ("postgres", "postgresql") else parts.scheme
    return urlunsplit((scheme, parts.netloc, parts.path, urlencode(rest), parts.fragment)), schema


def open_postgres(url: str, limits: Limits | None = None) -> SqlStore:
    conninfo, schema = split_schema(url)
    return SqlStore(url, PostgresDialect(conninfo, schema), limits)
