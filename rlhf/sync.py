"""The weight-sync group: new policy weights from trainer rank 0 to the generation engines over
torch.distributed, never through a driver or an object store.

    group = SyncGroup.join(host, port, rank, world, layout, backend="gloo")   # every member at once
    group.send(version, tensors)                  # rank 0 (the trainer): one push
    group.receive(apply)                          # ranks 1.. (the engines): blocks until a push

The group is its own process group (a gloo or NCCL backend over a TCPStore that rank 0
hosts), apart from the trainers' default group, so engines never join the trainers' world.
Members agree on the tensors when they join (each publishes its layout's digest; all refuse
to join unless all agree). A push is: a header in the store under the next version's key,
the tensors as a few flat buckets broadcast from rank 0 (one per dtype, cut at
`bucket_bytes`), then an all-reduce of one number by which every receiver reports that it
has applied the whole version (so `send` returns once every engine serves it). Receivers
block in one store read of the next key (no polling, so an idle group costs nothing and
never times out); a member stops waiting when it writes that
key itself (`stop_receiving`), and fails when rank 0, the store's host, is gone.

No Ray here: the engine and trainer actors decide who joins, this module moves the bytes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

HEADER = "hitl/push/{n}"  # the n-th push of the group
DEFAULT_BUCKET_BYTES = 256 * 2**20
PRUNE_EVERY = 64  # rank 0 deletes read headers in batches of this many
IDLE_TIMEOUT = datetime.timedelta(days=365)  # how long a receiver waits for the next push


class SyncGroupError(RuntimeError):
    """The group cannot carry a push (a member left, a layout mismatch, a timeout)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "float32"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class Slot:
    spec: TensorSpec
    offset: int  # in elements, within its bucket


@dataclass(frozen=True)
class Bucket:
    dtype: str
    numel: int
    slots: tuple[Slot, ...]


