"""`hitl distill` end to end on tiny models: a wider, deeper teacher saved as a Hugging Face
model directory, the config's tiny model as the student; the student written as a run-shaped
checkpoint that `hitl eval` reads, and the comparison's files. Bad input fails by name before
any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hitl.cli import main


def _config(tmp_path: Path, **distill) -> Path:
    data = yaml.safe_load(open("configs/tiny.yaml"))
    data["data"]["validation_fraction"] = 0.3
    data["coordinator"] = {"eval_max_new_tokens": 6}
    data["eval"] = {"judges": ["rule"], "rule": {"rule": "concise"}}
    data["distill"] = {"max_new_tokens": 6, "batch_size": 4, "lr": 5e-3, "epochs": 2, "prompts": 8, "held_out_prompts": 4, **distill}
    path = tmp_path / "tiny-distill.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _hf_teacher(tmp_path: Path, extra_token: bool = False) -> Path:
    """A tiny Llama of hidden size 64 and 3 layers (the student: 32 and 2) saved with the SmolLM2
    tokenizer, as a Hugging Face model directory; `extra_token` adds a token to its tokenizer."""
    from rlhf.models import ModelConfig, load_causal_lm, load_tokenizer

    cfg = ModelConfig(source="tiny", hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128, seed=7, onednn_linear=False)
    tokenizer = load_tokenizer(cfg)
    if extra_token:
        tokenizer.add_tokens(["<|extra|>"])
    model = load_causal_lm(cfg, tokenizer)
    path = tmp_path / ("teacher-other" if extra_token else "teacher")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow  # two models answering through `hitl eval`: about 10 s alone on 2 cores
def test_distill_writes_a_student_checkpoint_and_the_comparison(tmp_path):
    from rlhf.storage import CheckpointStorage, read_policy

    teacher, out = _hf_teacher(tmp_path), tmp_path / "out"
    result = CliRunner().invoke(main, ["distill", "--teacher", str(teacher), "--student", "base", "--config", str(_config(tmp_path)),
                                       "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["mode"] == "token" and summary["answers"] == 8
    assert summary["loss_after"] < summary["loss_before"]
    assert summary["held_out_after"]["divergence"] < summary["held_out_before"]["divergence"]
    assert "hidden size 64, 3 layers" in result.output and "hidden size 32, 2 layers" in result.output

    storage = CheckpointStorage(str(out / "checkpoints"))
    version, tensors, adapters_only = read_policy(storage, f"{storage.read_text('LATEST').strip()}/policy")
    assert version == 1 and not adapters_only and any("embed" in name for name in tensors)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["source"] == "tiny" and config["model"]["hidden_size"] == 32
    assert config["distill"]["epochs"] == 2  # the settings it was distilled with, the options over the section
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["hidden_size"] == 64 and report["student"]["layers"] == 2
    assert report["distill"]["epochs"] == 2 and report["report"]["optimizer_steps"] == 4
    assert out.stat().st_mode & 0o777 == 0o700

    for name in ("eval.json", "eval.md", "eval.png"):
        assert (out / "eval" / name).is_file()
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    assert evaluation["a"]["kind"] == "checkpoint" and evaluation["a"]["checkpoint"].endswith("trained")
    assert evaluation["n_items"] == 4 and set(evaluation["judges"]) == {"rule"}
    assert report["evaluation"]["rule"]["win_rate"] == evaluation["judges"]["rule"]["win_rate"]


def test_sequence_level_from_the_command_without_evaluation(tmp_path):
    teacher, out = _hf_teacher(tmp_path), tmp_path / "out"
    result = CliRunner().invoke(main, ["distill", "--teacher", str(teacher), "--student", "base", "--config", str(_config(tmp_path)),
                                       "--mode", "sequence", "--epochs", "3", "--lr", "1e-2", "--no-eval", "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["mode"] == "sequence" and summary["loss_after"] < summary["loss_before"]
    assert summary["held_out_after"]["nll"] != summary["held_out_before"]["nll"]
    assert (out / "checkpoints" / "LATEST").is_file() and not (out / "eval").exists()


def test_a_tokenizer_mismatch_fails_naming_both(tmp_path):
    teacher, out = _hf_teacher(tmp_path, extra_token=True), tmp_path / "out"
    result = CliRunner().invoke(main, ["distill", "--teacher", str(teacher), "--student", "base", "--config", str(_config(tmp_path)),
                                       "--out", str(out)])
    assert result.exit_code == 2
    assert "teacher teacher-other and student base (tiny) have different tokenizers" in result.output
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--beta", "0.3"], "distill: beta is only read with divergence 'jsd'"),
    (["--lr", "-1"], "distill.lr: must be > 0"),
    (["--teacher", "no/such/dir"], "--teacher no/such/dir: not 'base'"),
    (["--teacher", "http://127.0.0.1:1/v1"], "--teacher http://127.0.0.1:1/v1: an endpoint gives no logits"),
])
def test_bad_input_is_named(tmp_path, args, message):
    config = _config(tmp_path)
    base = {"--teacher": "base", "--student": "base", "--config": str(config), "--out": str(tmp_path / "o")}
    extra = dict(zip(args[::2], args[1::2]))
    line = [x for k, v in {**base, **extra}.items() for x in (k, v)]
    result = CliRunner().invoke(main, ["distill", *line])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_bad_config_section_is_named(tmp_path):
    result = CliRunner().invoke(main, ["distill", "--teacher", "base", "--student", "base", "--out", str(tmp_path / "o"),
                                       "--config", str(_config(tmp_path, divergence="kl"))])
    assert result.exit_code == 2 and "distill.divergence: must be one of" in result.output, result.output
