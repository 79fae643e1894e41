"""Shared test setup: one local Ray cluster per test session (started lazily
by the tests that need it), and the PostgreSQL server the store tests use."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSTGRES_URL = os.environ.get("HITL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session (started on first use)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=8,  # logical CPUs: actors reserve fractions of these; the machine has 2 cores
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}},
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve may never have started
        pass
    ray.shutdown()
