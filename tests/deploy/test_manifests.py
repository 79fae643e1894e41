"""deploy/: every overlay builds (tests/deploy/kustomize.py), every object validates strictly
(KubeRay kinds against the CRD schemas with unknown fields rejected, core kinds with
kubernetes-validate in strict mode), everything referenced is defined or named as the user's
to supply, and the manifests agree with the GPU profile they deploy."""

from __future__ import annotations

import copy
import functools
import gzip
import json
import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from actors.config import RunConfig
from rlhf.config import load_config
from tests.deploy.kustomize import KustomizeError, build

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BUNDLED = Path(__file__).resolve().parent / "crds"  # the v1 schemas, carried in the repository (see its README)
KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").exists())
PROFILE_OF = {"gpu-8b": "configs/cluster-gpu-8b.yaml"}
K8S_VERSION = "1.33"


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


def strict(schema: dict) -> dict:
    """The schema with unknown fields rejected wherever it lists the known ones (as the API
    server's strict field validation does), except where it keeps unknown fields on purpose."""
    out = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(out)
    return out


@functools.lru_cache(maxsize=None)
def strict_validator(kind: str, version: str):
    return jsonschema.Draft7Validator(strict(crd_schema(kind, version)))


def validate(doc: dict) -> None:
    """Raises when `doc` is not a valid object (strictly: no unknown fields)."""
    if doc["kind"] in KINDS:
        strict_validator(doc["kind"], doc["apiVersion"].split("/")[1]).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@functools.lru_cache(maxsize=None)
def built(overlay: str) -> tuple[dict, ...]:
    return tuple(build(DEPLOY / "overlays" / overlay))


def objects(overlay: str, kind: str) -> list[dict]:
    return [o for o in built(overlay) if o["kind"] == kind]


def ray_cluster_specs(overlay: str) -> list[tuple[str, dict]]:
    """Every Ray cluster spec: a RayCluster's, a RayJob's and a RayService's."""
    out = [(f"RayCluster/{o['metadata']['name']}", o["spec"]) for o in objects(overlay, "RayCluster")]
    out += [(f"RayJob/{o['metadata']['name']}", o["spec"]["rayClusterSpec"]) for o in objects(overlay, "RayJob")]
    out += [(f"RayService/{o['metadata']['name']}", o["spec"]["rayClusterConfig"]) for o in objects(overlay, "RayService")]
    return out


def pod_specs(overlay: str) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template in the build."""
    out = []
    for where, spec in ray_cluster_specs(overlay):
        out.append((f"{where}/head", spec["headGroupSpec"]["template"]["spec"]))
        out += [(f"{where}/{g['groupName']}", g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    for kind in ("Deployment", "StatefulSet"):
        out += [(f"{kind}/{o['metadata']['name']}", o["spec"]["template"]["spec"]) for o in objects(overlay, kind)]
    return out


def profile(overlay: str) -> RunConfig:
    return load_config(REPO / PROFILE_OF[overlay], RunConfig)


# -- building and validating ------------------------------------------------------------------


def test_every_overlay_is_a_known_profile_and_builds():
    assert OVERLAYS == sorted(PROFILE_OF)
    for overlay in OVERLAYS:
        kinds = {o["kind"] for o in built(overlay)}
        assert kinds >= {"RayCluster", "RayJob", "RayService", "Deployment", "Service", "StatefulSet", "PersistentVolumeClaim"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(overlay):
    for doc in built(overlay):
        validate(doc)


def test_unknown_and_wrong_fields_are_rejected():
    docs = {o["kind"]: o for o in built(OVERLAYS[0])}
    cases = [
        ("RayJob", lambda d: d["spec"].update(shutdownAfterJobFinish=True)),  # a misspelt field
        ("RayJob", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(mounts=[])),
        ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="two")),
        ("RayCluster", lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name")),
        ("RayService", lambda d: d["spec"].update(serveConfig={})),
        ("Service", lambda d: d["spec"].update(bogus=1)),
        ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={})),
        ("PersistentVolumeClaim", lambda d: d["spec"].update(accessMode=["ReadWriteMany"])),
    ]
    for kind, breaks in cases:
        doc = copy.deepcopy(docs[kind])
        breaks(doc)
        with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
            validate(doc)


def test_the_builder_refuses_what_it_does_not_apply(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(KustomizeError, match="missing.yaml"):
        build(tmp_path)


# -- nothing referenced and undefined ----------------------------------------------------------


def user_supplied() -> set[tuple[str, str]]:
    """What deploy/README.md names as the user's to create: lines like "- `Secret hitl-postgres`"."""
    return set(re.findall(r"^- `(Secret|PersistentVolumeClaim) ([a-z0-9-]+)`", (DEPLOY / "README.md").read_text(), re.M))


