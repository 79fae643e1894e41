"""`hitl annotators`: the annotator quality table of a store (see actors/annotator_quality.py)."""

from __future__ import annotations

import json

import click

from services.feedback.config import DEFAULT_STORE


@click.command()
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URL.")
@click.option("--project", "projects", multiple=True, help="Only these projects (repeatable; default: every project).")
@click.option("--min-gold", type=click.IntRange(1), default=None, help="Gold answers needed before gold accuracy counts (default 5).")
@click.option("--pause-below", type=click.FloatRange(0.0, 1.0), default=None, help="Gold accuracy under which an annotator is paused (default 0.6).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON instead of a table.")
def annotators(store: str, projects: tuple[str, ...], min_gold: int | None, pause_below: float | None, as_json: bool) -> None:
    """Annotator quality over every stored judgement: a row per annotator (judgements, gold
    answered and accuracy, agreement with the consensus, position bias, lead-time outlier,
    weight, paused) and Krippendorff's alpha per question kind."""
    from actors.annotator_quality import AnnotatorQualityConfig, format_table, store_summary
    from services.feedback.store import open_store

    options = {"min_gold": min_gold, "pause_below_gold_accuracy": pause_below}
    cfg = AnnotatorQualityConfig(**{k: v for k, v in options.items() if v is not None})
    db = open_store(store)
    try:
        summary = store_summary(db, list(projects) or None, cfg).as_dict()
    finally:
        db.close()
    click.echo(json.dumps(summary, indent=2) if as_json else format_table(summary))
