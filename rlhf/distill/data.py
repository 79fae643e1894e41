"""What distillation trains on: answers written for the run's prompts (by the teacher, or the
student on-policy), kept as token ids so that teacher and student score the very tokens that
were sampled, and laid out as the SFT/PPO batch (``rlhf.sft.data.SFTBatch``: the chat-formatted
prompt left-padded, the answer right-padded, a mask on the answer's tokens).

Answers are drawn by the PPO rollout sampler (``rlhf.ppo.rollout.generate``): each answer from
its own generator seeded by (seed, stream, prompt index), so an answer does not depend on what
shared its batch; greedy answers are top-1 sampling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlhf.distill.config import DistillConfig
from rlhf.ppo.config import PPOConfig
from rlhf.sft.data import Demonstration, SFTBatch
from rlhf.templates import DEFAULT_TEMPLATE, PromptTemplate

TEACHER_STREAM = 0
"""Sampler stream (``iteration`` of the rollout seed) of the teacher's answers; on-policy
answers of optimiser step k use stream k + 1."""


class TokenizerMismatch(ValueError):
    """Teacher and student do not share a tokenizer; the message names both."""


@dataclass(frozen=True)
class Answer:
    """One prompt and an answer to it, as tokens."""

    prompt: str
    prompt_ids: tuple[int, ...]  # the prompt rendered by the template, the assistant's turn opened
    answer_ids: tuple[int, ...]  # the answer up to and including its first end-of-turn token
    text: str  # the answer decoded, without the end-of-turn token


def sampler_config(cfg: DistillConfig) -> PPOConfig:
    """The rollout sampler's settings (and the student engine's optimiser settings) of ``cfg``:
    ``answer_temperature`` 0 becomes top-1 sampling, which is greedy decoding."""
    greedy = cfg.answer_temperature == 0.0
    return PPOConfig(algorithm="best_of_n", rollout_batch_size=cfg.batch_size, minibatch_size=cfg.batch_size,
                     max_prompt_tokens=cfg.max_prompt_tokens, max_new_tokens=cfg.max_new_tokens,
                     temperature=1.0 if greedy else cfg.answer_temperature, top_k=1 if greedy else 0,
                     policy_lr=cfg.lr, max_grad_norm=cfg.max_grad_norm, lr_warmup_steps=0, seed=cfg.seed)


@torch.no_grad()
def write_answers(model, tokenizer, prompts: Sequence[str], cfg: DistillConfig, *, stream: int = TEACHER_STREAM,
                  first_index: int = 0, device: torch.device | str = "cpu",
                  template: PromptTemplate = DEFAULT_TEMPLATE) -> list[Answer]:
    """``model``'s answer to each prompt rendered by ``template``, ``cfg.generation_batch_size``
    prompts at a time; prompt k draws from the generator of sample ``first_index + k`` of
    ``stream``."""
    from rlhf.ppo.rollout import generate, rollout_texts, tokenize_prompts

    sampler = sampler_config(cfg)
    out: list[Answer] = []
    for start in range(0, len(prompts), cfg.generation_batch_size):
        chunk = list(prompts[start : start + cfg.generation_batch_size])
        ids, mask = tokenize_prompts(tokenizer, rollout_texts(tokenizer, chunk, True, template), cfg.max_prompt_tokens, device)
        indices = list(range(first_index + start, first_index + start + len(chunk)))
        gen = generate(model, tokenizer, ids, mask, sampler, stream, indices)
        P = gen.prompt_length
        for row, prompt in enumerate(chunk):
            prompt_ids = gen.sequences[row, :P][gen.attention_mask[row, :P] > 0].tolist()
            answer_ids = gen.responses[row][gen.action_mask[row] > 0].tolist()
            text = tokenizer.decode(answer_ids, skip_special_tokens=True)
            out.append(Answer(prompt, tuple(prompt_ids), tuple(answer_ids), text))
    return out


def answer_batch(answers: Sequence[Answer], pad_token_id: int, device: torch.device | str = "cpu") -> SFTBatch:
    """``answers`` in the SFT/PPO layout: sequences (B, P+T), attention mask (B, P+T), and a loss
    mask (B, T) of 1 on each answer's tokens (its end-of-turn token included)."""
    if not answers:
        raise ValueError("answer_batch needs at least one answer")
    P = max(len(a.prompt_ids) for a in answers)
    T = max(len(a.answer_ids) for a in answers)
    sequences = torch.full((len(answers), P + T), int(pad_token_id), dtype=torch.long)
    attention = torch.zeros((len(answers), P + T), dtype=torch.long)
    loss_mask = torch.zeros((len(answers), T), dtype=torch.float32)
    for i, a in enumerate(answers):
        sequences[i, P - len(a.prompt_ids) : P] = torch.tensor(a.prompt_ids, dtype=torch.long)
        sequences[i, P : P + len(a.answer_ids)] = torch.tensor(a.answer_ids, dtype=torch.long)
        attention[i, P - len(a.prompt_ids) : P + len(a.answer_ids)] = 1
        loss_mask[i, : len(a.answer_ids)] = 1.0
    return SFTBatch(sequences.to(device), attention.to(device), loss_mask.to(device))


def demonstrations(answers: Sequence[Answer]) -> list[Demonstration]:
    """The answers as SFT demonstrations (sequence-level distillation); empty answers dropped."""
    return [Demonstration(prompt=a.prompt, response=a.text) for a in answers if a.text]


def vocabulary_digest(tokenizer) -> str:
    """A short hash of the token-to-id map: equal digests, equal vocabularies."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256("\n".join(f"{i}\t{t}" for t, i in items).encode()).hexdigest()[:16]


def check_same_tokenizer(teacher_tokenizer, student_tokenizer, teacher: str, student: str) -> None:
    """Raise :class:`TokenizerMismatch` naming both models unless their vocabularies (every
    token and its id) and end-of-turn tokens are the same: the logits of one must index the
    tokens of the other."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        differ = sum(1 for tok in t_vocab.keys() | s_vocab.keys() if t_vocab.get(tok) != s_vocab.get(tok))
        raise TokenizerMismatch(
            f"teacher {teacher} and student {student} have different tokenizers: vocabularies of {len(t_vocab)} and "
            f"{len(s_vocab)} tokens ({vocabulary_digest(teacher_tokenizer)} vs {vocabulary_digest(student_tokenizer)}), "
            f"{differ} token(s) differ; distillation on logits needs the same tokenizer")
    if teacher_tokenizer.eos_token_id != student_tokenizer.eos_token_id:
        raise TokenizerMismatch(
            f"teacher {teacher} and student {student} end their turns with different tokens "
            f"({teacher_tokenizer.eos_token!r} and {student_tokenizer.eos_token!r})")
