"""A round of the loop with DPO, IPO or KTO in place of PPO (`ppo.algorithm`), on the tiny
model: real Ray, Serve, gRPC, DeepSpeed (ZeRO-2, 2 workers)."""

from __future__ import annotations

import json

import pytest

from actors.config import RunConfig
from rlhf.config import parse_config
from tests.actors.test_loop import tiny_run_config


def _config(tmp_path, algorithm: str) -> RunConfig:
    cfg = tiny_run_config(tmp_path / algorithm, rounds=1, tasks_per_round=32, min_feedback_per_round=32, eval_prompts=8)
    data = cfg.model_dump(mode="json")
    data["ppo"]["algorithm"] = algorithm
    data["po"] = {"beta": 0.1, "lr": 1e-2, "epochs": 8, "batch_size": 4}
    data["feedback"]["token"] = None
    return parse_config(data, RunConfig)


def _log_likelihoods(worker, prompts: list[str], answers: list[str]) -> tuple[list[float], list[float]]:
    """(log pi(answer | prompt), log pi_ref(answer | prompt)) on a trainer worker: the policy now
    and the reference (the policy as it started)."""
    import torch

    from rlhf.po.trainer import _answer_logps
    from rlhf.sft.data import Demonstration, make_batch

    trainer = worker.trainer
    batch = make_batch(trainer.tokenizer, [Demonstration(p, a) for p, a in zip(prompts, answers)], 64, 16, trainer.dist.device)
    mask = (batch.loss_mask > 0).float()
    with torch.no_grad():
        now = _answer_logps(trainer.policy, batch.sequences, batch.attention_mask, mask)
        with trainer.reference.active() as reference:
            before = _answer_logps(reference, batch.sequences, batch.attention_mask, mask)
    return now.tolist(), before.tolist()


@pytest.mark.slow
def test_each_offline_algorithm_trains_on_the_rounds_judgements_and_the_engines_serve_it(ray_session, tmp_path):
    """One round each of DPO, IPO and KTO: the round's judged answers train the policy (its loss
    falls, nearly every training pair ends ordered as judged), the trained weights are what the
    engines serve next (fixed-seed samples of held-out prompts change, and the trainer's policy
    has moved from its reference on them), the lineage records the algorithm and its settings.
    (On this tiny random model one round's preferences do not carry over to new prompts: see
    docs/performance.md, "Preference optimisation".)"""
    import ray

    from actors.coordinator import Coordinator

    class Sampled(Coordinator):
        def _samples(self) -> list[tuple[str, str]]:
            from services.generation.engine import GenerateRequest

            requests = [GenerateRequest(messages=(("user", p),), temperature=1.0, max_new_tokens=8, n=8, seed=1000 + i)
                        for i, p in enumerate(self.eval_prompts)]
            return [(p, t) for p, r in zip(self.eval_prompts, self._generate(requests)) for t in r.texts]

        def _initial_eval(self) -> None:
            super()._initial_eval()
            self.before = self._samples()

        def evaluate(self) -> float:
            rate = super().evaluate()
            self.after = self._samples()
            kept = [(p, a) for p, a in self.before if a.strip()]
            self.moved = ray.get(self.trainers.workers[0].__ray_call__.remote(
                _log_likelihoods, [p for p, _ in kept], [a for _, a in kept]))
            return rate

    for algorithm in ("dpo", "ipo", "kto"):
        coordinator = Sampled(_config(tmp_path, algorithm))
        (report,) = coordinator.run()
        assert report.kl is None and report.policy_version == 1 and len(report.ppo) == 1, report.ppo
        po = report.ppo[0]
        assert po["algorithm"] == algorithm and po["examples"] >= 16 and po["optimizer_steps"] == 8 * -(-po["examples"] // 4)
        # nearly every training pair ends ordered as judged (one of 23 IPO pairs was left once)
        assert po["loss_after"] < po["loss_before"] and po["accuracy_after"] >= 0.9 > po["accuracy_before"], po
        assert coordinator.before != coordinator.after  # the engines serve the trained policy
        now, before = coordinator.moved
        assert max(abs(a - b) for a, b in zip(now, before)) > 0.1
        lineage = json.loads((tmp_path / algorithm / "run" / report.lineage).read_text())
        assert lineage["ppo"]["algorithm"] == algorithm and lineage["ppo"]["po"]["settings"]["loss"] == algorithm
        assert lineage["ppo"]["po"]["report"]["examples"] == po["examples"]
