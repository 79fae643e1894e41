"""KL of a local policy to its reference, measured on its own evaluation answers.

For each prompt x (in the chat template, as the policy saw it) and the policy's answer y
(its text encoded by the tokenizer, without special tokens), the summed token log-ratio
sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]; the figure is the mean over the
answers. On answers sampled from pi this mean estimates KL(pi || pi_ref) per answer; the
evaluation's answers are greedy, so it is the log-ratio on the policy's most likely answers
(the quantity the PPO penalty sees on its rollouts, measured on the greedy ones).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def answer_logprobs(model, tokenizer, prompt_texts: Sequence[str], answers: Sequence[str], batch_size: int = 8) -> list[float]:
    """The summed log-probability of each answer's tokens given its prompt text."""
    device = next(model.parameters()).device
    out: list[float] = []
    for k in range(0, len(answers), batch_size):
        rows, starts = [], []
        for prompt, answer in zip(prompt_texts[k:k + batch_size], answers[k:k + batch_size]):
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a = tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
            rows.append(p + a)
            starts.append(len(p))
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        for i, (r, s) in enumerate(zip(rows, starts)):
            out.append(float(logp[i, s - 1:len(r) - 1].sum()) if len(r) > s else 0.0)
    return out


def mean_log_ratio(policy, reference, tokenizer, prompt_texts: Sequence[str], answers: Sequence[str]) -> float:
    """Mean over the answers of the summed token log-ratio policy / reference (module docstring)."""
    if not answers:
        raise ValueError("mean_log_ratio needs at least one answer")
    lp = answer_logprobs(policy, tokenizer, prompt_texts, answers)
    lr = answer_logprobs(reference, tokenizer, prompt_texts, answers)
    return sum(x - y for x, y in zip(lp, lr)) / len(answers)
