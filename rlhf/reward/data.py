"""Preference pairs as reward-model training data: soft targets, weights, a prompt-grouped
train/validation split, and chat-formatted token batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.preferences import PreferencePair, soft_label
from rlhf.reward.config import RewardConfig
from rlhf.splits import bucket
from rlhf.templates import DEFAULT_TEMPLATE, PromptTemplate, render_exchange


@dataclass(frozen=True)
class TrainingPair:
    """One term of the Bradley–Terry loss."""

    prompt: str
    response_a: str
    response_b: str
    target: float  # P(A > B) the scores should express, in [0, 1]; 0.5 = tie
    weight: float  # multiplies this term (annotator trust, ranking share)
    group_key: str  # the prompt, for grouping in splits


@dataclass(frozen=True)
class PairSplit:
    """Training and validation pairs; no prompt appears on both sides."""

    train: list[TrainingPair]
    validation: list[TrainingPair]


@dataclass
class TokenBatch:
    """Chat-formatted (prompt, response) sequences, right-padded."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token, 0 = pad (right side)


def training_pairs(pairs: Sequence[PreferencePair], cfg: RewardConfig) -> list[TrainingPair]:
    """Targets and weights of the pairs; pairs left out by the tie/both-bad rules, and pairs
    of weight 0, are dropped."""
    out: list[TrainingPair] = []
    for pair in pairs:
        target = soft_label(
            pair,
            ties=cfg.ties,
            both_bad=cfg.both_bad,
            unstated_strength=cfg.unstated_strength,
            label_smoothing=cfg.label_smoothing,
        )
        if target is None or pair.weight == 0.0:
            continue
        out.append(
            TrainingPair(
                prompt=pair.prompt,
                response_a=pair.response_a,
                response_b=pair.response_b,
                target=target,
                weight=pair.weight,
                group_key=pair.group_key,
            )
        )
    return out


def split_by_prompt(pairs: Sequence[TrainingPair], fraction: float, seed: int) -> PairSplit:
    """Hold out about ``fraction`` of the prompts (with all their pairs) for validation.

    A prompt's side is fixed by a hash of (seed, its key) (``rlhf.splits.bucket``), so as pairs
    are added round after round no prompt ever changes side: one held out for validation is
    never trained on. One exception keeps both sides non-empty: when the first two prompts (in
    order of first appearance) hash to the same side, the second goes to the other; that is
    decided by the start of the list alone, so appending pairs does not undo it. Needs pairs
    from at least 2 prompts.
    """
    keys = list(dict.fromkeys(pair.group_key for pair in pairs))
    if len(keys) < 2:
        raise ValueError(f"need pairs from at least 2 prompts to split, got {len(keys)}")
    held_out = {key for key in keys if bucket(key, seed) < fraction}
    if (keys[0] in held_out) == (keys[1] in held_out):
        held_out ^= {keys[1]}
    return PairSplit(
        train=[pair for pair in pairs if pair.group_key not in held_out],
        validation=[pair for pair in pairs if pair.group_key in held_out],
    )


def chat_text(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str,
              template: PromptTemplate = DEFAULT_TEMPLATE) -> str:
    """The (prompt, response) exchange as the template renders it in the tokenizer's chat
    template (``rlhf.templates.render_exchange``): the text the reward model scores."""
    return render_exchange(tokenizer, prompt, response, template)


def encode(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
    template: PromptTemplate = DEFAULT_TEMPLATE,
) -> TokenBatch:
    """Tokenize chat-formatted pairs; keep the last ``max_length`` tokens of each (the score
    is read at the end); pad on the right."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    texts = [chat_text(tokenizer, p, r, template) for p, r in zip(prompts, responses)]
    rows = [ids[-max_length:] for ids in tokenizer(texts, add_special_tokens=False).input_ids]
    return right_padded(rows, int(tokenizer.pad_token_id))


def right_padded(rows: Sequence[Sequence[int]], pad: int) -> TokenBatch:
    """Token rows padded on the right with ``pad``, and their mask."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return TokenBatch(input_ids=input_ids, attention_mask=attention_mask)
