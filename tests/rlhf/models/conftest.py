import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread(torch_single_thread) -> None:
    """Every test here runs tiny models single-threaded (see tests/rlhf/conftest.py)."""
