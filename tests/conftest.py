"""Shared test setup: the test tiers, one local Ray cluster per test session (started lazily
by the tests that need it), and the PostgreSQL server the store tests use.

Tiers. A test says what it needs with a marker: `ray` (set here on every test that uses the
`ray_session` fixture), `postgres`, `browser`, `distributed` (several torch.distributed
processes) or `slow` (real weights, or more than a few seconds). Every test with none of them
is marked `unit`: `python -m pytest -m unit` is the fast tier. Run that way, Ray and Selenium
are made unimportable and the PostgreSQL URL points at a closed port, so a test that needs
one of them and is not marked fails there instead of passing by luck.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSTGRES_URL = os.environ.get("HITL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


import sys  # noqa: E402

import pytest  # noqa: E402

NEEDS = ("ray", "postgres", "browser", "distributed", "slow")
UNIT_BLOCKED = ("ray", "selenium")


def _unit_only(config: pytest.Config) -> bool:
    return (config.option.markexpr or "").strip() == "unit"


def pytest_configure(config: pytest.Config) -> None:
    if _unit_only(config):
        for name in UNIT_BLOCKED:  # as if not installed: `import ray` raises ImportError
            sys.modules[name] = None  # type: ignore[assignment]
        os.environ["HITL_TEST_POSTGRES_URL"] = "postgresql://postgres@127.0.0.1:9/test"
        global POSTGRES_URL
        POSTGRES_URL = os.environ["HITL_TEST_POSTGRES_URL"]


def _imports_at_top(path) -> set[str]:
    import ast

    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return set()
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def pytest_ignore_collect(collection_path, config: pytest.Config):
    """In the unit tier, a test module that imports Ray or Selenium at its top is none of the
    tier's business (it could not even be imported where they are absent)."""
    if _unit_only(config) and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        if _imports_at_top(collection_path) & set(UNIT_BLOCKED):
            return True
    return None


@pytest.hookimpl(tryfirst=True)  # before -m selects on the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        if not any(item.get_closest_marker(name) for name in NEEDS):
            item.add_marker(pytest.mark.unit)


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
            _system_config={"metrics_report_interval_ms": 2000},  # the loop test scrapes every role's series
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve may never have started
        pass
    ray.shutdown()
