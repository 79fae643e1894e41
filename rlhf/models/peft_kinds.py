"""The PEFT kinds of :class:`LoraConfig`: building each as a peft model, and what every kind
shares (the trainable tensors a push or a checkpoint carries, whether they merge).

Every kind comes back as a ``peft.PeftModel``, so the rest of the code treats them alike:

- **the reference** is the model under ``disable_adapter()`` (base weights frozen, so "PEFT
  part off" is exactly the starting model);
- **the trainable tensors** are those of ``get_peft_model_state_dict`` (peft's names, without
  the adapter name): DeepSpeed checkpoints keep only them (``exclude_frozen_parameters``), a
  weight push carries only them, and the generation engine, which builds the same kind from
  the same config, copies them onto its own (:func:`adapter_parameters`);
- **merging** (``merge_adapter``, for fast generation and the reward model's saved copy) is
  exact for ``lora``, ``dora`` and ``ia3``; ``bitfit`` (a bias the base layer may lack) and
  ``bottleneck`` (a nonlinear function of the layer's output) run unmerged (:func:`can_merge`).

Kinds and the peft machinery behind them:

=============  ======================================================================
``lora``       ``peft.LoraConfig``
``dora``       ``peft.LoraConfig(use_dora=True)``: A, B and a magnitude per output row
``ia3``        ``peft.IA3Config``: a scale per output (per input for feed-forward layers)
``bitfit``     ``peft.BeftConfig``: an additive bias per target linear, at 0
``bottleneck`` ``peft.LoraConfig`` with a custom layer (:class:`BottleneckLinear`, peft's
               custom-module support): y + up(relu(down(y))) after the linear
=============  ======================================================================

AdapterHub's ``adapters`` package (1.3.0) is not used: it requires ``transformers~=4.57`` and
patches that version's model classes, and this project pins ``transformers>=5.25``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from rlhf.models.config import LoraConfig

MERGEABLE_KINDS: tuple[str, ...] = ("lora", "dora", "ia3")
"""Kinds whose trained part folds exactly into the base weights."""


class BottleneckLinear(nn.Module, LoraLayer):
    """A bottleneck adapter after a linear layer (Houlsby et al., 2019; AdapterHub's
    sequential bottleneck): ``y = base(x)``, then ``y + up(relu(down(dropout(y))))`` with
    ``down: out -> rank`` and ``up: rank -> out`` (both with biases). ``up`` starts at 0, so a
    fresh adapter is the identity. Held in peft's LoRA slots (``lora_A`` = down, ``lora_B`` =
    up) so that peft's state dicts, ``disable_adapter`` and trainable-parameter marking treat
    it as any adapter; it cannot be merged into the linear (it is nonlinear)."""

    unmergeable = True  # read by rlhf.models.packed and rlhf.ppo.rollout.merged_lora
    activation = staticmethod(torch.relu)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, config=config)

    def update_layer(self, adapter_name: str, r: int, config=None, **kwargs: Any) -> None:
        if r <= 0:
            raise ValueError(f"a bottleneck adapter needs rank >= 1, got {r}")
        dropout = config.lora_dropout if config is not None else 0.0
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = r
        self.scaling[adapter_name] = 1.0
        self.lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        down, up = nn.Linear(self.out_features, r), nn.Linear(r, self.out_features)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = down, up
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_A.keys():
                continue
            down, up = self.lora_A[adapter], self.lora_B[adapter]
            h = self.lora_dropout[adapter](result.to(down.weight.dtype))
            result = result + up(self.activation(down(h))).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError("a bottleneck adapter is nonlinear and cannot be merged into its linear layer")

    def unmerge(self) -> None:
        pass

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise ValueError("a bottleneck adapter has no weight delta")

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


def peft_config_of(cfg: LoraConfig, model: nn.Module, task_type: str | None):
    """The peft config that builds ``cfg.kind`` on ``model``."""
    from peft import BeftConfig, IA3Config
    from peft import LoraConfig as PeftLoraConfig

    targets = list(cfg.target_modules)
    if cfg.kind == "ia3":
        return IA3Config(target_modules=targets, feedforward_modules=list(cfg.ia3_feedforward), task_type=task_type)
    if cfg.kind == "bitfit":
        if cfg.bias_terms == "existing":
            targets = _linears_with_bias(model, cfg)
        return BeftConfig(target_modules=targets, task_type=task_type)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none",
        task_type=task_type, use_dora=cfg.kind == "dora",
    )
    if cfg.kind == "bottleneck":
        peft_cfg._register_custom_module({nn.Linear: BottleneckLinear})
    return peft_cfg


def _linears_with_bias(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Full names of the target linears that have a bias; refuses a model without any."""
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.bias is not None and name.rsplit(".", 1)[-1] in cfg.target_modules
    ]
    if not names:
        raise ValueError(
            f"lora.bias_terms='existing': none of target_modules {list(cfg.target_modules)} has a bias in this model "
            "(Llama-family linears have none); use bias_terms='add' to train biases created at 0, or another kind"
        )
    return names


