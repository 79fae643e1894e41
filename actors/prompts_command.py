"""`hitl prompts preview|stats`: the prompt set and the template of a run config, as the model sees them.

    hitl prompts preview configs/local.yaml                   # 3 train prompts, rendered
    hitl prompts preview configs/local.yaml --n 5 --split held-out
    hitl prompts stats configs/local.yaml                     # counts per source and category

The config is read as `hitl run` reads it (a whole run config, validated); the prompts are
read and split as the loop reads and splits them (rlhf/prompts.py) and rendered by the one
renderer that rollouts, SFT, the reward model and the generation engines use
(rlhf/templates.py), with the config's model's tokenizer. Token counts are of the rendered
text, as rollouts tokenize it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

from services.command_line import fail

SPLITS = ("train", "held-out")


@click.group()
def prompts() -> None:
    """The prompt set and the template of a run config, as the model sees them."""


def _load(config: str):
    """(run config, tokenizer, train/held-out split of the prompt records); any problem fails with its field."""
    from actors.config import RunConfig
    from rlhf.config import ConfigError, load_config
    from rlhf.models import load_tokenizer
    from rlhf.prompts import load_prompt_set, split_prompts
    from rlhf.templates import check_template

    try:
        cfg = load_config(Path(config), RunConfig)
        records = load_prompt_set(cfg.data)
        split = split_prompts(records, cfg.data.validation_fraction, cfg.data.split_seed)
        tokenizer = load_tokenizer(cfg.model)
        check_template(tokenizer, cfg.template, f"model {cfg.model.path or cfg.model.source}")
    except (ConfigError, ValueError, FileNotFoundError) as err:  # PromptSourceError and TemplateError are ValueErrors
        fail(str(err))
    return cfg, tokenizer, split


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _template_line(cfg) -> str:
    t = cfg.template
    return f"template {t.version}" + (f" ({t.name})" if t.name else "") + (" (default: one user turn)" if t.is_default else "")


@prompts.command("preview")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--n", "count", type=click.IntRange(1), default=3, show_default=True, help="Prompts to show.")
@click.option("--split", "side", type=click.Choice(SPLITS), default="train", show_default=True,
              help="Which side of the train/held-out split.")
def preview(config: str, count: int, side: str) -> None:
    """Print, for the first N prompts of a split, the exact text the policy continues (the
    template rendered in the model's chat template), with its category and token count."""
    from rlhf.templates import render_prompt

    cfg, tokenizer, split = _load(config)
    chosen = split.train if side == "train" else split.evaluation
    limit = cfg.data.max_prompt_tokens
    click.echo(f"{_template_line(cfg)}; model {cfg.model.path or cfg.model.source}; "
               f"{min(count, len(chosen))} of {len(chosen)} {side} prompts")
    for i, prompt in enumerate(chosen[:count], start=1):
        text = render_prompt(tokenizer, prompt.text, cfg.template)
        tokens = _token_count(tokenizer, text)
        over = f" (over data.max_prompt_tokens {limit})" if tokens > limit else ""
        click.echo(f"--- prompt {i} · category: {prompt.category or '-'} · data.prompt_sources[{prompt.source}] · "
                   f"{tokens} tokens{over}")
        click.echo(text)
    click.echo("---")


@prompts.command("stats")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def stats(config: str, as_json: bool) -> None:
    """Prompts per source and per category on each side of the split, and how many are longer
    than data.max_prompt_tokens once rendered."""
    from rlhf.templates import render_prompt

    cfg, tokenizer, split = _load(config)
    limit = cfg.data.max_prompt_tokens
    sides = {"train": split.train, "held-out": split.evaluation}
    lengths = {p.text: _token_count(tokenizer, render_prompt(tokenizer, p.text, cfg.template)) for p in split.train + split.evaluation}
    summary = {
        "template": cfg.template.version,
        "prompts": len(lengths),
        "by_source": {
            f"data.prompt_sources[{i}]": {
                "kind": source.kind,
                "from": str(source.path) if source.path is not None else source.name,
                **{side: sum(1 for p in chosen if p.source == i) for side, chosen in sides.items()},
            }
            for i, source in enumerate(cfg.data.prompt_sources)
        },
        "by_category": {side: dict(sorted(Counter(p.category or "-" for p in chosen).items())) for side, chosen in sides.items()},
        "too_long": {side: sum(1 for p in chosen if lengths[p.text] > limit) for side, chosen in sides.items()},
        "max_prompt_tokens": limit,
        "longest_tokens": max(lengths.values()),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{_template_line(cfg)}; {summary['prompts']} prompts (duplicates removed)")
    click.echo(f"{'source':<26} {'kind':<9} {'train':>7} {'held-out':>9}  from")
    for name, row in summary["by_source"].items():
        click.echo(f"{name:<26} {row['kind']:<9} {row['train']:>7} {row['held-out']:>9}  {row['from']}")
    categories = sorted(set(summary["by_category"]["train"]) | set(summary["by_category"]["held-out"]))
    click.echo(f"{'category':<26} {'':<9} {'train':>7} {'held-out':>9}")
    for name in categories:
        click.echo(f"{name:<26} {'':<9} {summary['by_category']['train'].get(name, 0):>7} "
                   f"{summary['by_category']['held-out'].get(name, 0):>9}")
    too_long = summary["too_long"]
    click.echo(f"longer than data.max_prompt_tokens ({limit}) once rendered: {too_long['train']} train, "
               f"{too_long['held-out']} held-out; the longest has {summary['longest_tokens']} tokens")
