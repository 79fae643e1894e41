"""Rejection-sampling fine-tuning (`ppo.algorithm: best_of_n`) and the PPO budget on KL
(`coordinator.ppo_kl_budget`): the choice of picks, and a round of each in the loop on the tiny
model (real Ray, Serve, gRPC, DeepSpeed ZeRO-2 on 2 workers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.config import RunConfig
from rlhf.sft.best_of_n import pick_best
from rlhf.config import parse_config
from rlhf.quality.judges import NO_ANSWER
from tests.actors.test_loop import tiny_run_config


def test_each_prompt_gets_its_highest_scored_answer():
    picks = pick_best(["p", "q"], [["a", "b", "c"], ["d", "e"]], [0.1, 0.9, 0.2, -1.0, 3.0], 0.0, 1.0)
    assert [(p.prompt, p.answer) for p in picks] == [("p", "b"), ("q", "e")]
    assert picks[0].reward == 0.9 and picks[0].gap == pytest.approx(0.9 - 0.15)
    assert picks[1].gap == pytest.approx(4.0)


def test_answers_that_do_not_stand_out_are_not_trained_on():
    # equal scores teach nothing; a gap under min_gap is left out too
    picks = pick_best(["p", "q", "r"], [["a", "b"], ["c", "d"], ["e", "f"]], [1.0, 1.0, 0.5, 0.7, 0.0, 2.0], 0.5, 1.0)
    assert [p.answer for p in picks] == ["f"]


def test_an_empty_answer_is_never_picked():
    # the empty answers score highest, but "x" is the best non-empty one; it is under the
    # mean of the others, so nothing stands out
    assert pick_best(["p"], [[NO_ANSWER, "x", ""]], [5.0, 1.0, 4.0], 0.0, 1.0) == []
    picks = pick_best(["p"], [[NO_ANSWER, "x"]], [0.0, 1.0], 0.0, 1.0)
    assert [p.answer for p in picks] == ["x"]


def test_keep_fraction_keeps_the_largest_gaps_in_prompt_order():
    prompts = ["p0", "p1", "p2", "p3"]
    answers = [["a", "b"]] * 4
    scores = [0.0, 1.0, 0.0, 4.0, 0.0, 2.0, 0.0, 3.0]
    picks = pick_best(prompts, answers, scores, 0.0, 0.5)
    assert [p.prompt for p in picks] == ["p1", "p3"]


def test_scores_must_match_the_answers():
    with pytest.raises(ValueError, match="3 scores for 2 answers"):
        pick_best(["p"], [["a", "b"]], [1.0, 2.0, 3.0], 0.0, 1.0)


def test_best_of_n_is_its_own_algorithm_not_a_po_loss():
    cfg = tiny_run_config(Path("unused"), rounds=1)
    data = cfg.model_dump(mode="json")
    data["ppo"]["algorithm"] = "best_of_n"
    parsed = parse_config(data, RunConfig)
    assert parsed.po.loss == cfg.po.loss  # po untouched
    data["best_of_n"] = {"n": 1}
    with pytest.raises(ValueError, match="best_of_n.n"):
        parse_config(data, RunConfig)


@pytest.mark.slow
def test_a_round_of_best_of_n_and_a_ppo_round_stopped_on_kl(ray_session, tmp_path):
    """Best-of-n: the engines write n answers to each prompt, the reward model picks, the SFT
    step trains on the picks (their loss falls), the engines then serve the trained policy and
    the lineage records the algorithm. PPO with a KL budget stops its iterations at the first
    one above it and says so."""
    from actors.coordinator import Coordinator

    class Sampled(Coordinator):
        def _samples(self) -> list[str]:
            from services.generation.engine import GenerateRequest

            requests = [GenerateRequest(messages=(("user", p),), temperature=1.0, max_new_tokens=8, n=4, seed=500 + i)
                        for i, p in enumerate(self.eval_prompts)]
            return [t for r in self._generate(requests) for t in r.texts]

        def _initial_eval(self) -> None:
            super()._initial_eval()
            self.before = self._samples()

        def evaluate(self) -> float:
            self.after = self._samples()
            return super().evaluate()

    cfg = tiny_run_config(tmp_path / "bon", rounds=1, tasks_per_round=16, min_feedback_per_round=16)
    data = cfg.model_dump(mode="json")
    data["ppo"]["algorithm"] = "best_of_n"
    data["best_of_n"] = {"n": 4, "prompts_per_round": 8}
    data["sft"] = {**data["sft"], "lr": 1e-2, "epochs": 4, "batch_size": 4}
    data["feedback"]["token"] = None
    coordinator = Sampled(parse_config(data, RunConfig))
    (report,) = coordinator.run()
    (bon,) = report.ppo
    assert bon["algorithm"] == "best_of_n" and bon["prompts"] == 8 and bon["samples"] == 32, bon
    assert 1 <= bon["picked"] <= 8 and bon["mean_picked_reward"] > bon["mean_reward"]
    assert bon["loss_after"] < bon["loss_before"], bon
    assert coordinator.before != coordinator.after and report.policy_version == 1
    lineage = json.loads((tmp_path / "bon" / "run" / report.lineage).read_text())
    assert lineage["ppo"]["algorithm"] == "best_of_n" and lineage["ppo"]["best_of_n"]["settings"]["n"] == 4

    cfg = tiny_run_config(tmp_path / "kl", rounds=1, ppo_iterations_per_round=4, ppo_kl_budget=1e-9)
    (report,) = Coordinator(cfg).run()
    # the first iteration samples from the reference itself (KL 0); the second is past the budget
    assert len(report.ppo) == 2, report.ppo
    assert "ppo_kl_budget" in report.ppo[-1]["stopped"] and "stopped" not in report.ppo[0]
