"""Where a role computes, decided in one place.

    device = role_device(gpus=len(ray.get_gpu_ids()), simulated=cluster.simulate_gpus)

A process given GPUs computes on its first visible GPU (the launcher, Ray here, sets
CUDA_VISIBLE_DEVICES to the GPUs it was given); a process given none computes on the CPU.
A process given GPUs that torch cannot see is an error, not a silent fall back to the CPU:
a GPU profile on a CPU build of torch would otherwise run, hours slower, on CPU cores. The
one exception is a simulated cluster (tests on a CPU machine whose nodes declare GPUs they
do not have), where `simulated` says that the GPUs are labels for placement only.
"""

from __future__ import annotations

import torch


class DeviceError(RuntimeError):
    """A role was given GPUs that this process cannot use."""


def role_device(gpus: float, simulated: bool = False) -> torch.device:
    """The device of a process that was given ``gpus`` GPUs (fractions share one)."""
    if gpus <= 0 or simulated:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"this process was given {gpus:g} GPU(s) but torch {torch.__version__} sees none "
            f"(torch.cuda.is_available() is False): install torch's CUDA build in the image, or for a CPU-only "
            f"test cluster set cluster.simulate_gpus: true"
        )
    return torch.device("cuda", 0)

