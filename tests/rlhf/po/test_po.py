"""Preference optimisation on the PPO trainer's DeepSpeed engine (CPU, tiny model).

What must hold: judgements become the right examples (pairs for DPO and IPO, single answers
for KTO, every kind of signal but ties used); a few epochs lower each loss and make the
policy prefer the chosen answers over the reference; under LoRA only the adapters move;
bad input is refused by name. (Equality with TRL: test_against_trl.py.)
"""

from __future__ import annotations

import pytest
import torch

from rlhf.po import KTOExample, PairExample, POConfig, kto_examples_from, pairs_from, run_preference_optimisation
from rlhf.ppo import DeepSpeedConfig, PPOConfig
from rlhf.preferences import Choice, PreferencePair, Ranking
from rlhf.sft.data import Demonstration
from tests.rlhf.ppo.helpers import make_trainer

GRPO = PPOConfig(advantage_estimator="grpo", rollout_batch_size=4, group_size=2, max_new_tokens=4, minibatch_size=8, seed=0)
PAIRS = [
    PairExample("Name a colour.", "Blue.", "I refuse to answer that."),
    PairExample("Say hello.", "Hello!", "Go away."),
    PairExample("Count to three.", "One, two, three.", "No."),
    PairExample("Name a fruit.", "An apple.", "A chair, obviously."),
]


def test_judgements_become_pairs_and_single_answers():
    items = [
        PreferencePair("p1", "good", "bad", Choice.A, weight=0.5),
        PreferencePair("p2", "worse", "better", Choice.B),
        PreferencePair("p3", "x", "y", Choice.TIE),
        PreferencePair("p4", "meh", "ugh", Choice.BOTH_BAD),
        PreferencePair("p5", "a", "b", Choice.A, weight=0.0),
        Ranking("p6", ("first", "second", "third"), (1, 2, 3)),
    ]
    pairs = pairs_from(items)
    assert [(p.prompt, p.chosen, p.rejected, p.weight) for p in pairs[:2]] == [("p1", "good", "bad", 0.5), ("p2", "better", "worse", 1.0)]
    assert {(p.chosen, p.rejected) for p in pairs[2:]} == {("first", "second"), ("first", "third"), ("second", "third")}
    single = kto_examples_from(items, [Demonstration("p7", "fixed answer", weight=2.0)])
    verdicts = {(e.prompt, e.completion): e.desirable for e in single}
    assert verdicts[("p1", "good")] and not verdicts[("p1", "bad")]
    assert not verdicts[("p4", "meh")] and not verdicts[("p4", "ugh")]  # both bad: both undesirable
    assert verdicts[("p7", "fixed answer")] and ("p3", "x") not in verdicts  # a correction is desirable; a tie says nothing
    assert next(e for e in single if e.prompt == "p7").weight == 2.0


def _adapter_and_base(trainer):
    named = dict(trainer.policy.named_parameters())
    return ({n: p.detach().clone() for n, p in named.items() if "lora_" in n},
            {n: p.detach().clone() for n, p in named.items() if "lora_" not in n})


@pytest.mark.parametrize("loss, lora", [("dpo", True), ("ipo", False), ("kto", True)])
def test_each_loss_falls_and_the_chosen_answers_gain(loss, lora):
    trainer = make_trainer(GRPO, DeepSpeedConfig(zero_stage=0), lora=lora)
    examples = pairs_from([PreferencePair(e.prompt, e.chosen, e.rejected, Choice.A) for e in PAIRS])
    if loss == "kto":
        examples = kto_examples_from([PreferencePair(e.prompt, e.chosen, e.rejected, Choice.A) for e in PAIRS])
    adapters, base = _adapter_and_base(trainer)
    cfg = POConfig(loss=loss, beta=0.5 if loss != "ipo" else 0.5, lr=2e-2 if lora else 2e-3, epochs=6, batch_size=4)
    report = run_preference_optimisation(trainer, examples, cfg)
    assert report.loss_after < report.loss_before - 0.05, report
    assert report.accuracy_after == 1.0 and report.optimizer_steps == cfg.epochs * -(-len(examples) // cfg.batch_size)
    after_adapters, after_base = _adapter_and_base(trainer)
    if lora:
        assert all(torch.equal(base[n], after_base[n]) for n in base)  # the reference (adapters off) is untouched
        assert any(not torch.equal(adapters[n], after_adapters[n]) for n in adapters)
    else:
        assert any(not torch.equal(base[n], after_base[n]) for n in base)


def test_bad_input_is_refused():
    trainer = make_trainer(GRPO, DeepSpeedConfig(zero_stage=0), lora=True)
    with pytest.raises(ValueError, match="at least one example"):
        run_preference_optimisation(trainer, [PairExample("p", "a", "b", weight=0.0)], POConfig())
    with pytest.raises(ValueError, match="kto trains on KTOExamples"):
        run_preference_optimisation(trainer, PAIRS, POConfig(loss="kto"))
    with pytest.raises(ValueError, match="dpo trains on PairExamples"):
        run_preference_optimisation(trainer, [KTOExample("p", "a", True)], POConfig(loss="dpo"))
