"""Prompt sets: the ones shipped with hitl, and prompts read from files.

    from rlhf.prompts import load_prompt_set, split_prompts
    prompts = load_prompt_set(cfg.data)            # [Prompt(text, category, source)], duplicates removed
    split = split_prompts(prompts, cfg.data.validation_fraction, cfg.data.split_seed)

The shipped ``default`` set crosses short instruction templates with everyday
topics (no download). Files are text (a prompt a line), JSONL, Parquet or a Hugging Face
``datasets`` directory (``save_to_disk``), each with an optional category per prompt.
Prompts are split into train and held-out evaluation sets by a stable hash of their text,
so a prompt stays on its side of the split across runs and rounds; its category goes along.
``load_prompts`` gives the texts alone, for callers that need no categories.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

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
class Prompt:
    """One prompt of the prompt set."""

    text: str
    category: str | None = None  # from the source's category_field; None: none
    source: int = 0  # index of the data.prompt_sources entry it was read from (the first, for a duplicate)


P = TypeVar("P", str, Prompt)


@dataclass(frozen=True)
class PromptSplit(Generic[P]):
    train: tuple[P, ...]
    evaluation: tuple[P, ...]


class PromptSourceError(ValueError):
    """A prompt source that cannot be read: ``key`` is the source's field at fault (``path``,
    ``field``, ``category_field``, ``split``, ``name``), ``detail`` what was wrong (with the file
    and line or row)."""

    def __init__(self, where: str, key: str, detail: str) -> None:
        self.where, self.key, self.detail = where, key, detail
        super().__init__(f"{where}.{key}: {detail}")


def read_prompts(source: PromptSource, where: str = "data.prompt_sources[0]", index: int = 0) -> list[Prompt]:
    """Every prompt of one source, in file order; errors name ``where`` and the source's field."""
    if source.kind == "builtin":
        if source.name not in BUILTIN:
            raise PromptSourceError(where, "name", f"no builtin prompt set {source.name!r} (have: {', '.join(BUILTIN)})")
        return [Prompt(text, None, index) for text in BUILTIN[source.name]]
    path = Path(source.path).expanduser()  # type: ignore[arg-type]
    if not path.exists():
        raise PromptSourceError(where, "path", f"{path}: no such file or directory")
    if source.kind == "text":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [Prompt(line.strip(), None, index) for line in lines if line.strip()]
    rows = _rows(source, path, where)
    return [Prompt(_text(source, row, at, where), _category(source, row, at, where), index) for at, row in rows]


def _rows(source: PromptSource, path: Path, where: str) -> list[tuple[str, dict[str, Any]]]:
    """(where in the file, row) of a JSONL, Parquet or ``datasets`` source."""
    if source.kind == "jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptSourceError(where, "path", f"{path}:{number}: not JSON ({err})") from None
            if not isinstance(value, dict):
                raise PromptSourceError(where, "path", f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
            rows.append((f"{path}:{number}", value))
        return rows
    columns, table = _table(source, path, where)
    for key in ("field", "category_field"):
        name = getattr(source, key)
        if name is not None and name not in columns:
            raise PromptSourceError(where, key, f"{path}: no column {name!r} (columns: {', '.join(columns)})")
    return [(f"{path}: row {i}", row) for i, row in enumerate(table)]


def _table(source: PromptSource, path: Path, where: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The column names and the rows (the prompt and category columns only) of a Parquet file
    or a ``datasets`` directory."""
    wanted = [c for c in (source.field, source.category_field) if c is not None]
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            columns = list(pq.read_schema(path).names)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise PromptSourceError(where, "path", f"{path}: not a Parquet file ({err})") from None
        present = [c for c in wanted if c in columns]
        return columns, pq.read_table(path, columns=present).to_pylist()
    try:
        import datasets
    except ImportError:
        raise PromptSourceError(where, "kind", "'datasets' needs the datasets package: pip install 'hitl[prompts]'") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise PromptSourceError(where, "path", f"{path}: not a directory written by datasets' save_to_disk ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if source.split is None and len(splits) != 1:
            raise PromptSourceError(where, "split", f"{path} holds the splits {', '.join(splits)}: name one")
        name = source.split if source.split is not None else splits[0]
        if name not in loaded:
            raise PromptSourceError(where, "split", f"{path}: no split {name!r} (have: {', '.join(splits)})")
        loaded = loaded[name]
    elif source.split is not None:
        raise PromptSourceError(where, "split", f"{path} holds one dataset, no splits: leave split out")
    columns = list(loaded.column_names)
    present = [c for c in wanted if c in columns]
    return columns, loaded.select_columns(present).to_list()


def _text(source: PromptSource, row: dict[str, Any], at: str, where: str) -> str:
    value = row.get(source.field)
    if not isinstance(value, str) or not value.strip():
        shown = "no value" if value is None else repr(value)[:60]
        raise PromptSourceError(where, "field", f"{at}: expected a non-empty string under {source.field!r}, got {shown}")
    return value


def _category(source: PromptSource, row: dict[str, Any], at: str, where: str) -> str | None:
    if source.category_field is None:
        return None
    value = row.get(source.category_field)
    if value is not None and not isinstance(value, str):
        raise PromptSourceError(where, "category_field", f"{at}: the category under {source.category_field!r} must be a "
                                f"string, got {type(value).__name__}")
    return value


def read_source(source: PromptSource) -> list[str]:
    """The texts of one source's prompts, in file order."""
    return [p.text for p in read_prompts(source)]


def load_prompt_set(cfg: DataConfig) -> list[Prompt]:
    """Every source's prompts, in order, duplicates removed (the first keeps its category)."""
    seen: dict[str, Prompt] = {}
    for i, source in enumerate(cfg.prompt_sources):
        for prompt in read_prompts(source, f"data.prompt_sources[{i}]", i):
            seen.setdefault(prompt.text, prompt)
    if not seen:
        raise ValueError("data.prompt_sources: no prompts")
    return list(seen.values())


def load_prompts(cfg: DataConfig) -> list[str]:
    """Every source's prompt texts, in order, duplicates removed."""
    return [p.text for p in load_prompt_set(cfg)]


def _bucket(prompt: str, seed: int) -> float:
    return bucket(prompt, seed)


def _key(prompt: str | Prompt) -> str:
    return prompt.text if isinstance(prompt, Prompt) else prompt


def split_prompts(prompts: Sequence[P], fraction: float, seed: int) -> PromptSplit[P]:
    """Stable train / evaluation split: a prompt's side depends only on its text and the seed.
    Texts give texts, :class:`Prompt` records give records (with their categories)."""
    evaluation = tuple(p for p in prompts if _bucket(_key(p), seed) < fraction)
    train = tuple(p for p in prompts if _bucket(_key(p), seed) >= fraction)
    if not train:
        raise ValueError("data.validation_fraction leaves no training prompts")
    return PromptSplit(train, evaluation)
