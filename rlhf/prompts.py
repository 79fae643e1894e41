"""Prompt sets: the ones shipped with hitl, and prompts read from files.

The shipped ``default`` set crosses short instruction templates with everyday
topics (no download). Prompts are split into train and held-out evaluation
sets by a stable hash of their text, so a prompt stays on its side of the
split across runs and rounds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlhf.config import DataConfig, PromptSource
from rlhf.splits import bucket

_TEMPLATES = (
    "Describe {t} in two sentences.",
    "What do you think about {t}?",
    "Write a short note to a friend about {t}.",
    "How would you explain {t} to a child?",
    "Give one tip about {t}.",
    "Tell me something about {t}.",
    "Write one sentence about {t}.",
    "How does {t} make people feel?",
)
_TOPICS = (
    "rainy days", "the weekend", "learning to cook", "a walk in the park", "moving to a new city",
    "winter mornings", "your favourite book", "public transport", "gardening", "a job interview",
    "summer holidays", "the first day at school", "playing chess", "a long flight", "birthdays",
    "working from home", "visiting the dentist", "a thunderstorm", "learning a language", "coffee",
    "the ocean", "a quiet evening", "a busy market", "old friends", "a museum visit",
    "baking bread", "a football match", "the night sky", "spring flowers", "a mountain hike",
)
BUILTIN: dict[str, tuple[str, ...]] = {
    "default": tuple(tmpl.format(t=topic) for topic in _TOPICS for tmpl in _TEMPLATES),
}


@dataclass(frozen=True)
class PromptSplit:
    train: tuple[str, ...]
    evaluation: tuple[str, ...]


def read_source(source: PromptSource) -> list[str]:
    if source.kind == "builtin":
        if source.name not in BUILTIN:
            raise ValueError(f"data.prompt_sources: no builtin prompt set {source.name!r} (have: {', '.join(BUILTIN)})")
        return list(BUILTIN[source.name])
    path = Path(source.path).expanduser()  # type: ignore[arg-type]
    lines = path.read_text(encoding="utf-8").splitlines()
    if source.kind == "text":
        return [line.strip() for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        value = json.loads(line)
        if not isinstance(value, dict) or not isinstance(value.get(source.field), str):
            raise ValueError(f"{path}:{number}: expected an object with a string under {source.field!r}")
        prompts.append(value[source.field])
    return prompts


def load_prompts(cfg: DataConfig) -> list[str]:
    """Every source's prompts, in order, duplicates removed."""
    seen: dict[str, None] = {}
    for source in cfg.prompt_sources:
        for prompt in read_source(source):
            seen.setdefault(prompt, None)
    if not seen:
        raise ValueError("data.prompt_sources: no prompts")
    return list(seen)


def _bucket(prompt: str, seed: int) -> float:
    return bucket(prompt, seed)


def split_prompts(prompts: list[str], fraction: float, seed: int) -> PromptSplit:
    """Stable train / evaluation split: a prompt's side depends only on its text and the seed."""
    evaluation = tuple(p for p in prompts if _bucket(p, seed) < fraction)
    train = tuple(p for p in prompts if _bucket(p, seed) >= fraction)
    if not train:
        raise ValueError("data.validation_fraction leaves no training prompts")
    return PromptSplit(train, evaluation)
