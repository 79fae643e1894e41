"""SFT tests run like the PPO tests: DeepSpeed on the CPU unless a GPU is present, one torch
thread per process (the PPO tests' conftest sets both)."""

from tests.rlhf.ppo.conftest import _one_torch_thread  # noqa: F401  (an autouse fixture)