@dataclass(frozen=True)
class WeightLayout:
    """Where each tensor of a push lies: buckets of one dtype each, tensors in name order."""

    specs: tuple[TensorSpec, ...]
    buckets: tuple[Bucket, ...]

    @classmethod
    def of(cls, tensors: Mapping[str, Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> "WeightLayout":
        specs = tuple(TensorSpec(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in sorted(tensors.items()))
        return cls.from_specs(specs, bucket_bytes)

    @classmethod
    def from_specs(cls, specs: tuple[TensorSpec, ...], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> "WeightLayout":
        buckets: list[Bucket] = []
        for dtype in sorted({s.dtype for s in specs}):
            size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
            slots: list[Slot] = []
            offset = 0
            for spec in (s for s in specs if s.dtype == dtype):
                if slots and (offset + spec.numel) * size > bucket_bytes:
                    buckets.append(Bucket(dtype, offset, tuple(slots)))
                    slots, offset = [], 0
                slots.append(Slot(spec, offset))
                offset += spec.numel
            if slots:
                buckets.append(Bucket(dtype, offset, tuple(slots)))
        return cls(specs, tuple(buckets))

    @property
    def nbytes(self) -> int:
        return sum(b.numel * torch.empty((), dtype=getattr(torch, b.dtype)).element_size() for b in self.buckets)

    def digest(self) -> str:
        """Names, shapes, dtypes and the cut into buckets: members with equal digests exchange
        the same bytes in the same places."""
        body = json.dumps([[[s.name, list(s.shape), s.dtype] for s in self.specs],
                           [[b.dtype, b.numel] for b in self.buckets]]).encode()
        return hashlib.sha256(body).hexdigest()[:16]

    def flat_buffers(self, device: torch.device | str = "cpu") -> list[Tensor]:
        return [torch.empty(b.numel, dtype=getattr(torch, b.dtype), device=device) for b in self.buckets]

    def pack(self, tensors: Mapping[str, Tensor], out: list[Tensor], views: Mapping[str, Tensor] | None = None) -> None:
        """Copy `tensors` into the flat buffers `out` (from `flat_buffers`; `views`, its
        `views(out)`, when the caller keeps them: one fused copy instead of one per tensor)."""
        if len(tensors) != len(self.specs) or any(s.name not in tensors for s in self.specs):
            missing = [s.name for s in self.specs if s.name not in tensors]
            raise SyncGroupError(f"a push must carry exactly the layout's {len(self.specs)} tensors; missing {missing[:3]}")
        for spec in self.specs:
            if tuple(tensors[spec.name].shape) != spec.shape:
                raise SyncGroupError(f"{spec.name}: shape {tuple(tensors[spec.name].shape)}, the layout says {spec.shape}")
        views = views if views is not None else self.views(out)
        names = [s.name for s in self.specs]
        torch._foreach_copy_([views[n] for n in names], [tensors[n] for n in names], non_blocking=True)

    def views(self, flats: list[Tensor]) -> dict[str, Tensor]:
        """Each tensor as a view into the flat buffers (no copy)."""
        out = {}
        for bucket, flat in zip(self.buckets, flats):
            for slot in bucket.slots:
                out[slot.spec.name] = flat[slot.offset : slot.offset + slot.spec.numel].view(slot.spec.shape)
        return out


def _make_backend(backend: str, store, rank: int, world: int, timeout: datetime.timedelta):
    import torch.distributed as dist

    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world, options)
    raise ValueError(f"backend: 'gloo' or 'nccl', got {backend!r}")


def _agree_on_layout(store, rank: int, world: int, digest: str) -> None:
    """Every member publishes its layout's digest; all of them fail to join unless all agree."""
    store.set(f"layout/{rank}", digest)
    keys = [f"layout/{r}" for r in range(world)]
    store.wait(keys)
    digests = {r: store.get(k).decode() for r, k in enumerate(keys)}
    if len(set(digests.values())) != 1:
        raise SyncGroupError(f"the members' weight layouts differ (rank: digest {digests}): they do not serve the same policy")


class SyncGroup:
    """One member of a weight-sync group (see the module docstring)."""

    def __init__(self, store, backend, rank: int, world: int, layout: WeightLayout, device: torch.device, name: str,
                 address: tuple[str, int] = ("", 0)):
        self.store, self.backend, self.rank, self.world = store, backend, rank, world
        self.address = address  # the store's host and port
        self.layout, self.device, self.name = layout, device, name
        self._flats = layout.flat_buffers(device)
        self._views = layout.views(self._flats)  # made once: a push fills and reads them in place
        self._digest = layout.digest()
        self.last_version = 0
        self.pushes = 0

    @classmethod
    def join(cls, host: str, port: int, rank: int, world: int, layout: WeightLayout, backend: str = "gloo",
             timeout_s: float = 300.0, name: str = "hitl-sync", device: torch.device | str = "cpu") -> "SyncGroup":
        """Join the group; every member must call this at about the same time (rank 0 hosts the store)."""
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
        prefixed = dist.PrefixStore(name, store)
        _agree_on_layout(prefixed, rank, world, layout.digest())
        pg = _make_backend(backend, prefixed, rank, world, timeout)
        if rank != 0:  # a receiver blocks in one store read until the next push (a timed-out read breaks the client)
            prefixed.set_timeout(IDLE_TIMEOUT)
        return cls(prefixed, pg, rank, world, layout, torch.device(device), name, (host, port))

    # -- rank 0 ---------------------------------------------------------------------

    def send(self, version: int, tensors: Mapping[str, Tensor]) -> None:
        """Push `tensors` as `version` to every member; returns once all of them applied it."""
        if self.rank != 0:
            raise SyncGroupError("only rank 0 sends")
        if version <= self.last_version:
            raise SyncGroupError(f"version {version} is not newer than {self.last_version}")
        self.layout.pack(tensors, self._flats, self._views)
        self.store.set(HEADER.format(n=self.pushes + 1), json.dumps({"version": version, "digest": self._digest}))
        self._transfer()
        self._confirm(version)
        self.pushes += 1
        self.last_version = version
        if self.pushes % PRUNE_EVERY == 0:  # every member has read these headers: drop them, off the per-push path
            for n in range(self.pushes - PRUNE_EVERY + 1, self.pushes + 1):
                self.store.delete_key(HEADER.format(n=n))

    # -- ranks 1.. ------------------------------------------------------------------

    def receive(self, apply: Callable[[int, dict[str, Tensor]], None]) -> int | None:
        """Wait for the next push and hand it to ``apply(version, tensors)`` (the tensors are
        views into this member's buffers, valid until the next receive) before confirming it,
        so the sender's `send` returns only once every member has applied it. Returns the
        version, or None once `stop_receiving` was called. If ``apply`` raises, the push
        fails on every member and the error is raised here."""
        key = HEADER.format(n=self.pushes + 1)
        try:
            # one blocking read: the receivers' store client never times out (see `join`)
            header = json.loads(self.store.get(key))
        except RuntimeError as err:
            raise SyncGroupError(f"the sync group's store is gone (trainer rank 0 left): {err}") from err
        if header.get("stop") == self.rank:
            return None
        version = int(header["version"])
        if header.get("digest") != self._digest:  # cannot happen after join's check: fail loudly if it does
            raise SyncGroupError(f"push {version}: layout {header.get('digest')}, this member's is {self._digest}")
        self._transfer()
        try:
            apply(version, self._views)
        except Exception:
            self._confirm(version, ok=False, check=False)  # the others learn of it; this member raises its own error
            raise
        self._confirm(version)
        self.pushes += 1
        self.last_version = version
        return version

    def stop_receiving(self) -> None:
        """Make this member's pending `receive` (on another thread) return None. Only when the
        group is being replaced: a push that comes after this would wait for this member.
        Writes through a connection of its own (the waiting one is busy)."""
        import torch.distributed as dist

        try:
            client = dist.TCPStore(self.address[0], self.address[1], is_master=False, timeout=datetime.timedelta(seconds=30))
            dist.PrefixStore(self.name, client).compare_set(HEADER.format(n=self.pushes + 1), "", json.dumps({"stop": self.rank}))
        except RuntimeError:  # the store is gone already: the receive has failed or will
            pass

    # -- both -----------------------------------------------------------------------

    def _transfer(self) -> None:
        for flat in self._flats:
            self.backend.broadcast(flat, 0).wait()

    def _confirm(self, version: int, ok: bool = True, check: bool = True) -> None:
        """Every member says whether it holds the push; a member that does not fails it for all."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=self.device)
        import torch.distributed as dist

        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.backend.allreduce([flag], opts).wait()
        if check and int(flag.item()) != 1:
            raise SyncGroupError(f"push {version} failed on a member of the sync group")
