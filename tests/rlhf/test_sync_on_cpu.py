"""The weight-sync group (rlhf/sync.py) between real processes over gloo: layouts, pushes
whole and in order, a layout mismatch refused at join, an idle receiver that keeps waiting."""

from __future__ import annotations

import multiprocessing as mp
import socket
import traceback

import pytest
import torch

from rlhf.sync import SyncGroup, SyncGroupError, WeightLayout

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensors(version: int, extra: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(version)
    out = {
        "layer.0.lora_A": torch.randn(4, 16, generator=g),
        "layer.0.lora_B": torch.randn(16, 4, generator=g),
        "head.bias": torch.randn(7, generator=g).to(torch.float64),
        "step": torch.tensor([version], dtype=torch.int64),
    }
    if extra:
        out["layer.1.lora_A"] = torch.randn(4, 16, generator=g)
    return out


def _member(rank: int, world: int, port: int, versions: list[int], extra: bool, out, fail_at: int = 0,
            backend: str = "gloo") -> None:
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        layout = WeightLayout.of(_tensors(0, extra=extra and rank == world - 1), bucket_bytes=300)
        group = SyncGroup.join("127.0.0.1", port, rank, world, layout, backend, timeout_s=60, device=device)
        got = []
        if rank == 0:
            for v in versions:
                group.send(v, {k: t.to(device) for k, t in _tensors(v).items()})
        else:
            def apply(version, tensors):
                if version == fail_at and rank == world - 1:
                    raise ValueError("this engine cannot take the update")
                expected = _tensors(version)
                got.append((version, all(torch.equal(tensors[k].cpu(), expected[k]) for k in expected)))

            for _ in versions:
                group.receive(apply)
        out.put((rank, "ok", got))
    except Exception as err:  # noqa: BLE001 - reported to the test
        out.put((rank, type(err).__name__, str(err) + traceback.format_exc()[-500:]))


def _run(world: int, versions: list[int], extra: bool = False, fail_at: int = 0, backend: str = "gloo") -> dict[int, tuple]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_member, args=(r, world, port, versions, extra, out, fail_at, backend)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, status, detail = out.get(timeout=120)
        results[rank] = (status, detail)
    for p in procs:
        p.join(30)
    return results


def test_a_layout_cuts_buckets_per_dtype_and_round_trips():
    tensors = _tensors(3)
    layout = WeightLayout.of(tensors, bucket_bytes=300)
    assert [b.dtype for b in layout.buckets] == ["float32", "float32", "float64", "int64"]  # 64+64 floats: two buckets
    flats = layout.flat_buffers()
    layout.pack(tensors, flats)
    views = layout.views(flats)
    assert all(torch.equal(views[k], tensors[k]) for k in tensors)
    assert layout.digest() == WeightLayout.of(_tensors(9), bucket_bytes=300).digest()  # values do not matter
    assert layout.digest() != WeightLayout.of(_tensors(3, extra=True)).digest()
    with pytest.raises(SyncGroupError, match="exactly the layout's 4 tensors"):
        layout.pack({k: v for k, v in tensors.items() if k != "step"}, flats)
    with pytest.raises(SyncGroupError, match="shape"):
        layout.pack({**tensors, "head.bias": torch.zeros(8, dtype=torch.float64)}, flats)


def test_pushes_reach_every_member_whole_and_in_order():
    results = _run(3, [1, 2, 5])
    assert results[0] == ("ok", [])
    for rank in (1, 2):
        assert results[rank] == ("ok", [(1, True), (2, True), (5, True)]), results[rank]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the NCCL group needs two GPUs (one rank each); none here")
def test_pushes_over_nccl_reach_every_member_whole():
    """The GPU path's contract (NCCL refuses two ranks on one device): runs where two GPUs are."""
    results = _run(2, [1, 2], backend="nccl")
    assert results[0] == ("ok", []) and results[1] == ("ok", [(1, True), (2, True)]), results


def test_members_with_different_tensors_cannot_join():
    results = _run(2, [1], extra=True)
    assert {status for status, _ in results.values()} == {"SyncGroupError"}
    assert all("layouts differ" in detail for _, detail in results.values())


def test_a_member_that_cannot_apply_a_push_fails_it_for_everyone():
    results = _run(3, [1, 2], fail_at=2)
    assert results[0][0] == "SyncGroupError" and "push 2 failed" in results[0][1]
    assert results[1][0] == "SyncGroupError"  # it applied version 2, but the push as a whole failed
    assert results[2][0] == "ValueError"


def test_a_waiting_member_stops_when_asked():
    import threading

    port = _free_port()
    layout = WeightLayout.of(_tensors(0), bucket_bytes=300)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    sender = ctx.Process(target=_member, args=(0, 2, port, [], False, out))
    sender.start()  # joins, sends nothing, reports
    group = SyncGroup.join("127.0.0.1", port, 1, 2, layout, timeout_s=60)
    result = []
    waiter = threading.Thread(target=lambda: result.append(group.receive(lambda v, t: None)))
    waiter.start()
    group.stop_receiving()
    waiter.join(30)
    assert result == [None]
    assert out.get(timeout=60) == (0, "ok", [])
    sender.join(30)
