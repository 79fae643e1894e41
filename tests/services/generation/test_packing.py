"""Weight updates packed into one buffer plus an index: exact round trips, refused mismatches."""

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from rlhf.models import LoraConfig, ModelConfig
from services.generation.engine import PolicyEngine, WeightUpdate
from services.generation.packing import PackedTensors, pack_tensors, unpack_tensors


def mixed():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "b.scale": torch.tensor(1.25, dtype=torch.bfloat16),  # 0-dim, 2-byte element at an odd offset
        "c.empty": torch.zeros(0, 4),
        "d.steps": torch.arange(-3, 4, dtype=torch.int64),  # needs 8-byte alignment after the 2-byte one
        "e.transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "f.mask": torch.tensor([True, False, True]),
        "g.half": torch.randn(2, 2, generator=g).half(),
    }


def same_dtype():
    g = torch.Generator().manual_seed(1)
    return {f"layers.{i}.lora_{ab}.weight": torch.randn(*shape, generator=g)
            for i in range(3) for ab, shape in (("A", (8, 16)), ("B", (16, 8)))} | {"scalar": torch.tensor(-0.5)}


def through_the_store(packed: PackedTensors) -> PackedTensors:
    """What a receiver gets: pickled with out-of-band buffers, as Ray does, and read-only."""
    buffers = []
    data = pickle.dumps(packed, protocol=5, buffer_callback=buffers.append)
    received = pickle.loads(data, buffers=[bytes(b.raw()) for b in buffers])
    assert not received.buffer.flags.writeable
    return received


@pytest.mark.parametrize("make", [mixed, same_dtype], ids=["mixed dtypes", "one dtype"])
def test_round_trip_is_exact(make):
    tensors = make()
    packed = pack_tensors(tensors)
    assert packed.buffer.dtype == np.uint8 and packed.buffer.ndim == 1
    assert packed.nbytes < sum(t.numel() * t.element_size() for t in tensors.values()) + 8 * len(tensors)  # the same bytes, little padding
    out = unpack_tensors(through_the_store(packed))
    assert list(out) == list(tensors)  # order kept
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
        assert torch.equal(out[name], t), name
        assert out[name].view(-1).view(torch.uint8).numpy().tobytes() == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def test_one_dtype_packs_without_padding():
    tensors = same_dtype()
    packed = pack_tensors(tensors)
    assert packed.nbytes == sum(t.numel() * 4 for t in tensors.values())
    offsets = [offset for _, _, _, offset in packed.index]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_unpacked_tensors_are_views_of_the_buffer():
    packed = pack_tensors(same_dtype())
    out = unpack_tensors(packed)
    start = packed.buffer.ctypes.data
    for name, _, _, offset in packed.index:
        assert out[name].data_ptr() == start + offset


def test_empty_update_round_trips():
    assert unpack_tensors(through_the_store(pack_tensors({}))) == {}


def entry_changed(packed: PackedTensors, i: int, **change) -> PackedTensors:
    name, dtype, shape, offset = packed.index[i]
    fields = {"name": name, "dtype": dtype, "shape": shape, "offset": offset} | change
    index = list(packed.index)
    index[i] = (fields["name"], fields["dtype"], fields["shape"], fields["offset"])
    return dataclasses.replace(packed, index=tuple(index))


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda p: entry_changed(p, 0, shape=(3, 6)), id="shape larger than its bytes"),
        pytest.param(lambda p: entry_changed(p, 0, shape=(3, 4)), id="shape smaller than its bytes"),
        pytest.param(lambda p: entry_changed(p, 1, offset=p.index[1][3] + 2), id="offset moved"),
        pytest.param(lambda p: entry_changed(p, 3, dtype="int32"), id="dtype of another size"),
        pytest.param(lambda p: entry_changed(p, 0, dtype="Tensor"), id="not a dtype"),
        pytest.param(lambda p: entry_changed(p, 0, shape=(-3, -5)), id="negative dimensions"),
        pytest.param(lambda p: entry_changed(p, 1, name="a.weight"), id="a name twice"),
        pytest.param(lambda p: entry_changed(p, 1, name=7), id="a name not a string"),
        pytest.param(lambda p: dataclasses.replace(p, index=p.index[:-1]), id="an entry missing"),
        pytest.param(lambda p: dataclasses.replace(p, index=p.index + (("h", "float32", (1,), p.nbytes),)), id="an entry extra"),
        pytest.param(lambda p: dataclasses.replace(p, index=p.index[:2] + ((1, 2),) + p.index[3:]), id="a malformed entry"),
        pytest.param(lambda p: dataclasses.replace(p, buffer=p.buffer[:-1]), id="buffer truncated"),
        pytest.param(lambda p: dataclasses.replace(p, buffer=np.concatenate([p.buffer, np.zeros(8, np.uint8)])), id="buffer too long"),
        pytest.param(lambda p: dataclasses.replace(p, buffer=p.buffer.view(np.int8)), id="buffer not uint8"),
        pytest.param(lambda p: dataclasses.replace(p, buffer=p.buffer[:-2].reshape(2, -1)), id="buffer not 1-D"),
    ],
)
def test_an_index_that_does_not_describe_the_buffer_is_refused(spoil):
    packed = pack_tensors(mixed())
    unpack_tensors(packed)  # the unspoilt one is fine
    with pytest.raises(ValueError, match="packed tensors"):
        unpack_tensors(spoil(packed))


def test_a_refused_update_leaves_the_engine_untouched():
    """Unpacking checks everything before the engine copies anything: nothing half-applies."""
    engine = PolicyEngine(ModelConfig(source="tiny"), LoraConfig(enabled=True))
    before = {k: v.clone() for k, v in engine.weights().items()}
    new = {k: v + 1.0 for k, v in before.items()}
    packed = pack_tensors(new)
    bad = dataclasses.replace(packed, index=packed.index[:-1] + ((packed.index[-1][0], "float32", (1, 1), packed.index[-1][3]),))
    with pytest.raises(ValueError):
        engine.load_weights(WeightUpdate(1, unpack_tensors(through_the_store(bad)), adapters_only=True))
    assert engine.version == 0
    assert all(torch.equal(engine.weights()[k], v) for k, v in before.items())
    engine.load_weights(WeightUpdate(1, unpack_tensors(through_the_store(packed)), adapters_only=True))
    assert engine.version == 1
    assert all(torch.equal(engine.weights()[k], v) for k, v in new.items())


def test_a_full_update_reaches_the_served_outputs():
    """A full-model engine keeps oneDNN packs of its weights between updates on the CPU; an
    update must reach the next forward (the packs follow the copied parameters)."""
    engine = PolicyEngine(ModelConfig(source="tiny"), None)
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        before = engine.model(input_ids=ids).logits
        g = torch.Generator().manual_seed(1)
        new = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in engine.weights().items()}
        engine.load_weights(WeightUpdate(1, new, adapters_only=False))
        after = engine.model(input_ids=ids).logits
        fresh = PolicyEngine(ModelConfig(source="tiny", onednn_linear=False), None)
        fresh.model.load_state_dict(new)
        expected = fresh.model(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=1e-4)
