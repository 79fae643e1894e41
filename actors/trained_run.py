"""What an offline training command leaves behind: a run-shaped directory, the trained policy
as a checkpoint (`checkpoints/trained/policy`, `checkpoints/LATEST`), its `config.json` and
`report.json`, so that `hitl generation serve OUT` serves it and `hitl eval --a OUT` reads it."""

from __future__ import annotations

import json
import os
from pathlib import Path

CHECKPOINT = "trained"
"""The one checkpoint of an offline run (what `LATEST` names)."""


def served_tensors(trainer) -> dict:
    """The adapters under a PEFT kind, else the full state dict (what a weight update carries)."""
    if trainer.is_peft:
        from peft import get_peft_model_state_dict

        return dict(get_peft_model_state_dict(trainer.policy))
    return dict(trainer.policy.state_dict())


def write_trained_run(out: Path, config_json: str, trainer, report: dict) -> None:
    """`out` (created private to the user) with the trainer's policy as version 1 of checkpoint
    `trained`, `config.json` (the run config that loads it) and `report.json`."""
    from rlhf.storage import CheckpointStorage, write_policy

    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    storage = CheckpointStorage(str(out / "checkpoints"))
    write_policy(storage, f"{CHECKPOINT}/policy", 1, served_tensors(trainer), trainer.is_peft)
    storage.write_text("LATEST", f"{CHECKPOINT}\n")
    (out / "config.json").write_text(config_json)
    (out / "report.json").write_text(json.dumps(report, indent=2))
