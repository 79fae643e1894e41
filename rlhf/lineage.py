"""Lineage: what made each policy version, written next to the round reports.

    runs/<run>/lineage/policy-v0003.json

One JSON file per policy version, enough to audit and reproduce it: the feedback that trained
it (the watermark range, records by kind and by annotator, what curation used and left out),
the reward model that scored its rollouts (an id from the round it was last trained in and a
hash chain over every item it was trained on, in order), the demonstrations of its SFT step,
the PPO, model, LoRA and DeepSpeed settings with the seed and the trainer iterations it ran,
the prompt template (its version and content: what the policy saw around every prompt), the
prompt split, and the run's config hash and code commit. The round report names the file.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf.ppo.config import PO_ALGORITHMS

LINEAGE_DIR = "lineage"


def canonical(obj: Any) -> Any:
    """Plain JSON data of dataclasses, enums, tuples and mappings, for stable hashing."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__name__, **{f.name: canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    return obj


def digest(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(canonical(obj), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def chain(previous: str, items: Iterable[Any]) -> str:
    """Extend a hash chain item by item: the result depends on the ordered items alone, not
    on how they were split over rounds."""
    h = previous
    for item in items:
        h = hashlib.sha256((h + digest(item)).encode()).hexdigest()
    return h


def next_reward_model(current: Mapping[str, Any] | None, round_: int, items: Sequence[Any], config: Any,
                      forgotten: int = 0) -> dict[str, Any]:
    """The reward model's lineage after a round that trained it on ``items`` (added to all
    earlier items, as the reward-model actor does), ``forgotten`` earlier items having been
    changed or left out by the round's flags first."""
    items_sha = chain((current or {}).get("items_sha256", ""), items)
    config_sha = digest(config)
    return {
        "id": f"rm-r{round_:04d}-{hashlib.sha256((config_sha + items_sha).encode()).hexdigest()[:16]}",
        "trained_in_round": round_,
        "items_total": int((current or {}).get("items_total", 0)) + len(items),
        "items_forgotten": int((current or {}).get("items_forgotten", 0)) + forgotten,
        "items_sha256": items_sha,
        "config_sha256": config_sha,
    }


def forget_in_reward_model(current: Mapping[str, Any] | None, forgotten: int) -> dict[str, Any]:
    """The reward model's lineage after a round that only left out ``forgotten`` earlier items
    (flags, no new items): the same weights, so the same id."""
    return {**(current or {}), "items_forgotten": int((current or {}).get("items_forgotten", 0)) + forgotten}


@functools.cache
def code_version() -> dict[str, Any] | None:
    """The git commit of the code that runs, and whether the tree had changes; None outside a
    git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                                text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "modified": bool(status.stdout.strip())}


def policy_lineage(
    *,
    policy_version: int,
    parent_version: int,
    round_: int,
    cfg: Any,
    config_json: str,
    project: str,
    watermark_from: int,
    watermark_to: int,
    curated: Any,
    reward_model: Mapping[str, Any],
    reward_report: Mapping[str, Any],
    sft_report: Mapping[str, Any],
    ppo_metrics: Sequence[Mapping[str, Any]],
    train_prompts: Sequence[str],
) -> dict[str, Any]:
    """The lineage record of one policy version (see the module docstring)."""
    iterations = [int(m["iteration"]) for m in ppo_metrics if "iteration" in m]
    return {
        "policy_version": policy_version,
        "parent_version": parent_version,
        "round": round_,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": {"config_sha256": hashlib.sha256(config_json.encode()).hexdigest(), "code": code_version()},
        "feedback": {
            "project": project,
            "watermark_from": watermark_from,
            "watermark_to": watermark_to,
            "records": sum(curated.received.values()),
            "by_kind": dict(sorted(curated.received.items())),
            "by_annotator": dict(sorted(curated.by_annotator.items())),
            "used_by_annotator": dict(sorted(curated.used_by_annotator.items())),
            "curation": dict(sorted(curated.counts.items())),
            "curation_settings": cfg.curation.model_dump(mode="json"),
        },
        "reward_model": {**reward_model, "trained_this_round": reward_model.get("trained_in_round") == round_,
                         "report": dict(reward_report)},
        "sft": {
            "demonstrations": len(curated.demonstrations),
            "demonstrations_sha256": digest(curated.demonstrations),
            "settings": cfg.sft.model_dump(mode="json"),
            "report": dict(sft_report),
        },
        "ppo": {
            "algorithm": cfg.ppo.algorithm,
            "seed": cfg.ppo.seed,
            "iterations": len(ppo_metrics),
            "trainer_iterations": [min(iterations), max(iterations)] if iterations else None,
            "settings": cfg.ppo.model_dump(mode="json"),
            "deepspeed": cfg.deepspeed.model_dump(mode="json"),
            "model": cfg.model.model_dump(mode="json"),
            "lora": cfg.lora.model_dump(mode="json"),
            "critic": cfg.critic.model_dump(mode="json"),
            "workers": cfg.cluster.trainer.workers,
            **({"po": {"settings": cfg.po.model_dump(mode="json"), "report": dict(ppo_metrics[0]) if ppo_metrics else None}}
               if cfg.ppo.algorithm in PO_ALGORITHMS else {}),
            **({"best_of_n": {"settings": cfg.best_of_n.model_dump(mode="json"), "report": dict(ppo_metrics[0]) if ppo_metrics else None}}
               if cfg.ppo.algorithm == "best_of_n" else {}),
        },
        "template": cfg.template.record(),
        "prompts": {
            "validation_fraction": cfg.data.validation_fraction,
            "split_seed": cfg.data.split_seed,
            "train_prompts": len(train_prompts),
            "train_prompts_sha256": digest(list(train_prompts)),
        },
    }


def republished_lineage(run_dir: Path, policy_version: int, same_as: int) -> dict[str, Any]:
    """The lineage of a version that a restore published with the weights of checkpointed
    version ``same_as`` (so that versions only increase): that version's record under the new
    number, marked ``republished_from``; version 0 is the initial weights."""
    source = Path(run_dir) / LINEAGE_DIR / f"policy-v{same_as:04d}.json"
    record = json.loads(source.read_text()) if source.exists() else {"note": "the initial weights" if same_as == 0 else "no record"}
    return {**record, "policy_version": policy_version, "republished_from": same_as,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_lineage(run_dir: Path, record: Mapping[str, Any]) -> str:
    """Write ``record`` to ``lineage/policy-vNNNN.json`` under ``run_dir`` (whole or absent);
    returns the path relative to ``run_dir``."""
    relative = Path(LINEAGE_DIR) / f"policy-v{int(record['policy_version']):04d}.json"
    path = Path(run_dir) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)
    return str(relative)
