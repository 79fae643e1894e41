"""Distillation on tiny random Llama models of different sizes that share the SmolLM2
tokenizer: the teacher's answers, token-level training lowering the student's divergence from
the teacher on held-out prompts, sequence-level training raising the student's likelihood of
the teacher's held-out answers, and the tokenizer check."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf.distill import (
    DistillConfig,
    TokenizerMismatch,
    answer_batch,
    check_same_tokenizer,
    distill,
    held_out_figures,
    student_trainer,
    write_answers,
)
from rlhf.models import LoraConfig, ModelConfig, load_causal_lm, load_policy
from rlhf.ppo import DeepSpeedConfig

TRAIN = ["Tell me a story.", "What is the capital of France?", "Write a poem about the sea.", "How do plants grow?",
         "Explain gravity.", "Name three colours.", "Why is the sky blue?", "Count to five."]
HELD_OUT = ["Describe a cat.", "What is rain?", "Give me a recipe.", "Say hello."]


@pytest.fixture(scope="module")
def teacher(tiny_cfg, tokenizer, torch_single_thread):
    """Wider and deeper than the student (hidden 64, 3 layers against 32, 2), other weights."""
    cfg = tiny_cfg.model_copy(update={"hidden_size": 64, "num_layers": 3, "intermediate_size": 128, "seed": 7})
    return load_causal_lm(cfg, tokenizer).eval()


def _student(tiny_cfg: ModelConfig, lora: bool):
    model, tokenizer = load_policy(tiny_cfg, LoraConfig(enabled=lora, rank=8, alpha=16.0))
    return model, tokenizer


def _run(teacher, tiny_cfg, cfg: DistillConfig, lora: bool = False):
    student, tokenizer = _student(tiny_cfg, lora)
    answers = write_answers(teacher, tokenizer, TRAIN, cfg)
    held_out = write_answers(teacher, tokenizer, HELD_OUT, cfg, first_index=len(TRAIN))
    trainer = student_trainer(student, tokenizer, cfg, DeepSpeedConfig(zero_stage=0))
    return trainer, answers, held_out, distill(trainer, teacher, answers, held_out, cfg)


def _cfg(**kw) -> DistillConfig:
    base = dict(max_new_tokens=8, batch_size=4, lr=5e-3, epochs=3, answer_temperature=1.0, held_out_prompts=4, seed=0)
    return DistillConfig(**{**base, **kw})


def test_answers_are_the_teachers_samples_and_do_not_depend_on_batching(teacher, tokenizer):
    cfg = _cfg()
    one = write_answers(teacher, tokenizer, TRAIN[:5], cfg.model_copy(update={"generation_batch_size": 5}))
    two = write_answers(teacher, tokenizer, TRAIN[:5], cfg.model_copy(update={"generation_batch_size": 2}))
    assert [a.answer_ids for a in one] == [a.answer_ids for a in two]
    assert len({a.answer_ids for a in one}) == 5  # sampled: no two prompts answered alike
    for a in one:
        assert 1 <= len(a.answer_ids) <= cfg.max_new_tokens
        assert tokenizer.decode(list(a.prompt_ids)).endswith(f"{a.prompt}<|im_end|>\n<|im_start|>assistant\n")
        assert a.text == tokenizer.decode(list(a.answer_ids), skip_special_tokens=True)
    batch = answer_batch(one, tokenizer.pad_token_id)
    assert batch.loss_mask.sum().item() == sum(len(a.answer_ids) for a in one)
    greedy = write_answers(teacher, tokenizer, TRAIN[:2], cfg.model_copy(update={"answer_temperature": 0.0}))
    ids = torch.tensor([list(greedy[0].prompt_ids)])
    with torch.no_grad():
        first = teacher(input_ids=ids).logits[0, -1].argmax().item()
    assert greedy[0].answer_ids[0] == first


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_token_level_lowers_the_divergence_on_held_out_prompts(teacher, tiny_cfg, divergence):
    cfg = _cfg(divergence=divergence, **({"beta": 0.5} if divergence == "jsd" else {}))
    _, _, held_out, report = _run(teacher, tiny_cfg, cfg)
    before, after = report.held_out_before, report.held_out_after
    assert report.optimizer_steps == cfg.epochs * 2 and report.on_policy_steps == 0
    assert report.loss_after < 0.7 * report.loss_before
    assert after.divergence < 0.85 * before.divergence, (before, after)
    assert after.tokens == before.tokens == sum(len(a.answer_ids) for a in held_out)


ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_under_lora_only_the_adapters_train_and_reach_a_teacher_they_can_express(tiny_cfg, tokenizer):
    """The teacher is the student's base model with random adapters merged in: adapters of the
    same shape can express it exactly, so the divergence falls far."""
    lora = LoraConfig(enabled=True, rank=4, alpha=8.0, target_modules=ALL_LINEARS)
    teacher, _ = load_policy(tiny_cfg, lora)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    teacher = teacher.merge_and_unload().eval()
    student, _ = load_policy(tiny_cfg, lora)
    base = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_" not in n}
    cfg = _cfg()
    answers = write_answers(teacher, tokenizer, TRAIN, cfg)
    held_out = write_answers(teacher, tokenizer, HELD_OUT, cfg, first_index=len(TRAIN))
    trainer = student_trainer(student, tokenizer, cfg, DeepSpeedConfig(zero_stage=0))
    report = distill(trainer, teacher, answers, held_out, cfg)
    assert report.held_out_after.divergence < 0.5 * report.held_out_before.divergence
    after = dict(trainer.policy.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base.items())
    assert all(after[n].abs().sum() > 0 for n in after if "lora_B" in n)  # B starts at 0


def test_on_policy_minibatches_are_the_students_own_answers(teacher, tiny_cfg):
    _, _, _, report = _run(teacher, tiny_cfg, _cfg(lmbda=1.0, epochs=2))
    assert report.on_policy_steps == report.optimizer_steps == 4
    assert report.held_out_after.divergence < 0.9 * report.held_out_before.divergence


def test_sequence_level_raises_the_likelihood_of_the_teachers_answers(teacher, tiny_cfg, tokenizer):
    cfg = _cfg(mode="sequence", answer_temperature=0.0, epochs=4, lr=1e-2)  # greedy: the teacher's modes
    trainer, answers, held_out, report = _run(teacher, tiny_cfg, cfg)
    assert report.mode == "sequence" and report.answers == len([a for a in answers if a.text])
    assert report.loss_after < report.loss_before
    assert report.held_out_after.nll < report.held_out_before.nll - 0.5, (report.held_out_before, report.held_out_after)
    again = held_out_figures(trainer.policy, teacher, held_out, cfg, tokenizer)
    assert again.nll == pytest.approx(report.held_out_after.nll, rel=1e-5)


def test_a_different_tokenizer_is_refused_naming_both(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<|extra|>"])
    check_same_tokenizer(tokenizer, copy.deepcopy(tokenizer), "T", "S")  # the same vocabulary passes
    with pytest.raises(TokenizerMismatch, match=r"teacher big-model and student small-model have different tokenizers") as err:
        check_same_tokenizer(other, tokenizer, "big-model", "small-model")
    assert f"{len(other)} and {len(tokenizer)} tokens" in str(err.value) and "1 token(s) differ" in str(err.value)


def test_config_errors_name_the_field():
    from rlhf.config import ConfigError, parse_config

    with pytest.raises(ValueError, match="beta is only read with divergence 'jsd'"):
        DistillConfig(divergence="forward", beta=0.3)
    with pytest.raises(ValueError, match="lmbda is only read with mode 'token'"):
        DistillConfig(mode="sequence", lmbda=0.5)
    DistillConfig.model_validate(DistillConfig(mode="sequence").model_dump())  # a dump loads again
    with pytest.raises(ConfigError, match="temperature: must be > 0"):
        parse_config({"temperature": 0}, DistillConfig, source="distill")
