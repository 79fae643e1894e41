"""Demonstrations as token batches: the chat-formatted prompt, left-padded, followed by the
response, right-padded, with a loss mask on the response tokens only.

The layout is the PPO batch's (``rlhf.ppo.rollout``): ``sequences`` is the prompt padded on
the left to P tokens followed by the response padded on the right to T tokens, so the same
forward pass (``response_logprobs``: the LM head only at the T response positions) serves
both. The prompt is rendered by the run's template (``rlhf.templates.render_prompt``: the
tokenizer's chat template, the assistant turn opened), as the generation server renders it; the response is the demonstration's text followed by the
end-of-turn token, so the policy also learns where to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.templates import DEFAULT_TEMPLATE, PromptTemplate, render_prompt


@dataclass(frozen=True)
class Demonstration:
    """What the policy should have answered: a human-corrected response to a prompt."""

    prompt: str
    response: str
    prompt_id: str = ""
    annotator_id: str = ""
    weight: float = 1.0  # multiplies this demonstration's token losses

    def __post_init__(self) -> None:
        if not self.response:
            raise ValueError("a demonstration needs a non-empty response")
        if self.weight < 0.0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")


@dataclass
class SFTBatch:
    """Demonstrations in the PPO batch layout."""

    sequences: Tensor  # (B, P+T) long
    attention_mask: Tensor  # (B, P+T) long: 1 on real prompt and response tokens
    loss_mask: Tensor  # (B, T) float: the demonstration's weight on real response tokens, else 0

    @property
    def response_length(self) -> int:
        return self.loss_mask.shape[1]


def prompt_ids(tokenizer, prompt: str, max_tokens: int, template: PromptTemplate = DEFAULT_TEMPLATE) -> list[int]:
    """The rendered prompt (the template's turns, the user turn, the opened assistant turn), as
    token ids; the last ``max_tokens``."""
    text = render_prompt(tokenizer, prompt, template)
    return tokenizer(text, add_special_tokens=False).input_ids[-max_tokens:]


def response_ids(tokenizer, response: str, max_tokens: int) -> list[int]:
    """The response's tokens and the end-of-turn token; the first ``max_tokens``."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-turn (eos) token")
    return (tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])[:max_tokens]


def make_batch(
    tokenizer,
    demos: Sequence[Demonstration | None],
    max_prompt_tokens: int,
    max_response_tokens: int,
    device: torch.device | str = "cpu",
    filler: Demonstration | None = None,
    template: PromptTemplate = DEFAULT_TEMPLATE,
) -> SFTBatch:
    """Token batch of ``demos``, prompts rendered by ``template``; a ``None`` row is padding: a
    copy of ``filler`` (default: the first real row) with a zero loss mask. Padding keeps the
    ranks' forward and backward passes in step and adds nothing to the loss."""
    real = filler or next((d for d in demos if d is not None), None)
    if real is None:
        raise ValueError("a batch of padding only needs a filler demonstration")
    rows = [(d or real, 0.0 if d is None else d.weight) for d in demos]
    prompts = [prompt_ids(tokenizer, d.prompt, max_prompt_tokens, template) for d, _ in rows]
    responses = [response_ids(tokenizer, d.response, max_response_tokens) for d, _ in rows]
    P = max(len(p) for p in prompts)
    T = max(len(r) for r in responses)
    pad = int(tokenizer.pad_token_id)
    sequences = torch.full((len(rows), P + T), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), P + T), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), T), dtype=torch.float32)
    for i, (p, r, (_, weight)) in enumerate(zip(prompts, responses, rows)):
        sequences[i, P - len(p) : P] = torch.tensor(p)
        sequences[i, P : P + len(r)] = torch.tensor(r)
        attention[i, P - len(p) : P + len(r)] = 1
        loss_mask[i, : len(r)] = weight
    return SFTBatch(sequences.to(device), attention.to(device), loss_mask.to(device))
