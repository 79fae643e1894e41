"""The layout rule: imports point one way, cli -> actors -> services -> rlhf.

* ``rlhf/`` (the Ray-free core) imports neither Ray, gRPC, ``services`` nor ``actors``;
* ``services/`` imports no ``actors``;
* only ``hitl/cli.py`` imports the command modules of every layer (nothing imports it);
* nothing in the project reads a path outside the repository (a sibling folder of the
  checkout, say: a user's clone has nothing beside it).

Every import statement counts, module-level or inside a function (the code imports Ray and
DeepSpeed where they are used), so the scan reads the source; a probe also imports every
module of ``rlhf`` and checks what that loaded.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "rlhf": ("ray", "grpc", "grpc_health", "grpc_reflection", "services", "actors", "hitl.cli", "hitl.feedback.v1.feedback_pb2_grpc"),
    "services": ("actors", "hitl.cli"),
    "actors": ("hitl.cli",),
}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source``; ``from a import b`` gives ``a.b`` too."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def violations(root: Path, package: str, forbidden: tuple[str, ...]) -> list[str]:
    """'path:line imports module' for each import under root/package of a forbidden module."""
    out = []
    for path in sorted((root / package).rglob("*.py")):
        for line, module in imported_modules(path.read_text()):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                out.append(f"{path.relative_to(root)}:{line} imports {module}")
    return sorted(set(out))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    assert violations(ROOT, package, FORBIDDEN[package]) == []


def test_the_scan_finds_a_forbidden_import_anywhere_in_a_module(tmp_path: Path) -> None:
    (tmp_path / "rlhf" / "deep").mkdir(parents=True)
    (tmp_path / "rlhf" / "ok.py").write_text("import torch\nfrom rlhf.models import load_policy\n")
    (tmp_path / "rlhf" / "deep" / "bad.py").write_text(
        "def f():\n    import ray.util\n\n\ndef g():\n    from services.feedback import client\n")
    (tmp_path / "services").mkdir()
    (tmp_path / "services" / "bad.py").write_text("from actors.coordinator import Coordinator\n")
    assert violations(tmp_path, "rlhf", FORBIDDEN["rlhf"]) == [
        "rlhf/deep/bad.py:2 imports ray.util",
        "rlhf/deep/bad.py:6 imports services.feedback",
        "rlhf/deep/bad.py:6 imports services.feedback.client",
    ]
    assert violations(tmp_path, "services", FORBIDDEN["services"]) == [
        "services/bad.py:1 imports actors.coordinator", "services/bad.py:1 imports actors.coordinator.Coordinator"]


PROBE = """
import importlib, pkgutil, sys
import rlhf
names = [m.name for m in pkgutil.walk_packages(rlhf.__path__, "rlhf.")]
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "grpc", "services", "actors"))
print(len(names), loaded)
"""


@pytest.mark.slow
def test_importing_all_of_rlhf_loads_no_ray_grpc_or_outer_layer() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    count, loaded = result.stdout.strip().split(" ", 1)
    assert int(count) >= 20  # the walk really found the package's modules
    assert loaded == "[]", loaded


OUTSIDE = re.compile(r"""\.\./shared|parents\[\d+\]\s*/\s*["']shared|parent\s*/\s*["']shared["']""")


def test_nothing_reads_outside_the_repository() -> None:
    hits = []
    for folder in ("rlhf", "services", "actors", "hitl", "bench", "tests", "configs", "deploy", ".ci"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".sh", ".yaml", ".yml", ".toml", "") and path != Path(__file__):
                text = path.read_text(errors="replace")
                hits.extend(f"{path.relative_to(ROOT)}: {m.group(0)}" for m in OUTSIDE.finditer(text))
    assert hits == []
