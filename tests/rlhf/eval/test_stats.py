"""The evaluation's statistics against hand computations (rlhf/eval/stats.py)."""

from __future__ import annotations

import math

import pytest

from rlhf.eval.records import EvalItem, JudgeVerdicts
from rlhf.eval.report import build_report
from rlhf.eval.stats import cohen_kappa, length_controlled_win_rate, summarise, wilson_interval


def test_wilson_interval_by_hand():
    # 5 of 10: centre (0.5 + z²/20) / (1 + z²/10) = 0.5; half-width z/(1 + z²/10) * sqrt(0.025 + z²/400)
    lo, hi = wilson_interval(0.5, 10)
    assert lo == pytest.approx(0.236593, abs=1e-6) and hi == pytest.approx(0.763407, abs=1e-6)
    # 8 of 8: (1 + z²/16)/(1 + z²/8) - z/(1 + z²/8) * z/16, upper bound 1
    lo, hi = wilson_interval(1.0, 8)
    assert lo == pytest.approx(0.675592, abs=1e-6) and hi == 1.0
    assert wilson_interval(0.5, 0) == (0.0, 1.0)


def test_win_tie_loss_and_rate_count_ties_half_and_leave_missing_out():
    s = summarise(["a", "a", "tie", "b", None], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1])
    assert (s.n, s.win, s.tie, s.loss, s.missing) == (4, 2, 1, 1, 1)
    assert s.win_rate == pytest.approx(0.625)
    assert s.ci95 == pytest.approx(wilson_interval(0.625, 4))


def test_length_controlled_win_rate_by_hand():
    # 10 items where A is longer (d = +1): 9 wins; 10 where A is shorter (d = -1): 5 wins.
    # x = tanh(d / sd(d)) = ±tanh(1); two x values, two parameters: the fit is exact,
    # sigmoid(b0 ± b1 tanh 1) = 0.9 and 0.5, so b0 = (logit 0.9 + logit 0.5) / 2 = ln 3 and
    # the rate at x = 0 is sigmoid(ln 3) = 3/4; the raw win-rate is 14/20.
    verdicts = ["a"] * 9 + ["b"] + ["a"] * 5 + ["b"] * 5
    len_a = [11] * 10 + [9] * 10
    len_b = [10] * 20
    assert summarise(verdicts, len_a, len_b).win_rate == pytest.approx(0.7)
    assert length_controlled_win_rate(verdicts, len_a, len_b, ridge=0.0) == pytest.approx(0.75, abs=1e-9)
    # the default ridge on the slope moves it only a little
    assert length_controlled_win_rate(verdicts, len_a, len_b) == pytest.approx(0.75, abs=5e-3)
    # no length difference: the plain win-rate, ties half
    assert length_controlled_win_rate(["a", "a", "tie", "b"], [5] * 4, [5] * 4) == pytest.approx(0.625, abs=1e-9)
    # length alone decides (separable): finite, and near 1/2 at equal lengths
    lc = length_controlled_win_rate(["a"] * 5 + ["b"] * 5, [20] * 5 + [0] * 5, [10] * 10)
    assert math.isfinite(lc) and lc == pytest.approx(0.5, abs=1e-6)
    assert length_controlled_win_rate([None, None], [1, 2], [1, 2]) is None


def test_cohen_kappa_by_hand():
    x = ["a", "a", "b", "b", "tie", "a", None]
    y = ["a", "b", "b", "b", "tie", "a", "a"]
    # six items both judged, 5 agree; p_e = (3·2 + 2·3 + 1·1) / 36 = 13/36; kappa = (30 - 13) / (36 - 13)
    got = cohen_kappa(x, y)
    assert got["n"] == 6 and got["raw"] == pytest.approx(5 / 6) and got["kappa"] == pytest.approx(17 / 23)
    assert cohen_kappa(["a", "a"], ["a", "a"]) == {"n": 2, "raw": 1.0, "kappa": None}  # p_e = 1: undefined
    assert cohen_kappa(["a", "b"], ["b", "a"])["kappa"] == pytest.approx(-1.0)


def test_report_gives_slices_rewards_and_agreement():
    items = [EvalItem(f"p{i}", f"a{i}", f"b{i}", category="x" if i < 3 else "y") for i in range(5)]
    rule = JudgeVerdicts("rule", ("a", "a", "b", "tie", "b"))
    rm = JudgeVerdicts("reward-model", ("a", "b", "b", "a", "b"), scores_a=(1.0, 0.0, 0.0, 2.0, 0.0), scores_b=(0.0, 1.0, 1.0, 1.0, 1.0))
    report = build_report(items, [rule, rm], a={"label": "new"}, b={"label": "old"}, eval_id="e1")
    x, y = report["judges"]["rule"]["slices"]["x"], report["judges"]["rule"]["slices"]["y"]
    assert (x["n"], x["win"], x["loss"], x["win_rate"]) == (3, 2, 1, pytest.approx(2 / 3))
    assert (y["n"], y["tie"], y["loss"], y["win_rate"]) == (2, 1, 1, pytest.approx(0.25))
    assert report["judges"]["reward-model"]["mean_reward_a"] == pytest.approx(0.6)
    assert report["judges"]["reward-model"]["mean_reward_b"] == pytest.approx(0.8)
    [agree] = report["agreement"]
    # agree on items 0, 2, 4; rule a 2, b 2, tie 1; reward model a 2, b 3: p_e = (2·2 + 2·3 + 1·0) / 25 = 10/25
    assert agree["judges"] == ["rule", "reward-model"] and agree["raw"] == pytest.approx(0.6)
    assert agree["kappa"] == pytest.approx((0.6 - 0.4) / (1 - 0.4))
    assert report["items"][3]["verdicts"] == {"rule": "tie", "reward-model": "a"}
    assert report["items"][0]["scores"] == {"reward-model": [1.0, 0.0]}
