"""`hitl run` (the loop on Ray) and `hitl annotators` (the annotator quality table of a store).

    hitl run configs/local.yaml                  # a new run; reports and checkpoints in its run_dir
    hitl run --resume runs/local                 # continue a stopped run from its last checkpoint
    hitl annotators [--store URL] [--project P] [--min-gold N] [--pause-below X] [--json]
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from services.command_line import fail
from services.feedback.config import DEFAULT_STORE


@click.command()
@click.argument("config", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--resume", "resume_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Continue the stopped run in this directory (its config.json is used).")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None, help="Where reports and checkpoints go (default: coordinator.run_dir).")
@click.option("--rounds", type=click.IntRange(1), default=None, help="Override coordinator.rounds.")
@click.option("--resume-if-present", is_flag=True,
              help="With CONFIG: when its run directory already holds a run, continue that run instead (a job that is retried).")
def run(config: str | None, resume_dir: str | None, run_dir: str | None, rounds: int | None, resume_if_present: bool) -> None:
    """Run the loop: rounds of feedback, reward model, PPO and serving."""
    from actors.config import RunConfig
    from actors.coordinator import Coordinator
    from rlhf.config import ConfigError as RunConfigError
    from rlhf.config import load_config

    if (config is None) == (resume_dir is None):
        fail("give a CONFIG file or --resume RUN_DIR (one of them)")
    if resume_if_present and config is not None:
        try:
            target = Path(run_dir) if run_dir else load_config(Path(config), RunConfig).coordinator.run_dir
        except RunConfigError as err:
            fail(str(err))
        if (target / "config.json").exists():
            click.echo(f"{target}: a run is there; continuing it (--resume-if-present)", err=True)
            config, resume_dir = None, str(target)
    try:
        path = Path(resume_dir) / "config.json" if resume_dir else Path(config)
        cfg = load_config(path, RunConfig)
        if rounds is not None:
            cfg = RunConfig.model_validate({**cfg.model_dump(), "coordinator": {**cfg.coordinator.model_dump(), "rounds": rounds}})
    except (RunConfigError, FileNotFoundError) as err:
        fail(str(err))
    directory = Path(resume_dir or run_dir or cfg.coordinator.run_dir)
    try:
        reports = Coordinator(cfg, directory, resume=resume_dir is not None).run()
    except RunConfigError as err:  # what only the cluster shows (e.g. a node-local store on several nodes)
        fail(str(err))
    final = reports[-1] if reports else None
    if final is not None:
        click.echo(json.dumps({"run_dir": str(directory), "rounds": len(reports), "win_rate": final.win_rate, "kl": final.kl, "reward": final.reward}))


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
    from rlhf.quality import AnnotatorQualityConfig, format_table, store_summary
    from services.feedback.store import open_store

    options = {"min_gold": min_gold, "pause_below_gold_accuracy": pause_below}
    cfg = AnnotatorQualityConfig(**{k: v for k, v in options.items() if v is not None})
    db = open_store(store)
    try:
        summary = store_summary(db, list(projects) or None, cfg).as_dict()
    finally:
        db.close()
    click.echo(json.dumps(summary, indent=2) if as_json else format_table(summary))
