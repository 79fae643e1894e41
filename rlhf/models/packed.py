"""Linear layers that run on oneDNN with prepacked weights on the CPU at fp32.

PyTorch sends a CPU ``nn.Linear`` to the BLAS (MKL in the official wheels). On the AMD EPYC
CPUs of our machines MKL's fp32 GEMM is slow for the few rows of a decoding step: 8 rows
through SmolLM2-135M's 210 decoder matrices take about 58 ms on one thread, 7 GB/s of weight
traffic where a plain read of the same bytes runs at 29 GB/s. oneDNN, which PyTorch also
ships, takes about 33 ms for the same products once each weight is reordered ("packed") into
its blocked layout, 8 vs 19 ms for the 49152 x 576 LM head, and 10-20% less than MKL for the
hundreds of rows of a training or scoring pass. It also uses a second thread where MKL does
not at these sizes. Values are the same fp32 products up to summation order (relative
differences around 1e-7, as between any two BLAS), deterministic, and a row's result does not
depend on the other rows of the batch.

How weights get packed:

- **Frozen weights** (``requires_grad`` false: a LoRA policy's base weights and tied LM head,
  the frozen reference copy under full fine-tuning) are packed on first use and kept, keyed by
  the weight's storage address and version counter, so an in-place change made through the
  tensor (``copy_``, ``load_state_dict``, an optimiser) repacks. A change made through
  ``.data`` does not move the version counter: call :func:`forget_packs` after one.
- **Trained weights** never take the packed path while gradients are on (their weight
  gradient needs the plain product). A model whose weights change only through the tensors
  themselves (a ``torch.optim`` optimiser, ``load_state_dict``; the reward model) can
  :func:`keep_packs`: its no-grad passes then keep packs as frozen weights do. For a
  generation, :func:`packed_weights` packs the current *effective* weights of a model on entry
  (a trained weight as it is; a LoRA layer's base weight plus its adapters' update, computed
  out of place) and drops them on exit: decoding then runs merged-adapter products without
  touching the base weights.
- With gradients on and a frozen weight, the forward is the packed product and the backward
  gives the input's gradient ``dY @ W`` through a packed ``W^T`` (made on the first backward
  and kept like the forward pack).

Cost: one extra copy of every frozen linear weight for the forward, another for the backward
(about 0.5 GB each for SmolLM2-135M). Off the CPU, at another dtype, under ZeRO-3 (whose
weights are partitioned) or where PyTorch lacks oneDNN, a :class:`PackedLinear` is exactly
``nn.Linear``. ``ModelConfig.onednn_linear`` turns the whole thing off.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

ONEDNN_AVAILABLE: bool = bool(
    torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)
"""Whether this PyTorch build has oneDNN's packed linear (all official x86-64 and arm64 wheels)."""


def pack(weight: Tensor) -> Tensor:
    """A oneDNN-packed copy of an (out, in) weight, for :func:`packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ W^T + b`` for ``packed = pack(W)``; ``x`` is (..., in), the result (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


@dataclass
class _Pack:
    key: tuple[int, int]  # (data_ptr, _version) of the weight it was made from
    forward: Tensor  # pack(W): x @ W^T
    backward: Tensor | None = None  # pack(W^T): dY @ W, made on the first backward


# id(weight) -> (a weak reference to it, its pack); tensors compare by value, so the table is
# keyed by identity, and an entry leaves when its weight is collected
_KEPT: dict[int, tuple[weakref.ref, _Pack]] = {}


def _key(weight: Tensor) -> tuple[int, int]:
    return weight.data_ptr(), weight._version


def _kept_pack(weight: Tensor) -> _Pack:
    held = _KEPT.get(id(weight))
    if held is not None and held[0]() is weight and held[1].key == _key(weight):
        return held[1]
    entry = _Pack(_key(weight), pack(weight))
    _KEPT[id(weight)] = (weakref.ref(weight, lambda _, k=id(weight): _KEPT.pop(k, None)), entry)
    return entry


def _backward_pack(entry: _Pack, weight: Tensor) -> Tensor:
    if entry.backward is None:
        entry.backward = pack(weight.detach().t())
    return entry.backward


def forget_packs(model: nn.Module | None = None) -> None:
    """Drop the kept packs of ``model``'s weights (all packs when None). Needed only after
    changing a frozen weight through ``.data``, which its version counter does not see."""
    if model is None:
        _KEPT.clear()
        return
    for param in model.parameters():
        _KEPT.pop(id(param), None)


class _FrozenLinearFunction(torch.autograd.Function):
    """``x @ W^T + b`` with W and b frozen: gradient to ``x`` only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, entry: _Pack) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.entry = entry
        return packed_linear(x, entry.forward, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        return packed_linear(grad, _backward_pack(ctx.entry, weight)), None, None, None


class PackedLinear(nn.Linear):
    """``nn.Linear`` that runs on oneDNN with packed weights on the CPU at fp32 (see the
    module docstring). Same parameters and state dict; swapped in by class, so tied weights
    stay tied and a deep copy stays a ``PackedLinear``."""

    _inference_pack: Tensor | None = None  # set by packed_weights() for the block's duration
    keep_trained_pack: bool = False  # set by keep_packs(): no-grad passes keep a trained weight's pack

    def forward(self, x: Tensor) -> Tensor:
        if not self._applies(x):
            return F.linear(x, self.weight, self.bias)
        grad = torch.is_grad_enabled()
        if not grad and self._inference_pack is not None:
            return packed_linear(x, self._inference_pack, self.bias)
        if not self._frozen:
            if grad or not self.keep_trained_pack:
                return F.linear(x, self.weight, self.bias)
            return packed_linear(x, _kept_pack(self.weight).forward, self.bias)
        entry = _kept_pack(self.weight)
        if grad and x.requires_grad:
            return _FrozenLinearFunction.apply(x, self.weight, self.bias, entry)
        return packed_linear(x, entry.forward, self.bias)

    @property
    def _frozen(self) -> bool:
        return not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)

    def _applies(self, x: Tensor) -> bool:
        w = self.weight
        return (
            ONEDNN_AVAILABLE
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and w.dtype == torch.float32
            and w.dim() == 2
            and not hasattr(w, "ds_id")  # a ZeRO-3 partitioned parameter
        )


