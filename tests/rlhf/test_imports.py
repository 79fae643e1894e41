"""``rlhf/`` is the Ray-free core: importing every module of it loads neither Ray nor gRPC."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import importlib, pkgutil, sys
import rlhf
names = [m.name for m in pkgutil.walk_packages(rlhf.__path__, "rlhf.")]
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "grpc"))
print(len(names), loaded)
"""


def test_rlhf_imports_neither_ray_nor_grpc() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, check=True)
    count, loaded = result.stdout.strip().split(" ", 1)
    assert int(count) >= 10  # the walk really found the package's modules
    assert loaded == "[]", loaded
