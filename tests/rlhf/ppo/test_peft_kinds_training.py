"""Every PEFT kind (``lora.kind``) under the DeepSpeed trainer on the CPU (ZeRO-0, one
process, tiny model): a GRPO iteration and a DPO step move only the trainable tensors; the
reference log-probs are the base model's; a checkpoint resumes to the same outputs; and the
tensors a push carries make a generation engine compute the trainer's logits.
"""

from __future__ import annotations

import pytest
import torch

from rlhf.models import LoraConfig, load_policy
from rlhf.models.loading import load_causal_lm
from rlhf.models.peft_kinds import adapter_state, trainable_count
from rlhf.po import PairExample, POConfig, run_preference_optimisation
from rlhf.ppo import DeepSpeedConfig, PPOConfig
from rlhf.ppo.rollout import response_logprobs
from tests.rlhf.ppo.helpers import TINY, letter_reward, prompts_for

KINDS = ["lora", "dora", "ia3", "bitfit", "bottleneck"]
GRPO = PPOConfig(advantage_estimator="grpo", rollout_batch_size=4, group_size=2, max_new_tokens=4, minibatch_size=8,
                 policy_lr=1e-2, seed=0)
PAIRS = [PairExample("Name a colour.", "Blue.", "I refuse."), PairExample("Say hello.", "Hello!", "Go away.")]


def _trainer(kind: str):
    from rlhf.ppo.trainer import PPOTrainer

    policy, tokenizer = load_policy(TINY, LoraConfig(enabled=True, kind=kind))
    return PPOTrainer(policy, tokenizer, letter_reward(), GRPO, DeepSpeedConfig(zero_stage=0))


def _snapshot(model) -> tuple[dict, dict]:
    named = dict(model.named_parameters())
    return ({n: p.detach().clone() for n, p in named.items() if p.requires_grad},
            {n: p.detach().clone() for n, p in named.items() if not p.requires_grad})


def _only_trainable_moved(model, before: tuple[dict, dict]) -> None:
    trained, frozen = _snapshot(model)
    assert trained.keys() == before[0].keys() and frozen.keys() == before[1].keys()
    assert all(torch.equal(frozen[n], before[1][n]) for n in frozen)
    assert any(not torch.equal(trained[n], before[0][n]) for n in trained)


def _logits(model, sequences, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=sequences, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


@pytest.mark.parametrize("kind", KINDS)
def test_ppo_and_dpo_train_only_the_kind_and_resume_and_push(kind, tmp_path):
    from services.generation.engine import PolicyEngine, WeightUpdate

    trainer = _trainer(kind)
    policy = trainer.policy
    assert trainable_count(policy) > 0

    before = _snapshot(policy)
    trainer.step(prompts_for(0, GRPO.rollout_batch_size))  # one GRPO iteration
    _only_trainable_moved(policy, before)

    before = _snapshot(policy)
    report = run_preference_optimisation(trainer, PAIRS, POConfig(loss="dpo", lr=1e-2, epochs=1, batch_size=2))
    assert report.optimizer_steps == 1
    _only_trainable_moved(policy, before)

    # the reference log-probs of a fresh rollout are the base model's
    exp, _ = trainer.make_experience(prompts_for(1, GRPO.rollout_batch_size))
    base = load_causal_lm(TINY, trainer.tokenizer)
    with torch.no_grad():
        want, _ = response_logprobs(base, exp.sequences, exp.attention_mask, exp.action_mask.shape[1], GRPO.temperature,
                                    group_size=GRPO.group_size)
    assert torch.allclose(exp.ref_logprobs, want, atol=1e-5)
    seqs, mask = exp.sequences, exp.attention_mask
    policy_logits = _logits(policy, seqs, mask)
    assert not torch.allclose(policy_logits, _logits(base, seqs, mask), atol=1e-4)

    # save -> load into a fresh trainer: the same trainable tensors and outputs
    trainer.save_checkpoint(tmp_path / "ckpt")
    resumed = _trainer(kind)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.iteration == trainer.iteration
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(resumed.policy)[0].values(), _snapshot(policy)[0].values()))
    assert torch.equal(_logits(resumed.policy, seqs, mask), policy_logits)

    # the push: only the trainable tensors; an engine given them computes the trainer's logits
    tensors = {k: v.detach().clone() for k, v in adapter_state(policy).items()}
    assert sum(t.numel() for t in tensors.values()) == trainable_count(policy)
    engine = PolicyEngine(TINY, LoraConfig(enabled=True, kind=kind))
    engine.load_weights(WeightUpdate(1, tensors, adapters_only=True))
    assert torch.allclose(_logits(engine.model, seqs, mask), policy_logits, atol=1e-5)
