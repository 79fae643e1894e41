"""Weight updates as one contiguous byte buffer plus a small index (no Ray here).

Ray pickles a torch tensor through `torch.save` of its storage, about 0.1 ms per tensor
each way whatever its size; an adapter update of SmolLM2-135M has 240 small tensors, so
that alone cost more than moving its bytes. `pack_tensors` copies the tensors, in order,
into one uint8 buffer (each at an offset aligned to its element size) and describes them
in an index of (name, dtype, shape, offset). The buffer is a NumPy array, which Ray's
object store holds and hands out without copying; `unpack_tensors` checks the index
against the buffer and returns views into it, so the receiver copies each tensor exactly
once, into its own weights.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

PACK_ON_DEVICE_BYTES = 256 * 2**20
"""Tensors on an accelerator are packed there (then moved in one transfer) up to this size."""


@dataclass(frozen=True)
class PackedTensors:
    """Tensors packed into `buffer` (1-D uint8) as `index` describes: (name, dtype, shape, offset)."""

    index: tuple[tuple[str, str, tuple[int, ...], int], ...]
    buffer: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"packed tensors: unknown dtype {name!r}")
    return dtype


def _layout(entries) -> tuple[list[int], int]:
    """Offsets of tensors of these (dtype, shape)s packed in order, and the buffer's length."""
    offsets, end = [], 0
    for dtype, shape in entries:
        size = dtype.itemsize
        end += -end % size  # aligned to the element size, so a slice can be viewed as the dtype
        offsets.append(end)
        end += math.prod(shape) * size
    return offsets, end


def pack_tensors(tensors: Mapping[str, torch.Tensor]) -> PackedTensors:
    """Copy `tensors` (any device, any layout) into one CPU buffer, in their order."""
    items = [(name, t.detach()) for name, t in tensors.items()]
    offsets, total = _layout((t.dtype, tuple(t.shape)) for _, t in items)
    index = tuple((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset) for (name, t), offset in zip(items, offsets))
    dtypes, devices = {t.dtype for _, t in items}, {t.device for _, t in items}
    # packed where the tensors are (one transfer to the CPU at the end), unless that would
    # take a large second copy of them in accelerator memory
    device = devices.pop() if len(devices) == 1 else torch.device("cpu")
    if device.type != "cpu" and total > PACK_ON_DEVICE_BYTES:
        device = torch.device("cpu")
    if len(dtypes) == 1 and all(t.device == device for _, t in items):  # one dtype: no padding, one concatenation
        buf = torch.cat([t.reshape(-1) for _, t in items]).view(torch.uint8)
    else:
        buf = torch.empty(total, dtype=torch.uint8, device=device)
        for (_, t), offset in zip(items, offsets):
            buf[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)
    return PackedTensors(index, buf.cpu().numpy())


def unpack_tensors(packed: PackedTensors) -> dict[str, torch.Tensor]:
    """Views of the packed tensors (read them, do not write them); refuses an index that does not describe the buffer."""
    buffer = packed.buffer
    if not isinstance(buffer, np.ndarray) or buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise ValueError("packed tensors: the buffer must be a 1-D uint8 array")
    try:
        names = [name for name, _, _, _ in packed.index]
        entries = [(_dtype(dtype), tuple(int(n) for n in shape)) for _, dtype, shape, _ in packed.index]
    except (TypeError, ValueError) as e:
        raise ValueError(f"packed tensors: bad index entry ({e})") from None
    if not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
        raise ValueError("packed tensors: the names in the index must be distinct strings")
    if any(n < 0 for _, shape in entries for n in shape):
        raise ValueError("packed tensors: a negative dimension in the index")
    offsets, total = _layout(entries)
    if [entry[3] for entry in packed.index] != offsets or total != buffer.nbytes:
        raise ValueError(f"packed tensors: the index does not describe the buffer ({total} bytes expected, {buffer.nbytes} given)")
    with warnings.catch_warnings():  # an object-store buffer is read-only; the views are only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        flat = torch.from_numpy(buffer)
    if len({dtype for dtype, _ in entries}) == 1:  # one dtype: no padding, one split
        dtype = entries[0][0]
        parts = flat.view(dtype).split([math.prod(shape) for _, shape in entries])
        return {name: part.view(shape) for name, part, (_, shape) in zip(names, parts, entries)}
    return {
        name: flat[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for name, (dtype, shape), offset in zip(names, entries, offsets)
    }
