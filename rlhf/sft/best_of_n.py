"""Rejection-sampling fine-tuning's choice (``ppo.algorithm: best_of_n``): of n sampled
answers to a prompt, the one the reward model scores highest, kept where it stands out from
the others. The loop samples and scores (actors/coordinator.py `best_of_n`); the SFT step
trains on the picks (`run_sft`)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.quality.judges import answer_text


@dataclass(frozen=True)
class Pick:
    """A prompt's best sampled answer, chosen by the reward model."""

    prompt: str
    answer: str
    reward: float
    gap: float  # its reward above the mean of the prompt's other answers


def pick_best(prompts: list[str], answers: list[list[str]], scores: list[float], min_gap: float,
              keep_fraction: float) -> list[Pick]:
    """Each prompt's highest-scored non-empty answer (`scores` in the order of the flattened
    `answers`), where it beats the mean of the others by more than `min_gap`; of those, the
    `keep_fraction` with the largest gaps, in prompt order."""
    picks, k = [], 0
    for prompt, texts in zip(prompts, answers, strict=True):
        own = scores[k:k + len(texts)]
        k += len(texts)
        ranked = sorted(((s, i) for i, s in enumerate(own) if answer_text(texts[i]).strip()), reverse=True)
        if not ranked or len(own) < 2:
            continue
        best, i = ranked[0]
        others = [s for j, s in enumerate(own) if j != i]
        gap = best - sum(others) / len(others)
        if gap > min_gap:
            picks.append(Pick(prompt, answer_text(texts[i]), best, gap))
    if k != len(scores):
        raise ValueError(f"pick_best: {len(scores)} scores for {k} answers")
    keep = max(1, round(len(picks) * keep_fraction)) if picks else 0
    chosen = set(id(p) for p in sorted(picks, key=lambda p: -p.gap)[:keep])
    return [p for p in picks if id(p) in chosen]