def references(node, out: set[tuple[str, str]]) -> set[tuple[str, str]]:
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            out.add(("Secret", node["secretKeyRef"]["name"]))
        if "secret" in node and isinstance(node["secret"], dict) and "secretName" in node["secret"]:
            out.add(("Secret", node["secret"]["secretName"]))
        if "persistentVolumeClaim" in node:
            out.add(("PersistentVolumeClaim", node["persistentVolumeClaim"]["claimName"]))
        if "configMap" in node and isinstance(node["configMap"], dict):
            out.add(("ConfigMap", node["configMap"]["name"]))
        for value in node.values():
            references(value, out)
    elif isinstance(node, list):
        for value in node:
            references(value, out)
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_referenced_is_defined_or_named_for_the_user(overlay):
    defined = {(o["kind"], o["metadata"]["name"]) for o in built(overlay)}
    supplied = user_supplied()
    assert ("Secret", "hitl-postgres") in supplied  # the README's list was read
    missing = references(list(built(overlay)), set()) - defined - supplied
    assert not missing, f"referenced, defined nowhere and not named in deploy/README.md: {sorted(missing)}"
    assert not supplied & defined  # what the user supplies is not also shipped (e.g. a placeholder secret)


# -- what the run needs from its pods ---------------------------------------------------------------


