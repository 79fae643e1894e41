"""`hitl eval` through click on the tiny model: two checkpoints of a run-shaped directory
(as the loop writes them: config.json, checkpoints/round-NNNN/{policy,reward_model}, LATEST),
judged by the rule, the run's reward model, an OpenAI-compatible llm judge (a small HTTP
server here; tests/services/eval/test_llm_judge_on_generation_server.py uses the project's
own generation server) and people (simulated annotators over real gRPC)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hitl.cli import main
from tests.rlhf.eval.fake_openai import FakeOpenAI, serving
from tests.services.eval.helpers import annotators, gold_file
from tests.services.feedback.conftest import running_server

CATEGORIES = ["greetings", "greetings", "weather", "weather", "food", "food"]


def _run_dir(tmp_path: Path) -> Path:
    """A run-shaped directory: round-0000 serves the base weights, round-0001 perturbed ones,
    and round-0001 holds a reward model."""
    import torch
    from safetensors.torch import save_file

    from rlhf.models import ModelConfig
    from rlhf.reward.config import RewardConfig
    from rlhf.reward.model import build_reward_model
    from rlhf.storage import CheckpointStorage, write_policy
    from services.generation.engine import PolicyEngine

    data = yaml.safe_load(open("configs/tiny.yaml"))
    data["annotators"] = {"annotators": [{"annotator_id": "sim", "judge": {"rule": "concise"}}]}
    data["coordinator"] = {"eval_max_new_tokens": 6}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(data))
    model_cfg = ModelConfig.model_validate(data["model"])
    storage = CheckpointStorage(str(run / "checkpoints"))
    base = PolicyEngine(model_cfg, None).weights()
    g = torch.Generator().manual_seed(0)
    write_policy(storage, "round-0000/policy", 1, base, adapters_only=False)
    write_policy(storage, "round-0001/policy", 2, {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}, False)
    rm = build_reward_model(RewardConfig.model_validate(data["reward"]), model_cfg)
    with torch.no_grad():
        rm.head.linear.weight.add_(torch.randn(rm.head.linear.weight.shape, generator=g))
    names = {n for n, p in rm.named_parameters() if p.requires_grad} | {"offset"}
    with storage.writing("round-0001/reward_model") as local:
        save_file({n: t.detach().contiguous() for n, t in rm.state_dict().items() if n in names}, f"{local}/trained.safetensors")
        Path(local, "rounds.txt").write_text("2\n")
    storage.write_text("LATEST", "round-0001\n")
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _run_dir(tmp_path_factory.mktemp("eval-run"))


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Tell me about {c} number {i}.", "category": c}) + "\n"
                            for i, c in enumerate(CATEGORIES)))
    return path


@pytest.mark.slow
def test_eval_of_two_checkpoints_with_every_judge(run_dir, tmp_path):
    from rlhf.quality.judges import Judge, JudgeConfig

    out = tmp_path / "out"
    db = f"sqlite:///{tmp_path / 'feedback.db'}"
    fake = FakeOpenAI("concise")
    with running_server(db) as server, serving(fake) as llm_url, annotators(server.address, n=3):
        result = CliRunner().invoke(main, [
            "eval", "--a", str(run_dir / "checkpoints" / "round-0001"), "--b", str(run_dir / "checkpoints" / "round-0000"),
            "--prompts", str(_prompts(tmp_path)), "--judge", "rule", "--judge", "reward-model", "--judge", "llm", "--judge", "human",
            "--llm-url", llm_url, "--store", db, "--feedback", server.address, "--annotations", "3",
            "--gold-tasks", str(gold_file(tmp_path / "gold.jsonl")), "--gold-rate", "0.34", "--timeout", "120",
            "--eval-id", "cmd1", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for judge in ("rule", "reward-model", "llm", "human"):
        assert any(line.startswith(f"{judge}: win-rate ") and "(95% Wilson)" in line for line in result.output.splitlines()), result.output
    report = json.loads((out / "eval.json").read_text())
    assert (out / "eval.md").exists() and (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert report["a"]["label"] == "run/round-0001" and report["b"]["label"] == "run/round-0000"
    rule = Judge(JudgeConfig(rule="concise"))
    expected = [rule.compare(i["prompt"], i["answer_a"], i["answer_b"]) for i in report["items"]]
    for k, item in enumerate(report["items"]):
        assert item["verdicts"]["rule"] == expected[k]
        assert item["verdicts"]["human"] == expected[k]  # three noise-free annotators of the same rule
        assert item["verdicts"]["llm"] == expected[k]  # the fake judge follows it too, in both orders
        a, b = item["scores"]["reward-model"]
        assert item["verdicts"]["reward-model"] == ("a" if a > b else "b" if b > a else "tie")
    j = report["judges"]
    wins = sum(v == "a" for v in expected) + 0.5 * sum(v == "tie" for v in expected)
    assert j["rule"]["win_rate"] == pytest.approx(wins / len(expected)) and j["rule"]["n"] == len(CATEGORIES)
    assert set(j["rule"]["slices"]) == {"greetings", "weather", "food"}
    assert j["human"]["details"]["gold_accuracy"] == {"sim-0": 1.0, "sim-1": 1.0, "sim-2": 1.0}
    assert j["llm"]["details"]["template_version"] == "pairwise-v1"
    assert "mean_reward_a" in j["reward-model"]
    agreement = {tuple(g["judges"]): g for g in report["agreement"]}
    assert agreement[("rule", "human")]["raw"] == 1.0 and len(agreement) == 6
    # A is a perturbed policy, B the base weights: B's KL to the base is zero
    assert report["b"]["kl"] == pytest.approx(0.0, abs=1e-4) and abs(report["a"]["kl"]) > 1e-3


@pytest.mark.slow
def test_human_judgements_collected_later(run_dir, tmp_path):
    out = tmp_path / "out"
    db = f"sqlite:///{tmp_path / 'feedback.db'}"
    runner = CliRunner()
    with running_server(db) as server:
        first = runner.invoke(main, ["eval", "--a", str(run_dir), "--b", "base", "--prompts", str(_prompts(tmp_path)), "--limit", "3",
                                     "--judge", "rule", "--judge", "human", "--store", db, "--annotations", "2", "--timeout", "0",
                                     "--eval-id", "later", "--no-kl", "--out", str(out)], catch_exceptions=False)
        assert first.exit_code == 0, first.output
        assert json.loads((out / "eval.json").read_text())["judges"]["human"]["missing"] == 3
        assert "hitl eval --collect later" in first.output
        with annotators(server.address, n=2):
            import time

            from services.eval.human import HumanJudge
            from services.feedback.store import open_store
            from rlhf.eval.config import HumanJudgeConfig
            from rlhf.eval.records import EvalItem

            items = [EvalItem(i["prompt"], i["answer_a"], i["answer_b"], i["category"])
                     for i in json.loads((out / "eval.json").read_text())["items"]]
            store = open_store(db)
            try:
                assert HumanJudge(HumanJudgeConfig(annotations_per_item=2, timeout_s=120, poll_s=0.05), store, "later").wait(items) == 0
            finally:
                store.close()
            del time
        later = runner.invoke(main, ["eval", "--collect", "later", "--out", str(out)], catch_exceptions=False)
    assert later.exit_code == 0, later.output
    report = json.loads((out / "eval.json").read_text())
    assert report["judges"]["human"]["missing"] == 0 and report["judges"]["human"]["n"] == 3
    assert report["judges"]["rule"]["n"] == 3 and report["a"]["label"] == "run/round-0001"
    assert all(i["verdicts"]["human"] == i["verdicts"]["rule"] for i in report["items"])


def test_bad_options_are_named_before_anything_loads(run_dir, tmp_path):
    runner = CliRunner()

    def fails(args: list[str], text: str) -> None:
        r = runner.invoke(main, ["eval", *args, "--out", str(tmp_path / "o")])
        assert r.exit_code != 0 and text in r.output, r.output
        assert not (tmp_path / "o").exists()

    fails(["--b", "base"], "--a and --b are required")
    fails(["--a", str(tmp_path), "--b", "base"], "--a ")
    fails(["--a", "base", "--b", "base"], "needs --config")
    fails(["--a", str(run_dir), "--b", "base", "--judge", "llm"], "--llm-url: llm: required")
    fails(["--a", str(run_dir), "--b", "base", "--judge", "human"], "--store")
    fails(["--a", str(run_dir), "--b", "base", "--judge", "human", "--gold-rate", "0.2", "--store", "sqlite:///x.db"], "--gold-rate")
    fails(["--a", str(run_dir), "--b", "base", "--prompts", str(tmp_path / "none.jsonl")], "--prompts")
    fails(["--a", "base", "--b", "base", "--judge", "reward-model", "--config", "configs/tiny.yaml"], "--judge reward-model")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"hidden_size": -1}}))
    fails(["--a", "base", "--b", "base", "--config", str(bad)], "model.hidden_size")
    fails(["--collect", "nope"], "no evaluation state")
