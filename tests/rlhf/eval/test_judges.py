"""The judges of rlhf/eval/judges.py: the rule, a reward model on the tiny model (and its
checkpoint loaded as the loop wrote it), and the llm judge over real HTTP with both orders."""

from __future__ import annotations

import pytest

from rlhf.eval.config import EvalConfig, HumanJudgeConfig, LlmJudgeConfig
from rlhf.eval.judges import (
    LLM_TEMPLATE_VERSION,
    LlmJudge,
    RewardModelJudge,
    RuleJudge,
    combine_orders,
    parse_choice,
    reward_model_scorer,
)
from rlhf.eval.records import EvalItem
from rlhf.eval.report import evaluate, write_report
from rlhf.quality.judges import Judge, JudgeConfig
from tests.rlhf.eval.fake_openai import FakeOpenAI, serving

ITEMS = [
    EvalItem("Say hi.", "Hi.", "Hello there, it is so nice to meet you today.", "greeting"),
    EvalItem("Describe rain.", "Rain falls from clouds and makes everything wet and grey.", "Wet.", "weather"),
    EvalItem("Name a colour.", "Blue.", "Red.", "misc"),
    EvalItem("Tell a story.", "", "Once upon a time.", "misc"),
]


def test_rule_judge_is_the_rule_without_noise():
    cfg = JudgeConfig(rule="concise")
    verdicts = RuleJudge(cfg).judge(ITEMS).verdicts
    assert verdicts == tuple(Judge(cfg).compare(i.prompt, i.answer_a, i.answer_b) for i in ITEMS)
    assert verdicts == ("a", "b", "tie", "b")  # an empty answer loses to any


def test_parse_and_combine_cancel_position_bias():
    assert parse_choice("A") == "A" and parse_choice(" b.") == "B" and parse_choice("Answer B is better") == "B"
    assert parse_choice("I prefer answer A.") == "A" and parse_choice("Both are fine.") is None
    assert parse_choice("answer A or answer B") is None and parse_choice("A nice answer.") is None and parse_choice("B. It is shorter.") == "B"
    assert combine_orders("A", "B") == "a"  # A first: A; B first: B names A's answer
    assert combine_orders("B", "A") == "b"
    assert combine_orders("A", "A") == "tie"  # always the first position: flips with the order
    assert combine_orders("B", None) == "tie"


@pytest.mark.parametrize("mode, expected", [("concise", ("a", "b", "tie", "b")), ("first", ("tie",) * 4), ("babble", ("tie",) * 4)])
def test_llm_judge_over_http_asks_both_orders(mode, expected):
    fake = FakeOpenAI(mode)
    with serving(fake) as url:
        result = LlmJudge(LlmJudgeConfig(base_url=url, concurrency=2)).judge(ITEMS)
    assert result.verdicts == expected
    assert len(fake.requests) == 2 * len(ITEMS) and {r["model"] for r in fake.requests} == {"fake-model"}
    assert all(r["temperature"] == 0.0 for r in fake.requests)
    shown = [r["messages"][-1]["content"] for r in fake.requests if "Describe rain." in r["messages"][-1]["content"]]
    assert len(shown) == 2 and shown[0].index("Wet.") > shown[0].index("Rain falls") and shown[1].index("Wet.") < shown[1].index("Rain falls")
    assert result.details["template_version"] == LLM_TEMPLATE_VERSION
    assert result.details["consistent_across_orders"] == (3 if mode == "concise" else 0)
    assert result.item_details[0].keys() == {"a_first", "b_first"}


def test_reward_model_judge_on_the_tiny_model_and_its_checkpoint(tiny_cfg, tmp_path, torch_single_thread):
    import torch
    from safetensors.torch import save_file

    from rlhf.eval.checkpoints import load_checkpointed_reward_model
    from rlhf.reward.config import RewardConfig
    from rlhf.reward.model import build_reward_model
    from rlhf.storage import CheckpointStorage

    reward_cfg = RewardConfig(max_length=64)
    model = build_reward_model(reward_cfg, tiny_cfg).eval()
    with torch.no_grad():  # a "trained" head and offset, as a round leaves them
        model.head.linear.weight.add_(torch.randn_like(model.head.linear.weight, generator=torch.Generator().manual_seed(1)))
        model.offset.fill_(0.25)
    result = RewardModelJudge(reward_model_scorer(model, batch_size=3)).judge(ITEMS)
    with torch.no_grad():
        direct_a = model.score([i.prompt for i in ITEMS], [i.answer_a for i in ITEMS]).tolist()
        direct_b = model.score([i.prompt for i in ITEMS], [i.answer_b for i in ITEMS]).tolist()
    assert result.scores_a == pytest.approx(direct_a, abs=1e-5) and result.scores_b == pytest.approx(direct_b, abs=1e-5)
    assert result.verdicts == tuple("a" if x > y else "b" if y > x else "tie" for x, y in zip(direct_a, direct_b))

    # the loop's checkpoint: the trainable tensors and the offset (actors/reward_model.py `save`)
    names = {n for n, p in model.named_parameters() if p.requires_grad} | {"offset"}
    storage = CheckpointStorage(str(tmp_path / "checkpoints"))
    with storage.writing("round-0001/reward_model") as local:
        save_file({n: t.detach().contiguous() for n, t in model.state_dict().items() if n in names}, f"{local}/trained.safetensors")
    loaded = load_checkpointed_reward_model(storage, "round-0001/reward_model", reward_cfg, tiny_cfg)
    again = RewardModelJudge(reward_model_scorer(loaded)).judge(ITEMS)
    assert again.scores_a == pytest.approx(result.scores_a, abs=1e-5) and again.verdicts == result.verdicts
    with pytest.raises(FileNotFoundError, match="round-0002/reward_model"):
        load_checkpointed_reward_model(storage, "round-0002/reward_model", reward_cfg, tiny_cfg)


def test_evaluate_writes_json_markdown_and_png(tmp_path):
    import json

    report = evaluate(ITEMS, [RuleJudge(JudgeConfig(rule="concise")), RuleJudge(JudgeConfig(rule="positive"))],
                      a={"label": "new", "kl": 1.5}, b={"label": "old"}, eval_id="e2")
    # two judges named alike would overwrite each other: the report keeps one entry per name
    assert list(report["judges"]) == ["rule"]
    paths = write_report(report, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["eval_id"] == "e2"
    md = paths["md"].read_text()
    assert "| judge | n | win | tie | loss | win-rate | 95% interval |" in md and "| greeting |" in md and "A 1.500 nats" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_config_names_what_is_missing():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="llm: required when judges has 'llm'"):
        EvalConfig(judges=["rule", "llm"])
    with pytest.raises(ValidationError, match="each judge at most once"):
        EvalConfig(judges=["rule", "rule"])
    with pytest.raises(ValidationError, match="gold_rate > 0 needs gold_tasks"):
        HumanJudgeConfig(gold_rate=0.1)
    assert EvalConfig().judges == ["rule"]
