"""`hitl prompts preview|stats` (actors/prompts_command.py) through click, on the tiny model's
tokenizer: the exact rendered text, the template version, categories and token counts. No Ray."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner

from actors.config import RunConfig
from hitl.cli import main
from rlhf.config import load_config
from rlhf.models import load_tokenizer
from rlhf.prompts import load_prompt_set, split_prompts
from rlhf.templates import render_prompt


def _config(tmp_path, **template) -> str:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?", "topic": "even" if i % 2 == 0 else "odd"}) + "\n"
                               for i in range(20)))
    cfg = {
        "model": {"source": "tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64},
        "data": {"prompt_sources": [{"kind": "jsonl", "path": str(prompts), "category_field": "topic"}, {"kind": "builtin"}],
                 "validation_fraction": 0.2, "max_prompt_tokens": 40},
        "template": template,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_preview_prints_what_the_model_sees(tmp_path):
    path = _config(tmp_path, system="Answer like a pirate.", few_shot=[{"user": "Hi?", "assistant": "Ahoy!"}])
    result = CliRunner().invoke(main, ["prompts", "preview", path, "--n", "2", "--split", "held-out"])
    assert result.exit_code == 0, result.output
    cfg = load_config(path, RunConfig)
    held_out = split_prompts(load_prompt_set(cfg.data), 0.2, 0).evaluation
    tokenizer = load_tokenizer(cfg.model)
    assert f"template {cfg.template.version};" in result.output and f"2 of {len(held_out)} held-out prompts" in result.output
    for i, prompt in enumerate(held_out[:2], start=1):
        text = render_prompt(tokenizer, prompt.text, cfg.template)
        tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
        assert text in result.output and "Answer like a pirate." in text and "Ahoy!" in text
        assert f"--- prompt {i} · category: {prompt.category or '-'} · data.prompt_sources[{prompt.source}] · {tokens} tokens" in result.output
    assert held_out[2].text not in result.output


def test_stats_count_sources_categories_and_long_prompts(tmp_path):
    result = CliRunner().invoke(main, ["prompts", "stats", _config(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert stats["prompts"] == 260
    jsonl = stats["by_source"]["data.prompt_sources[0]"]
    assert jsonl["kind"] == "jsonl" and jsonl["train"] + jsonl["held-out"] == 20
    assert sum(stats["by_category"]["train"].values()) + sum(stats["by_category"]["held-out"].values()) == 260
    assert stats["by_category"]["train"].get("even", 0) + stats["by_category"]["held-out"].get("even", 0) == 10
    # the builtin set's system prompt (SmolLM2's default) makes its prompts longer than 40 tokens
    assert stats["too_long"]["train"] + stats["too_long"]["held-out"] > 0 and stats["longest_tokens"] > 40


def test_a_prompt_source_without_its_field_fails_naming_it(tmp_path):
    path = _config(tmp_path)
    raw = yaml.safe_load(open(path))
    raw["data"]["prompt_sources"][0]["field"] = "question"
    open(path, "w").write(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["prompts", "preview", path])
    assert result.exit_code == 2 and "error: data.prompt_sources[0].field:" in result.output and "'question'" in result.output


def test_a_model_without_a_system_role_fails_naming_template_system(tmp_path):
    tokenizer = load_tokenizer(RunConfig().model)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}{{ m['content'] }}\n{% endfor %}")
    tokenizer.save_pretrained(str(tmp_path / "model"))  # a model directory as `source: hf` reads its tokenizer
    path = _config(tmp_path, system="Answer like a pirate.")
    raw = yaml.safe_load(open(path))
    raw["model"] = {"source": "hf", "path": str(tmp_path / "model")}
    open(path, "w").write(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["prompts", "preview", path])
    assert result.exit_code == 2 and "error: template.system: the chat template of model" in result.output
    assert "rejects a system message" in result.output
