"""Tokenizer, tiny/HF policy loading, LoRA and the GGUF cache key, on tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from rlhf.models import (
    LoraConfig,
    ModelConfig,
    gguf_source,
    load_policy,
    position_ids_from_mask,
    smollm2_gguf_path,
)

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_tokenizer_has_chat_template_distinct_pad_and_left_padding(tokenizer) -> None:
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) == 49152


def test_tokenizer_conversion_is_cached(tiny_cfg: ModelConfig, tokenizer) -> None:
    source = gguf_source(smollm2_gguf_path(), tiny_cfg.cache_dir)
    tokenizer_json = source.tokenizer_dir / "tokenizer.json"
    before = tokenizer_json.stat().st_mtime_ns
    load_policy(tiny_cfg)
    assert tokenizer_json.stat().st_mtime_ns == before
    assert sorted(p.name for p in tiny_cfg.cache_dir.iterdir()) == [source.entry_dir.name]


def test_tiny_model_is_seeded_and_leaves_global_rng_alone(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, _ = load_policy(tiny_cfg)
    assert torch.equal(torch.rand(3), expected_next)
    second, _ = load_policy(tiny_cfg)
    other, _ = load_policy(tiny_cfg.model_copy(update={"seed": 1}))
    weights = [m.get_input_embeddings().weight for m in (first, second, other)]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])
    assert first.config.hidden_size == 32 and first.config.num_hidden_layers == 2
    assert first.config.vocab_size == 49152


def test_generation_with_left_padding_matches_unpadded(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model, tok = load_policy(tiny_cfg)
    prompts = ["Tell me a story about a dragon", "Hi"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    together = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch.input_ids.shape[1]:]
    for row, prompt in enumerate(prompts):
        alone = tok([prompt], return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=6, do_sample=False)
        assert torch.equal(single[0, alone.input_ids.shape[1]:], together[row])


def test_position_ids_count_real_tokens_only() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]])
    assert torch.equal(position_ids_from_mask(mask), expected)


def test_lora_trains_adapters_only(tiny_cfg: ModelConfig) -> None:
    lora = LoraConfig(enabled=True, rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
    model, _ = load_policy(tiny_cfg, lora)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert all(("q_proj" in n or "v_proj" in n) for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x 2 modules x (A, B)


def test_hf_directory_round_trip(tiny_cfg: ModelConfig, tmp_path: Path) -> None:
    model, tok = load_policy(tiny_cfg)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_policy(ModelConfig(source="hf", path=str(tmp_path)))
    ids = tok(["hello world"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, loaded(**ids).logits, atol=1e-6)
    assert loaded_tok.chat_template == tok.chat_template
    assert loaded_tok.pad_token_id == tok.pad_token_id


def test_gguf_cache_key_follows_content_not_mtime(tmp_path: Path) -> None:
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"weights v1")
    first = gguf_source(model_file, tmp_path / "cache")
    os.utime(model_file, ns=(1, 1))  # touched: same content
    assert gguf_source(model_file, tmp_path / "cache").entry_dir == first.entry_dir
    model_file.write_bytes(b"weights v2")  # same size, new content
    changed = gguf_source(model_file, tmp_path / "cache")
    assert changed.entry_dir != first.entry_dir
    assert changed.entry_dir.name.startswith("gguf-m-")
    assert not (tmp_path / "cache").exists()  # locating an entry writes nothing


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"source": "hf"}, "path is required"),
        ({"source": "tiny", "path": "x"}, "path must be unset"),
        ({"source": "gguf", "path": "model.bin"}, ".gguf"),
        ({"source": "tiny", "hidden_size": 30, "num_heads": 4}, "must divide hidden_size"),
        ({"source": "tiny", "hidden_size": 4}, "greater than or equal to 8"),
        ({"source": "tiny", "layers": 2}, "Extra inputs are not permitted"),
        ({"source": "onnx"}, "Input should be"),
    ],
)
def test_model_config_rejects_bad_values(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**fields)


def test_cache_dir_expands_home() -> None:
    assert ModelConfig().cache_dir == Path.home() / ".cache" / "hitl" / "models"


def test_dtype_and_gradient_checkpointing_from_config(tiny_cfg: ModelConfig) -> None:
    cfg = tiny_cfg.model_copy(update={"dtype": "bfloat16", "gradient_checkpointing": True})
    model, tok = load_policy(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.is_gradient_checkpointing
    model.train()
    ids = tok(["checkpointed forward and backward"], return_tensors="pt")
    model(**ids, labels=ids.input_ids).loss.backward()
    assert model.get_input_embeddings().weight.grad is not None
