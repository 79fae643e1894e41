"""Shared fixtures of the RLHF core tests: one model cache per test session, tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.models import ModelConfig, load_tokenizer


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh conversion cache for this session (the SmolLM2 tokenizer is converted once)."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_cfg(model_cache_dir: Path) -> ModelConfig:
    """A tiny random Llama (hidden 32, 2 layers) with the real SmolLM2 tokenizer."""
    return ModelConfig(source="tiny", hidden_size=32, num_layers=2, num_heads=4,
                       intermediate_size=64, seed=0, cache_dir=model_cache_dir)


@pytest.fixture(scope="session")
def tokenizer(tiny_cfg: ModelConfig):
    return load_tokenizer(tiny_cfg)


@pytest.fixture(scope="module")
def torch_single_thread():
    """One intra-op thread: tiny models on a shared 2-core machine run several times faster
    without thread contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
