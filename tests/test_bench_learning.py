"""bench/learning.py builds the run it claims to measure (corrections off, the rule under
test, 160 judgements) and sums its results up right; the runs themselves are the benchmark."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "bench" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_run_has_no_corrections_and_judges_by_the_rule(tmp_path):
    bench = _bench()
    base = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    assert any(a.get("correction_rate") for a in base["annotators"]["annotators"])  # the profile corrects
    for upper in (False, True):
        cfg = bench.run_config(base, "format", tmp_path, upper_bound=upper, algorithm="dpo", port=8999)
        assert not cfg.sft.enabled and cfg.ppo.algorithm == "dpo" and cfg.po.loss == "dpo"
        people = cfg.annotators.annotators
        assert [a.annotator_id for a in people] == [a["annotator_id"] for a in base["annotators"]["annotators"]]
        assert all(a.correction_rate == 0.0 and a.judge.rule == "format" for a in people)
        noise = [a.noise for a in people]
        assert noise == [0.0] * len(people) if upper else noise == [a["noise"] for a in base["annotators"]["annotators"]]
        c = cfg.coordinator
        assert c.rounds * c.tasks_per_round == bench.JUDGEMENTS and c.min_feedback_per_round == c.tasks_per_round
        assert str(tmp_path) in cfg.feedback.service.store and cfg.generation.http_port == 8999
    # the config file itself is left as it was
    assert base == yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())


def test_the_summary_takes_the_worst_learned_rule():
    bench = _bench()

    def result(rule, upper, rates, minutes):
        return {"rule": rule, "upper_bound": upper, "algorithm": "dpo", "minutes": minutes, "win_rate_at_160": rates[-1],
                "curve": [{"win_rate": w, "reward_accuracy": None} for w in rates]}

    s = bench.summary([result("positive", False, [0.5, 0.7], 20.0), result("positive", True, [0.6, 0.9], 21.0),
                       result("format", False, [0.5, 0.55], 19.0)])
    assert s["min_win_rate_at_160"] == 0.55
    assert s["rules"]["positive"]["win_rate_at_160"] == 0.7 and s["rules"]["positive"]["upper_bound"]["win_rate_at_160"] == 0.9
    assert s["rules"]["format"]["minutes"] == 19.0 and "upper_bound" not in s["rules"]["format"]
