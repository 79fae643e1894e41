"""Shared test setup: one local Ray cluster per test session (started lazily
by the tests that need it), and the PostgreSQL server the store tests use."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSTGRES_URL = os.environ.get("HITL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
