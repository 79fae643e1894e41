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


# -- early stopping: PPO within a round, the run across rounds ---------------------------

from actors.coordinator import ppo_stop_reason, run_stop_reason  # noqa: E402


def _iterations(*rewards, kl=0.1):
    return [{"reward": r, "kl": kl} for r in rewards]


def test_no_stop_unless_asked():
    c = CoordinatorConfig(ppo_iterations_per_round=8)
    assert ppo_stop_reason(_iterations(1.0, 0.5, 0.2, 0.1), c) is None
    assert run_stop_reason([{"win_rate": w} for w in (0.6, 0.5, 0.4)], CoordinatorConfig(rounds=5)) is None


def test_ppo_stops_on_the_kl_budget_first():
    c = CoordinatorConfig(ppo_kl_budget=1.0, ppo_reward_patience=1)
    reason = ppo_stop_reason(_iterations(0.1, 0.2, kl=1.5), c)
    assert reason is not None and reason.startswith("kl 1.5 over ppo_kl_budget 1")


def test_ppo_stops_on_a_reward_plateau():
    c = CoordinatorConfig(ppo_reward_patience=2, ppo_reward_min_delta=0.05)
    assert ppo_stop_reason(_iterations(0.1, 0.3), c) is None
    assert ppo_stop_reason(_iterations(0.1, 0.3, 0.32), c) is None  # one stale iteration (0.02 is under min_delta)
    reason = ppo_stop_reason(_iterations(0.1, 0.3, 0.32, 0.2), c)
    assert reason is not None and reason.startswith("reward plateau")
    assert "best 0.3 (iteration 2)" in reason and "for 2 iteration(s)" in reason and "after iteration 4" in reason
    assert ppo_stop_reason(_iterations(0.1, 0.3, 0.32, 0.4), c) is None  # a real rise resets the count


def test_the_run_stops_on_win_rate_patience():
    c = CoordinatorConfig(rounds=6, win_rate_patience=2, win_rate_min_delta=0.02)
    reports = [{"win_rate": w} for w in (0.5, 0.7, 0.71, 0.65)]
    reason = run_stop_reason(reports, c)
    assert reason is not None and "evaluation win-rate" in reason and "best 0.7 (round 2)" in reason and "after round 4" in reason
    assert run_stop_reason(reports[:3], c) is None
    assert run_stop_reason(reports + [{"win_rate": 0.8}], c) is None  # a new best: go on
    # the last round: the run ends anyway, nothing to stop early
    assert run_stop_reason(reports, c.model_copy(update={"rounds": 4})) is None


def test_a_run_without_a_win_rate_is_never_stopped_by_it():
    c = CoordinatorConfig(rounds=6, win_rate_patience=1)
    assert run_stop_reason([{"win_rate": float("nan")}] * 3, c) is None
