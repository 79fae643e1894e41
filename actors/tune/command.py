"""`hitl tune SPACE --out OUT` and `hitl tune --resume OUT` (see actors/tune/__init__.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from services.command_line import fail

STATE = "tune.json"  # OUT/tune.json: the space, the base config and the snapshot, as the search started


@click.command("tune")
@click.argument("space_file", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Directory for the search and its results.")
@click.option("--resume", "resume_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Continue the search in this directory (after a crash or a kill).")
@click.option("--address", default=None, help="Ray cluster to run on (default: RAY_ADDRESS, else a local one).")
def tune_command(space_file: str | None, out_dir: str | None, resume_dir: str | None, address: str | None) -> None:
    """Search run-config fields with Ray Tune (grid, random, Optuna TPE; ASHA stops weak trials)."""
    if resume_dir is not None:
        if space_file or out_dir:
            fail("--resume OUT takes no SPACE_FILE and no --out (the search's own copy of both is in OUT)")
        out = Path(resume_dir)
        if not (out / STATE).exists():
            fail(f"{out}: no {STATE} here, so no search to resume")
        state = json.loads((out / STATE).read_text())
    else:
        if not space_file or not out_dir:
            fail("give SPACE_FILE and --out OUT (or --resume OUT)")
        out = Path(out_dir)
        if (out / STATE).exists():
            fail(f"{out}: a search is already here; continue it with --resume {out}, or choose another --out")
        state = prepare(Path(space_file))
        out.mkdir(parents=True, exist_ok=True)
        (out / STATE).write_text(json.dumps(state, indent=2))
    summary = run_search(state, out, address=address, resume=resume_dir is not None)
    click.echo(json.dumps(summary))


def prepare(space_file: Path) -> dict:
    """The space and base config checked (every problem named, before anything runs), and
    the replay snapshot's watermark fixed."""
    import yaml

    from actors.config import RunConfig
    from actors.tune.config import TuneSpec
    from actors.tune.space import check_space
    from rlhf.config import ConfigError, parse_config

    try:
        spec = parse_config(yaml.safe_load(space_file.read_text()) or {}, TuneSpec, source=str(space_file))
    except ConfigError as err:
        fail(str(err))
    config_path = (space_file.parent / spec.config) if not spec.config.is_absolute() else spec.config
    if not config_path.exists():
        config_path = spec.config if spec.config.exists() else config_path  # also relative to the working directory
    if not config_path.exists():
        fail(f"{space_file}: config: {spec.config} not found (relative to the space file or the working directory)")
    base = yaml.safe_load(config_path.read_text()) or {}
    try:
        cfg = parse_config(base, RunConfig, source=str(config_path))
    except ConfigError as err:
        fail(str(err))
    problems = check_space(base, spec)
    if spec.search.algorithm == "tpe":
        try:
            import optuna  # noqa: F401
        except ImportError:
            problems.append("search.algorithm: tpe needs Optuna: pip install 'hitl[tune]' (or optuna)")
    if problems:
        fail(f"{space_file}: the space does not fit {config_path}:\n  " + "\n  ".join(problems))
    state = {"space_file": str(space_file), "config_file": str(config_path), "spec": spec.model_dump(mode="json"), "base": base}
    if spec.trial.kind in ("replay", "replay_loop"):
        state["source"] = _snapshot(spec, cfg, space_file.parent)
    return state


def _snapshot(spec, cfg, folder: Path) -> dict:
    from services.feedback.store import open_store

    url = spec.trial.store or cfg.feedback.service.store
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_absolute():
            candidate = folder / path
            path = candidate if candidate.exists() or not path.exists() else path
        if not path.exists():
            fail(f"trial.store: {url}: no such SQLite file")
        url = f"sqlite:///{path.resolve()}"
    project = spec.trial.project or cfg.feedback.project
    store = open_store(url)
    try:
        seqs = [r.seq for r in store.iter_after(0, [project])]
    finally:
        store.close()
    watermark = spec.trial.watermark if spec.trial.watermark is not None else (seqs[-1] if seqs else 0)
    count = sum(1 for s in seqs if s <= watermark)
    if count == 0:
        fail(f"trial.store: {url} holds no records of project {project!r} up to watermark {watermark}: nothing to replay")
    return {"store": url, "project": project, "watermark": watermark, "records": count}