def use_packed_linears(model: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into a :class:`PackedLinear` in place; call
    it before adding LoRA adapters, whose own small matrices are better left plain (peft wraps
    a ``PackedLinear`` as it wraps any ``nn.Linear``). Returns how many were turned."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PackedLinear
            count += 1
    return count


def keep_packs(model: nn.Module) -> int:
    """Let the no-grad passes of ``model``'s :class:`PackedLinear` layers keep packs of their
    trained weights, remade when a weight's version counter moves. Only for a model whose
    weights change through the parameters themselves (``torch.optim`` optimisers and
    ``load_state_dict`` do; DeepSpeed's ZeRO optimisers write flat buffers and do not).
    Returns how many layers it applies to."""
    count = 0
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.keep_trained_pack = True
            count += 1
    return count


def uses_packed_linears(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is a :class:`PackedLinear` that oneDNN can run here."""
    return ONEDNN_AVAILABLE and any(isinstance(m, PackedLinear) for m in model.modules())


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _merged_weight(layer) -> Tensor | None:
    """A LoRA layer's base weight plus its active adapters' updates (out of place), or None
    when the layer has nothing active or a form this does not merge (variants such as DoRA,
    bottleneck adapters). Other PEFT kinds' layers (IA3, BitFit) are not LoRA layers: they run
    their own small products around the base layer's kept pack."""
    if layer.disable_adapters or layer.merged or getattr(layer, "unmergeable", False):
        return None  # (a bottleneck adapter sits in LoRA's slots but is no weight update)
    active = [a for a in layer.active_adapters if a in layer.lora_A.keys()]
    if not active or any(a in getattr(layer, "lora_variant", {}) for a in active):
        return None
    weight = layer.get_base_layer().weight.detach()
    for adapter in active:
        weight = weight + layer.get_delta_weight(adapter).detach()
    return weight


@contextlib.contextmanager
def packed_weights(model: nn.Module) -> Iterator[None]:
    """For a block of no-grad forwards (a generation): every :class:`PackedLinear` of
    ``model`` that trains, or is the base of a LoRA layer with active adapters, runs on a pack
    of its current effective weight, made here and dropped on exit. LoRA layers skip their
    adapter products inside the block (the pack holds ``W + scale * B @ A``); the base weights
    are never written. Frozen layers use their kept packs as always."""
    routed: list[nn.Module] = []  # LoRA layers whose forward goes straight to the base layer
    packed: list[PackedLinear] = []
    try:
        for layer in _lora_layers(model):
            base = layer.get_base_layer()
            if not isinstance(base, PackedLinear):
                continue
            merged = _merged_weight(layer)
            if merged is None:
                continue
            base._inference_pack = pack(merged)
            packed.append(base)
            layer.forward = base.forward  # instance attribute: only the base layer's product
            routed.append(layer)
        for module in model.modules():
            if isinstance(module, PackedLinear) and module._inference_pack is None and not module._frozen:
                module._inference_pack = pack(module.weight)
                packed.append(module)
        yield
    finally:
        for layer in routed:
            del layer.forward
        for module in packed:
            module._inference_pack = None
