"""`hitl train dpo|ipo|kto` offline: judgements from a store or an HH-RLHF file, curated,
trained on the tiny policy in this process, written as a run-shaped directory whose policy
`hitl generation serve` reads (rlhf/storage.py `read_policy`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hitl.cli import main

HH = Path("tests/services/feedback/data/hh_rlhf_sample.jsonl")


def _config(tmp_path: Path) -> Path:
    data = yaml.safe_load(open("configs/tiny.yaml"))
    data["po"] = {"beta": 0.5, "lr": 3e-3, "epochs": 3, "batch_size": 2}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_train_from_a_file_writes_a_policy_a_server_can_read(tmp_path, algorithm):
    from rlhf.storage import CheckpointStorage, read_policy

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["train", algorithm, "--config", str(_config(tmp_path)), "--data", str(HH),
                                       "--format", "hh-rlhf", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["algorithm"] == algorithm and summary["examples"] >= 3
    assert summary["loss_after"] < summary["loss_before"]
    assert json.loads((out / "config.json").read_text())["ppo"]["algorithm"] == algorithm
    storage = CheckpointStorage(str(out / "checkpoints"))
    version, tensors, adapters_only = read_policy(storage, f"{storage.read_text('LATEST').strip()}/policy")
    assert version == 1 and not adapters_only and any("embed" in name for name in tensors)
    report = json.loads((out / "report.json").read_text())
    assert report["po"]["loss"] == algorithm and len(report["examples_sha256"]) == 64
    assert out.stat().st_mode & 0o777 == 0o700


def test_train_refuses_bad_arguments_by_name(tmp_path):
    config = _config(tmp_path)
    runner = CliRunner()
    both = runner.invoke(main, ["train", "dpo", "--config", str(config), "--store", "sqlite:///x.db", "--data", str(HH),
                                "--format", "hh-rlhf", "--out", str(tmp_path / "o")])
    assert both.exit_code != 0 and "one of them" in both.output
    no_format = runner.invoke(main, ["train", "ipo", "--config", str(config), "--data", str(HH), "--out", str(tmp_path / "o")])
    assert no_format.exit_code != 0 and "--format" in no_format.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "po": {"beta": -1}}))
    wrong = runner.invoke(main, ["train", "dpo", "--config", str(bad), "--data", str(HH), "--format", "hh-rlhf", "--out", str(tmp_path / "o")])
    assert wrong.exit_code != 0 and "po.beta" in wrong.output
    empty = tmp_path / "empty.db"
    nothing = runner.invoke(main, ["train", "dpo", "--config", str(config), "--store", f"sqlite:///{empty}", "--out", str(tmp_path / "o")])
    assert nothing.exit_code != 0 and "no usable judgements" in nothing.output
    assert not (tmp_path / "o").exists()
