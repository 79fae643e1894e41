"""PostgreSQL backend: the store at scale (several services, one database)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from services.feedback.records import Limits
from services.feedback.store.base import SqlStore

# Every write transaction holds this transaction-level advisory lock, so writers
# are serialised and BIGSERIAL values are committed in increasing order: a
# reader past watermark W can never later see a smaller seq appear.
_WRITE_LOCK_KEY = 0x6869746C  # "hitl"


class PostgresDialect:
    name = "postgresql"
    seq_column = "BIGSERIAL PRIMARY KEY"
    blob = "BYTEA"
    real = "DOUBLE PRECISION"

    def __init__(self, conninfo: str, schema: str | None):
        self.conninfo = conninfo
        self.schema = schema

    def connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self.conninfo, autocommit=False)
        if self.schema:
            with conn.cursor() as cur:
                cur.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                cur.execute(f'SET search_path TO "{self.schema}"')
            conn.commit()
        return conn

    def sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def begin_write(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK_KEY,))

    def begin_read(self, conn: Any) -> None:
        return None  # psycopg opens a transaction on the first statement

    def insert_returning(self, cur: Any, statement: str, rows: list[tuple]) -> list[int]:
        cur.executemany(statement, rows, returning=True)
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