def apply_peft(model: nn.Module, cfg: LoraConfig, task_type: str | None = "CAUSAL_LM") -> PeftModel:
    """Wrap ``model`` with a fresh PEFT part of ``cfg.kind`` (base weights frozen, the PEFT
    part trainable), seeded by ``cfg.seed`` without advancing the caller's RNG."""
    from peft import get_peft_model

    peft_cfg = peft_config_of(cfg, model, task_type)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*base layer has no bias.*")  # bitfit on bias-free linears
        torch.manual_seed(cfg.seed)
        try:
            peft_model = get_peft_model(model, peft_cfg)
        except ValueError as e:
            if "arget modules" not in str(e):
                raise
            raise ValueError(f"lora.target_modules {list(cfg.target_modules)} (kind={cfg.kind!r}): {e}") from e
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ValueError(f"lora.target_modules {list(cfg.target_modules)} matched no layer for kind={cfg.kind!r}")
    return peft_model


def kind_of(model: nn.Module) -> str | None:
    """The PEFT kind of a model built by :func:`apply_peft`; None without a PEFT part."""
    if not isinstance(model, PeftModel):
        return None
    config = model.peft_config[model.active_adapter]
    peft_type = str(getattr(config.peft_type, "value", config.peft_type)).upper()
    if peft_type == "IA3":
        return "ia3"
    if peft_type == "BEFT":
        return "bitfit"
    if getattr(config, "_custom_modules", None):
        return "bottleneck"
    return "dora" if getattr(config, "use_dora", False) else "lora"


def can_merge(model: nn.Module) -> bool:
    """Whether the model's PEFT part folds exactly into its base weights (see the module doc)."""
    return kind_of(model) in MERGEABLE_KINDS


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The trainable tensors by peft's names (what a push and a saved adapter carry); views."""
    from peft import get_peft_model_state_dict

    return dict(get_peft_model_state_dict(model))


def adapter_parameters(model: PeftModel) -> dict[str, nn.Parameter]:
    """The live parameters behind :func:`adapter_state`, by the same names: what an update
    writes into (matched by storage, since peft renames some, e.g. DoRA's magnitudes)."""
    by_storage = {(p.data_ptr(), tuple(p.shape)): p for p in model.parameters()}
    out: dict[str, nn.Parameter] = {}
    for name, tensor in adapter_state(model).items():
        param = by_storage.get((tensor.data_ptr(), tuple(tensor.shape)))
        if param is None:
            raise ValueError(f"{name}: the adapter state names a tensor that is not a parameter of the model")
        out[name] = param
    return out


def load_adapter_state(model: PeftModel, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors written from :func:`adapter_state` into ``model`` (same kind and config):
    every name and shape must match."""
    targets = adapter_parameters(model)
    if tensors.keys() != targets.keys():
        missing, unknown = sorted(targets.keys() - tensors.keys()), sorted(tensors.keys() - targets.keys())
        raise ValueError(f"adapter tensors do not fit the model: missing {missing[:3]}, unexpected {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if targets[name].shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match {tuple(targets[name].shape)}")
            targets[name].copy_(tensor)


def trainable_count(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_trainable_count(model: nn.Module, cfg: LoraConfig) -> int:
    """What ``cfg.kind`` should train on ``model`` (a model without the PEFT part), counted from
    the target linears' shapes: the check the tests hold each kind to."""
    linears = [(name.rsplit(".", 1)[-1], m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    targets = [(short, m) for short, m in linears if short in cfg.target_modules]
    if cfg.kind == "bitfit" and cfg.bias_terms == "existing":
        targets = [(short, m) for short, m in targets if m.bias is not None]
    total = 0
    for short, m in targets:
        i, o, r = m.in_features, m.out_features, cfg.rank
        total += {
            "lora": r * (i + o),
            "dora": r * (i + o) + o,
            "ia3": i if short in cfg.ia3_feedforward else o,
            "bitfit": o,
            "bottleneck": o * r + r + r * o + o,
        }[cfg.kind]
    return total
