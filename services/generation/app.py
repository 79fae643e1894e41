"""The generation server on its own: a Ray Serve application for `serve run`, `serve deploy`
or a KubeRay RayService (deploy/), serving the policy of a run's last checkpoint.

    serve run services.generation.app:app config=configs/cluster-gpu-8b.yaml checkpoints=/mnt/runs/hitl-8b/checkpoints

`config` is a run profile (or a run's config.json): only its `model`, `lora`, `generation` and
`template` sections are read. `checkpoints` (optional) is the run's checkpoint storage, a path or a URI
(`coordinator.storage`, default `<run_dir>/checkpoints`); without it the base model is served.
The ingress replica starts the engines itself (they live and die with it), then loads the
policy that the LATEST checkpoint names (rlhf/storage.py `write_policy`).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from rlhf.models import LoraConfig, ModelConfig
from rlhf.templates import PromptTemplate
from services.generation.config import GenerationConfig
from services.generation.server import EngineSpec, build_app

ARGS = ("config", "checkpoints")


def engine_spec(args: dict) -> EngineSpec:
    """The spec an `app(args)` serves; a wrong or missing argument or section names itself."""
    unknown = sorted(set(args) - set(ARGS))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}: expected {list(ARGS)}")
    if "config" not in args:
        raise ValueError("config: required (a run profile YAML or a run's config.json)")
    path = Path(args["config"])
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    sections = {}
    for name, model in (("model", ModelConfig), ("lora", LoraConfig), ("generation", GenerationConfig), ("template", PromptTemplate)):
        try:
            sections[name] = model.model_validate(data.get(name) or {})
        except Exception as err:  # pydantic's message names the field inside the section
            raise ValueError(f"{path}: {name}: {err}") from err
    return EngineSpec(**sections, checkpoints=args.get("checkpoints"))


def app(args: dict):
    """The Serve application (builder form: `serve run ...:app key=value`)."""
    spec = engine_spec(args)
    return build_app(spec, str(spec.model.path or spec.model.source), spec.generation)
