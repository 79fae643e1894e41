"""How many CPU threads torch uses in a process of the loop."""

from __future__ import annotations


def set_torch_threads(requested: int | None, reserved_cpus: float) -> int:
    """Set torch's intra-op threads: ``requested`` when given, else the whole CPUs the process
    reserved (at least 1). Returns the number set."""
    import torch

    threads = requested if requested is not None else max(1, int(reserved_cpus))
    torch.set_num_threads(threads)
    return threads
