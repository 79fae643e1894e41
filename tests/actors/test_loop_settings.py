"""Loop settings checked without running the loop: the PPO gate on the reward model's
held-out accuracy (a point estimate, or the lower end of its confidence interval:
`coordinator.ppo_gate_confidence`), and combinations a run refuses before it starts."""

from __future__ import annotations

import pytest

from actors.config import CoordinatorConfig
from actors.coordinator import gated_accuracy


def test_confidence_zero_is_the_accuracy_itself():
    assert gated_accuracy(0.8, 10, 0.0) == 0.8
    assert gated_accuracy(0.8, 0, 0.0) == 0.8


def test_the_bound_tightens_as_pairs_grow():
    few, many = gated_accuracy(0.9, 10, 0.9), gated_accuracy(0.9, 100, 0.9)
    assert few == pytest.approx(0.7176, abs=1e-3)
    assert many == pytest.approx(0.8549, abs=1e-3)
    assert few < many < 0.9


def test_a_gate_of_point_six_over_ten_pairs():
    # 8 of 10 right passes a 0.6 point gate, but its 95% lower bound does not
    assert gated_accuracy(0.8, 10, 0.0) >= 0.6
    assert gated_accuracy(0.8, 10, 0.95) < 0.6
    # 39 pairs at 0.59 (the figure) is no evidence of better than chance
    assert gated_accuracy(0.59, 39, 0.9) < 0.5


def test_no_held_out_pairs_never_passes():
    assert gated_accuracy(1.0, 0, 0.9) == 0.0


def test_higher_confidence_lower_bound():
    assert gated_accuracy(0.75, 40, 0.95) < gated_accuracy(0.75, 40, 0.8) < 0.75


def test_confidence_must_be_below_one():
    with pytest.raises(ValueError, match="ppo_gate_confidence"):
        CoordinatorConfig(ppo_gate_confidence=1.0)


def test_a_vllm_engine_takes_lora_only(tmp_path):
    from rlhf.config import parse_config
    from tests.actors.test_loop import tiny_run_config

    data = tiny_run_config(tmp_path).model_dump(mode="json")
    data["generation"]["backend"] = "vllm"
    data["lora"] = {**data["lora"], "enabled": True, "kind": "ia3"}
    from actors.config import RunConfig

    with pytest.raises(ValueError, match="lora.kind: generation.backend 'vllm' applies LoRA adapters only"):
        parse_config(data, RunConfig)


def test_the_round_evaluation_always_has_a_judge(tmp_path):
    """Without simulated annotators (people label) and without eval.rule, the `rule` judge gives
    way to the reward model, so a GPU profile's rounds still get a figure; a named rule or an
    annotator's rule keeps it."""
    from actors.coordinator import Coordinator
    from rlhf.config import parse_config
    from rlhf.eval import RewardModelJudge, RuleJudge
    from rlhf.quality.judges import Judge, JudgeConfig
    from actors.config import RunConfig
    from tests.actors.test_loop import tiny_run_config

    def judges(eval_section: dict, annotator_rule: str | None):
        data = tiny_run_config(tmp_path).model_dump(mode="json")
        data["eval"] = eval_section
        coordinator = object.__new__(Coordinator)
        coordinator.cfg = parse_config(data, RunConfig)
        coordinator.judge = Judge(JudgeConfig(rule=annotator_rule)) if annotator_rule else None
        coordinator.state = type("State", (), {"reward_model": {"id": "rm-x"}})()
        coordinator.store = None
        coordinator.reward_model = None
        return coordinator._eval_judges("e1")

    (only,) = judges({}, None)
    assert isinstance(only, RewardModelJudge)
    (rule,) = judges({}, "concise")
    assert isinstance(rule, RuleJudge) and rule.cfg.rule == "concise"
    (named,) = judges({"rule": {"rule": "format"}}, None)
    assert isinstance(named, RuleJudge) and named.cfg.rule == "format"
    both = judges({"judges": ["rule", "reward-model"]}, None)
    assert [type(j) for j in both] == [RewardModelJudge]