def mounts(pod: dict) -> dict[str, tuple[str, bool]]:
    """mount path -> (volume's claim or medium, read-only) of the pod's first container."""
    volumes = {}
    for v in pod.get("volumes", []):
        if "persistentVolumeClaim" in v:
            volumes[v["name"]] = v["persistentVolumeClaim"]["claimName"]
        elif "emptyDir" in v:
            volumes[v["name"]] = "emptyDir:" + v["emptyDir"].get("medium", "")
        elif "secret" in v:
            volumes[v["name"]] = "secret:" + v["secret"]["secretName"]
    return {m["mountPath"]: (volumes[m["name"]], bool(m.get("readOnly"))) for m in pod["containers"][0].get("volumeMounts", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_runs_volume_is_shared_and_mounted_where_checkpoints_go(overlay):
    cfg = profile(overlay)
    [runs] = [o for o in objects(overlay, "PersistentVolumeClaim") if o["metadata"]["name"] == "hitl-runs"]
    assert runs["spec"]["accessModes"] == ["ReadWriteMany"]
    assert cfg.coordinator.storage is None  # checkpoints under run_dir: on the runs volume
    run_dir = str(cfg.coordinator.run_dir)
    training = [(w, s) for w, s in ray_cluster_specs(overlay) if not w.startswith("RayService")]
    assert training
    for where, spec in training:  # the driver, the trainer ranks and the reward model all write checkpoints
        pods = [("head", spec["headGroupSpec"]["template"]["spec"])] + [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
        for name, pod in pods:
            at = [(path, ro) for path, (claim, ro) in mounts(pod).items() if claim == "hitl-runs" and run_dir.startswith(path + "/")]
            assert at and not at[0][1], f"{where}/{name} does not mount hitl-runs writable over {run_dir}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_gpu_pod_has_a_memory_backed_dev_shm(overlay):
    gpu_pods = [(w, p) for w, p in pod_specs(overlay) if "nvidia.com/gpu" in p["containers"][0]["resources"].get("limits", {})]
    assert gpu_pods
    for where, pod in gpu_pods:
        assert mounts(pod).get("/dev/shm", ("", False))[0] == "emptyDir:Memory", f"{where}: no memory-backed /dev/shm for NCCL"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_dashboard_and_gcs_require_a_token(overlay):
    for where, spec in ray_cluster_specs(overlay):
        assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: Ray's dashboard is open (no authOptions)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_job_is_torn_down_when_it_ends_and_a_retry_resumes(overlay):
    for job in objects(overlay, "RayJob"):
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec.get("backoffLimit", 0) >= 1
        words = spec["entrypoint"].split()
        assert words[:2] == ["hitl", "run"] and "--resume-if-present" in words
        assert words[2] == PROFILE_OF[overlay]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_store_password_comes_from_a_secret_to_every_pod_that_opens_the_store(overlay):
    cfg = profile(overlay)
    store = cfg.feedback.service.store
    assert store.startswith("postgresql://") and ":" not in store.split("@")[0].removeprefix("postgresql://")  # no password in it
    openers = [(w, p) for w, p in pod_specs(overlay) if w.endswith("/head") and not w.startswith("RayService")]
    openers += [(w, p) for w, p in pod_specs(overlay) if w == "Deployment/hitl-feedback"]
    assert len(openers) >= 3
    for where, pod in openers:
        env = {e["name"]: e for e in pod["containers"][0].get("env", [])}
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "hitl-postgres", "key": "password"}, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_feedback_service_is_behind_a_service_with_tls_tokens_and_health_probes(overlay):
    cfg = profile(overlay)
    [service] = [o for o in objects(overlay, "Service") if o["metadata"]["name"] == "hitl-feedback"]
    [deployment] = [o for o in objects(overlay, "Deployment") if o["metadata"]["name"] == "hitl-feedback"]
    assert cfg.feedback.mode == "external" and cfg.feedback.address == "hitl-feedback:50051"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    [grpc_port] = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc_port["port"] == 50051
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(container["command"])
    for flag in ("--tls-cert=", "--tls-key=", "--tokens=", "--host=0.0.0.0", "--port=50051", f"--store={cfg.feedback.service.store}"):
        assert flag in command
    for probe in ("readinessProbe", "livenessProbe"):
        words = container[probe]["exec"]["command"]
        assert words[:3] == ["hitl", "feedback", "health"] and any(w.startswith("--tls-ca=") for w in words)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_prompt_file_is_mounted_on_the_driver(overlay):
    cfg = profile(overlay)
    paths = [str(s.path) for s in cfg.data.prompt_sources if getattr(s, "path", None)]
    assert paths
    for where, spec in ray_cluster_specs(overlay):
        if where.startswith("RayService"):
            continue
        head = mounts(spec["headGroupSpec"]["template"]["spec"])
        for path in paths:
            assert any(path.startswith(m + "/") for m in head), f"{where}/head: {path} is on no volume"


@pytest.mark.ray  # imports the Serve application
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rayservice_runs_the_generation_app_on_the_runs_checkpoints(overlay):
    from services.generation.app import ARGS

    cfg = profile(overlay)
    [service] = objects(overlay, "RayService")
    [application] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert application["import_path"] == "services.generation.app:app"
    assert set(application["args"]) <= set(ARGS)
    assert application["args"]["config"] == PROFILE_OF[overlay]
    assert application["args"]["checkpoints"] == f"{cfg.coordinator.run_dir}/checkpoints"
    pods = [g["template"]["spec"] for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    g = cfg.generation
    gpus = sum(int(p["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) for p in pods)
    assert g.replicas * g.num_gpus <= gpus


# -- the cluster's shape and the profile -----------------------------------------------------------


def ray_version() -> str:
    """The installed Ray's version, read from its metadata (importing Ray is not needed)."""
    from importlib.metadata import version

    return version("ray")


def _groups(cluster_spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}


def _ray_resources(group: dict) -> dict[str, float]:
    raw = group["rayStartParams"].get("resources", '"{}"')
    return json.loads(json.loads(raw))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cluster_shape_fits_the_profile(overlay):
    cfg = profile(overlay)
    for where, spec in ray_cluster_specs(overlay):
        assert spec["rayVersion"] == ray_version(), where
        if where.startswith("RayService"):
            continue
        groups = _groups(spec)
        trainer, serving = groups["trainer"], groups["serving"]
        t = cfg.cluster.trainer
        trainer_gpus = trainer["replicas"] * int(trainer["rayStartParams"]["num-gpus"])
        assert t.workers * t.num_gpus <= trainer_gpus
        assert t.workers * t.resources["trainer"] <= trainer["replicas"] * _ray_resources(trainer)["trainer"]
        serving_gpus = serving["replicas"] * int(serving["rayStartParams"]["num-gpus"])
        rm = cfg.cluster.reward_model
        assert cfg.generation.replicas * cfg.generation.num_gpus + rm.replicas * rm.num_gpus <= serving_gpus
        assert "serving" in _ray_resources(serving)
        for group in (trainer, serving):
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) == int(group["rayStartParams"]["num-gpus"])
