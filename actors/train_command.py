"""`hitl train dpo|ipo|kto`: preference optimisation offline, over a store or an exported file.

    hitl train dpo --config configs/local.yaml --store sqlite:///hitl-data/feedback.db --out runs/dpo
    hitl train kto --config configs/local.yaml --data hh.jsonl --format hh-rlhf --out runs/kto

The judgements are curated as the loop curates them (the config's `curation` section; every
annotator at weight 1), turned into pairs (DPO, IPO) or single judged answers (KTO), and
trained on the config's policy (`model`, `lora`, `deepspeed`, `po`) in one process, on the
same code path as the loop's rounds (rlhf/po/). The result is a run-shaped directory:
`config.json`, `report.json`, and the policy as a checkpoint (`checkpoints/LATEST`), so
`hitl generation serve OUT` serves it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click

from services.command_line import fail

ALGORITHMS = ("dpo", "ipo", "kto")
FILE_FORMATS = ("hh-rlhf", "ultrafeedback", "jsonl")


@click.group()
def train() -> None:
    """Train the policy offline on stored judgements (no rollouts, no reward model)."""


def _command(algorithm: str):
    @train.command(algorithm, help=f"{algorithm.upper()} over a store's judgements or an exported file.")
    @click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
                  help="Run config (model, lora, deepspeed, po, curation sections are used).")
    @click.option("--store", default=None, help="Store URL to read judgements from.")
    @click.option("--project", "projects", multiple=True, help="Only these projects (repeatable; default every project).")
    @click.option("--data", "data_path", default=None, type=click.Path(exists=True, dir_okay=False),
                  help="An exported file instead of a store (with --format).")
    @click.option("--format", "fmt", type=click.Choice(FILE_FORMATS), default=None, help="Format of --data.")
    @click.option("--tasks", "tasks_path", default=None, type=click.Path(exists=True, dir_okay=False),
                  help="With --format jsonl: the tasks file (hitl feedback export --format tasks-jsonl).")
    @click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory for the trained policy.")
    def command(config_path: str, store: str | None, projects: tuple[str, ...], data_path: str | None, fmt: str | None,
                tasks_path: str | None, out_dir: str) -> None:
        if (store is None) == (data_path is None):
            fail("give --store URL or --data FILE --format F (one of them)")
        if data_path is not None and fmt is None:
            fail("--data needs --format (hh-rlhf, ultrafeedback or jsonl)")
        if fmt == "jsonl" and tasks_path is None:
            fail("--format jsonl needs --tasks (the tasks the records judge)")
        cfg = _config(Path(config_path), algorithm)
        summary = train_offline(cfg, Path(out_dir), store=store, projects=list(projects) or None,
                                data=Path(data_path) if data_path else None, fmt=fmt, tasks=Path(tasks_path) if tasks_path else None)
        click.echo(json.dumps(summary))

    return command


for _algorithm in ALGORITHMS:
    _command(_algorithm)


def _config(path: Path, algorithm: str):
    from actors.config import RunConfig
    from rlhf.config import ConfigError, load_config

    try:
        cfg = load_config(path, RunConfig)
        data = cfg.model_dump()
        data["ppo"]["algorithm"] = algorithm
        data["po"] = {**data["po"], "loss": algorithm}
        return RunConfig.model_validate(data)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        fail(str(err))


def _records(store_url: str | None, projects: list[str] | None, data: Path | None, fmt: str | None, tasks: Path | None):
    """(the store, its records): the named store, or a private SQLite store the file is imported into."""
    from services.feedback.formats import FormatError, import_file
    from services.feedback.store import open_store

    if store_url is not None:
        store = open_store(store_url)
        return store, list(store.iter_after(0, projects))
    scratch = Path(tempfile.mkdtemp(prefix="hitl-train-"))
    store = open_store(f"sqlite:///{scratch / 'feedback.db'}")
    try:
        if tasks is not None:
            import_file(store, "tasks-jsonl", tasks)
        report = import_file(store, fmt, data)
    except FormatError as err:
        store.close()
        fail(str(err))
    if report.errors:
        click.echo(f"{data}: {len(report.errors)} line(s) not imported; the first: {report.errors[0]}", err=True)
    return store, list(store.iter_after(0, projects))


def train_offline(cfg, out: Path, *, store: str | None = None, projects: list[str] | None = None, data: Path | None = None,
                  fmt: str | None = None, tasks: Path | None = None) -> dict:
    """Curate, build the examples, train, write the run-shaped output; returns a summary."""
    import torch

    from actors.config import run_config_json
    from actors.trained_run import write_trained_run
    from rlhf.curation.memory import CurationMemory
    from rlhf.curation.rules import curate
    from rlhf.lineage import digest
    from rlhf.po import kto_examples_from, pairs_from, run_preference_optimisation

    db, records = _records(store, projects, data, fmt, tasks)
    try:
        curated = curate(records, db.get_task, cfg=cfg.curation, memory=CurationMemory(cfg.curation),
                         max_demonstrations=cfg.po.max_examples)
    finally:
        db.close()
    algorithm = cfg.ppo.algorithm
    examples = kto_examples_from(curated.items, curated.demonstrations) if algorithm == "kto" else pairs_from(curated.items)
    if not examples:
        fail(f"{algorithm}: no usable judgements among {len(records)} records (curation: {dict(curated.counts)})")
    trainer = _trainer(cfg)
    report = run_preference_optimisation(trainer, examples, cfg.po)
    summary = {"algorithm": algorithm, "records": len(records), "examples": len(examples), "out": str(out),
               "loss_before": report.loss_before, "loss_after": report.loss_after,
               "accuracy_before": report.accuracy_before, "accuracy_after": report.accuracy_after}
    write_trained_run(out, run_config_json(cfg), trainer,
                      {**summary, "report": report.__dict__, "curation": dict(curated.counts), "examples_sha256": digest(examples),
                       "po": cfg.po.model_dump(mode="json"), "device": str(trainer.dist.device), "torch": torch.__version__})
    return summary


def _trainer(cfg):
    """The policy on a DeepSpeed engine in this process (PPO's trainer, with no reward model)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from rlhf.models import load_policy
    from rlhf.ppo.trainer import PPOTrainer

    policy, tokenizer = load_policy(cfg.model, cfg.lora)

    def no_reward(prompts: list[str], responses: list[str]):
        raise RuntimeError("offline preference optimisation scores nothing")

    return PPOTrainer(policy, tokenizer, no_reward, cfg.ppo, cfg.deepspeed, template=cfg.template)

