"""deploy/ manifests validate against KubeRay's CRD schemas, offline, and agree with the GPU profile."""

import copy
import functools
import gzip
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from actors.config import RunConfig
from rlhf.config import load_config

REPO = Path(__file__).resolve().parents[2]
BUNDLED = Path(__file__).resolve().parent / "crds"  # the v1 schemas, carried in the repository (see its README)
KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}


@functools.lru_cache(maxsize=None)
def crd_schema(kind: str, version: str) -> dict:
    """The CRD's openAPIV3Schema: from $HITL_KUBERAY_CRDS (a folder of KubeRay's CRD YAML files)
    when set, else from the schemas bundled beside this test."""
    override = os.environ.get("HITL_KUBERAY_CRDS")
    if not override:
        bundled = BUNDLED / f"{kind.lower()}-{version}.schema.json.gz"
        if not bundled.exists():
            raise AssertionError(f"no bundled schema for {kind} {version} ({bundled})")
        return json.loads(gzip.decompress(bundled.read_bytes()))
    path = Path(override) / KINDS[kind]
    if not path.exists():
        raise AssertionError(f"HITL_KUBERAY_CRDS={override}: {KINDS[kind]} not found there")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"{kind} has no version {version}")


def validate(doc: dict) -> None:
    version = doc["apiVersion"].split("/")[1]
    jsonschema.Draft7Validator(crd_schema(doc["kind"], version)).validate(doc)


def kuberay_docs():
    for path in sorted((REPO / "deploy").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in KINDS:
                yield path.name, doc


def test_there_are_kuberay_manifests():
    assert {d["kind"] for _, d in kuberay_docs()} >= {"RayCluster", "RayJob"}


@pytest.mark.parametrize("name, doc", list(kuberay_docs()), ids=lambda x: x if isinstance(x, str) else x.get("kind"))
def test_manifest_matches_the_crd(name, doc):
    validate(doc)


def test_a_broken_manifest_is_caught():
    _, doc = next(d for d in kuberay_docs() if d[1]["kind"] == "RayCluster")
    broken = copy.deepcopy(doc)
    broken["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = copy.deepcopy(doc)
    del broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def ray_version() -> str:
    """The installed Ray's version, read from its metadata (importing Ray is not needed)."""
    from importlib.metadata import version

    return version("ray")


def _groups(cluster_spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}


def _ray_resources(group: dict) -> dict[str, float]:
    raw = group["rayStartParams"].get("resources", '"{}"')
    return json.loads(json.loads(raw))


def test_cluster_shape_fits_the_gpu_profile():
    cfg = load_config(REPO / "configs" / "cluster-gpu-8b.yaml", RunConfig)
    for _, doc in kuberay_docs():
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["rayVersion"] == ray_version()
        groups = _groups(spec)
        trainer, serving = groups["trainer"], groups["serving"]
        t = cfg.cluster.trainer
        trainer_gpus = trainer["replicas"] * int(trainer["rayStartParams"]["num-gpus"])
        assert t.workers * t.num_gpus <= trainer_gpus
        assert t.workers * t.resources["trainer"] <= trainer["replicas"] * _ray_resources(trainer)["trainer"]
        serving_gpus = serving["replicas"] * int(serving["rayStartParams"]["num-gpus"])
        assert cfg.generation.replicas * cfg.generation.num_gpus + cfg.cluster.reward_model.num_gpus <= serving_gpus
        assert "serving" in _ray_resources(serving)
        for group in (trainer, serving):
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) == int(group["rayStartParams"]["num-gpus"])
