"""Prompt sources (rlhf/prompts.py): JSONL, Parquet and `datasets` directories with categories,
errors that name the source's field, and categories carried through the split."""

from __future__ import annotations

import json

import pytest

from rlhf.config import ConfigError, DataConfig, PromptSource, RLHFConfig, parse_config
from rlhf.prompts import Prompt, PromptSourceError, load_prompt_set, load_prompts, read_prompts, split_prompts


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_prompts_carry_their_categories(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"q": "Name a fruit.", "topic": "food"}, {"q": "Say hi."}, {"q": "Count.", "topic": None}])
    got = read_prompts(PromptSource(kind="jsonl", path=path, field="q", category_field="topic"))
    assert got == [Prompt("Name a fruit.", "food"), Prompt("Say hi.", None), Prompt("Count.", None)]


def test_parquet_prompts_and_categories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a?", "b?"], "cat": ["x", None], "other": [1, 2]}), tmp_path / "p.parquet")
    got = read_prompts(PromptSource(kind="parquet", path=tmp_path / "p.parquet", field="text", category_field="cat"), index=2)
    assert got == [Prompt("a?", "x", 2), Prompt("b?", None, 2)]


def test_a_datasets_directory_and_its_splits(tmp_path):
    import datasets  # a test dependency: the `datasets` source kind is part of what CI checks

    datasets.Dataset.from_dict({"prompt": ["c", "d"], "kind": ["m", "n"]}).save_to_disk(str(tmp_path / "one"))
    both = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["e"]}),
                                 "test": datasets.Dataset.from_dict({"prompt": ["f"]})})
    both.save_to_disk(str(tmp_path / "both"))
    assert read_prompts(PromptSource(kind="datasets", path=tmp_path / "one", category_field="kind")) == [
        Prompt("c", "m"), Prompt("d", "n")]
    assert read_prompts(PromptSource(kind="datasets", path=tmp_path / "both", split="test")) == [Prompt("f")]
    with pytest.raises(PromptSourceError, match=r"data\.prompt_sources\[0\]\.split: .* train, test: name one"):
        read_prompts(PromptSource(kind="datasets", path=tmp_path / "both"))


def test_a_missing_field_is_named_by_its_config_path(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = _jsonl(tmp_path / "good.jsonl", [{"prompt": "fine"}])
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt key"}])
    cfg = DataConfig(prompt_sources=(PromptSource(kind="jsonl", path=good), PromptSource(kind="jsonl", path=bad)))
    with pytest.raises(PromptSourceError, match=r"^data\.prompt_sources\[1\]\.field: .*bad\.jsonl:2: .*'prompt'"):
        load_prompt_set(cfg)
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "p.parquet")
    columnar = DataConfig(prompt_sources=(PromptSource(), PromptSource(kind="parquet", path=tmp_path / "p.parquet", category_field="c")))
    with pytest.raises(PromptSourceError, match=r"^data\.prompt_sources\[1\]\.field: .*no column 'prompt' \(columns: text\)"):
        load_prompt_set(columnar)


def test_category_field_and_split_only_where_they_mean_something():
    with pytest.raises(ConfigError, match=r"data\.prompt_sources\[0\]: .*category_field"):
        parse_config({"data": {"prompt_sources": [{"kind": "text", "path": "p.txt", "category_field": "c"}]}}, RLHFConfig)
    with pytest.raises(ConfigError, match=r"data\.prompt_sources\[0\]: split: only for kind 'datasets'"):
        parse_config({"data": {"prompt_sources": [{"kind": "parquet", "path": "p.parquet", "split": "train"}]}}, RLHFConfig)


def test_categories_go_through_the_split_and_texts_split_as_before(tmp_path):
    rows = [{"prompt": f"question {i}", "c": "even" if i % 2 == 0 else "odd"} for i in range(40)]
    path = _jsonl(tmp_path / "p.jsonl", rows + [{"prompt": "question 0", "c": "duplicate"}])
    cfg = DataConfig(prompt_sources=(PromptSource(kind="jsonl", path=path, category_field="c"),))
    records = load_prompt_set(cfg)
    assert len(records) == 40 and records[0] == Prompt("question 0", "even")  # the first copy wins
    split = split_prompts(records, 0.25, 3)
    texts = split_prompts(load_prompts(cfg), 0.25, 3)
    assert [p.text for p in split.train] == list(texts.train) and [p.text for p in split.evaluation] == list(texts.evaluation)
    assert split.evaluation and all(p.category == ("even" if int(p.text.split()[1]) % 2 == 0 else "odd")
                                    for p in split.train + split.evaluation)