def run_search(state: dict, out: Path, *, address: str | None, resume: bool) -> dict:
    import ray
    from ray import tune

    from actors.config import RunConfig, run_config_json
    from actors.tune.config import TuneSpec
    from actors.tune.results import TrialLog, best_row, rows_from, write_results
    from actors.tune.space import tune_space, with_values
    from rlhf.config import parse_config

    spec = TuneSpec.model_validate(state["spec"])
    base = state["base"]
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"  # the experiment state after every step: a kill loses no finished trial
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # trials read paths relative to where the command ran
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False if address is None and not os.environ.get("RAY_ADDRESS") else None)
    trainable, max_rounds, concurrent = _trainable(spec, base, state.get("source"))
    metric = spec.objective.metric
    storage = str(out.resolve())
    if resume:
        tuner = tune.Tuner.restore(str(out.resolve() / "search"), trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(spec),
            tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=spec.search.trials,
                                        search_alg=_search_algorithm(spec, concurrent), scheduler=_scheduler(spec, max_rounds),
                                        max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name="search", storage_path=storage, verbose=0,
                                      callbacks=[TrialLog(str(out.resolve() / "trials.jsonl"))]),
        )
    grid = tuner.fit()
    rows = rows_from(grid, metric, max_rounds)
    best = best_row(rows)
    best_config = None
    if best is not None:
        best_config = json.loads(run_config_json(parse_config(with_values(base, best.values), RunConfig, source="best")))
    table = write_results(out, rows, metric, best, best_config)
    click.echo(table)
    return {"trials": len(rows), "complete": sum(r.status == "complete" for r in rows),
            "stopped_early": sum(r.status == "stopped early" for r in rows), "errors": sum(r.status == "error" for r in rows),
            "metric": metric, "best": None if best is None else {"trial": best.trial, metric: best.objective, "values": best.values},
            "best_config": str(out / "best.yaml") if best_config else None, "out": str(out)}


def _trainable(spec, base: dict, source: dict | None):
    """(the Tune trainable with its resources, the most rounds a trial reports, trials at once)."""
    from ray import tune

    from actors.tune.trials import ReplaySource, loop_trial, replay_trial

    if spec.trial.kind == "replay":
        src = ReplaySource(store=source["store"], project=source["project"], watermark=source["watermark"], rounds=spec.trial.rounds)
        fn = tune.with_parameters(replay_trial, base=base, source=src, cpus=spec.trial.cpus)
        max_rounds = min(spec.trial.rounds, source["records"])
        concurrent = spec.search.max_concurrent
    elif spec.trial.kind == "replay_loop":
        src = ReplaySource(store=source["store"], project=source["project"], watermark=source["watermark"],
                           rounds=min(spec.trial.rounds, source["records"]))
        fn = tune.with_parameters(loop_trial, base=base, metric=spec.objective.metric, kl_budget=spec.objective.kl_budget, source=src)
        max_rounds = src.rounds
        concurrent = 1  # each trial's loop places its own actors and Serve applications on the cluster
    else:
        fn = tune.with_parameters(loop_trial, base=base, metric=spec.objective.metric, kl_budget=spec.objective.kl_budget)
        max_rounds = int((base.get("coordinator") or {}).get("rounds", 3))
        concurrent = 1  # each trial's loop places its own actors and Serve applications on the cluster
    return tune.with_resources(fn, {"cpu": spec.trial.cpus}), max_rounds, concurrent


def _search_algorithm(spec, concurrent: int | None):
    algorithm = spec.search.algorithm
    if algorithm == "tpe":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=spec.search.seed))
        if concurrent is None:
            return searcher
        from ray.tune.search import ConcurrencyLimiter

        return ConcurrencyLimiter(searcher, max_concurrent=concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # its own limit: Tune's max_concurrent_trials does not reach a generator passed in
    return BasicVariantGenerator(random_state=spec.search.seed if algorithm == "random" else None, max_concurrent=concurrent or 0)


def _scheduler(spec, max_rounds: int):
    if spec.scheduler.kind == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="round", max_t=max(max_rounds, spec.scheduler.grace_period),
                         grace_period=spec.scheduler.grace_period, reduction_factor=spec.scheduler.reduction_factor)
