"""The image is reproducible: deploy/requirements.lock pins every dependency with hashes, torch
as its CUDA build; it satisfies pyproject.toml; the Dockerfile installs exactly it; and the Ray
it pins is the one the manifests declare."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "deploy" / "requirements.lock"


def pins() -> dict[str, str]:
    out = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;\\]+)", line)
        if m:
            out[canonicalize_name(m.group(1).split("[")[0])] = m.group(2)
    return out


def test_every_pin_carries_hashes():
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text().split("\n", 2)[2])
    assert len(entries) > 50
    for entry in entries:
        assert "==" in entry.split()[0] and "--hash=sha256:" in entry, entry.splitlines()[0]


def test_torch_is_the_cuda_build():
    locked = pins()
    assert locked["torch"] == "2.13.0"  # PyPI's linux build: CUDA, with the libraries below
    assert {"nvidia-cublas", "nvidia-cudnn-cu13"} & set(locked) and sum(n.startswith("nvidia-") for n in locked) >= 8
    assert "+cpu" not in LOCK.read_text()


def test_the_lock_satisfies_the_project():
    locked = pins()
    from importlib.metadata import requires

    for spec in requires("hitl"):  # pyproject.toml's dependencies, as installed
        req = Requirement(spec)
        if req.marker is not None:  # an extra's (tests): not in the image
            continue
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not in the lock"
        assert req.specifier.contains(locked[name], prereleases=True), f"{name}=={locked[name]} does not satisfy {spec}"


def test_the_dockerfile_installs_the_lock_and_nothing_else():
    steps = [l.strip() for l in (REPO / "deploy" / "Dockerfile").read_text().splitlines() if l.startswith("RUN pip")]
    assert steps == ["RUN pip install --require-hashes -r deploy/requirements.lock", "RUN pip install --no-deps -e ."]


def test_the_manifests_run_the_ray_the_image_has():
    ray = pins()["ray"]
    declared = set()
    for path in (REPO / "deploy").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in ("RayCluster", "RayJob", "RayService"):
                spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
                declared.add(spec["rayVersion"])
    assert declared == {ray}
