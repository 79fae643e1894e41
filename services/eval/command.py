"""`hitl eval`: compare two policies on a prompt set, by the judges chosen, with the
uncertainty stated; writes eval.json, eval.md and eval.png (rlhf/eval/report.py).

    hitl eval --a runs/local/checkpoints/round-0004 --b base --config configs/local.yaml \\
        --judge rule --judge reward-model --out runs/local/eval
    hitl eval --a runs/local --b http://127.0.0.1:8000/v1 --b-model M --prompts prompts.jsonl \\
        --judge llm --llm-url http://judge:8000/v1 --llm-model J --out eval-out
    hitl eval --a RUN --b base --judge human --store sqlite:///hitl-data/feedback.db \\
        --feedback 127.0.0.1:50051 --annotations 3 --timeout 600 --out DIR
    hitl eval --collect EVAL_ID --store sqlite:///hitl-data/feedback.db --out DIR   # later

A side (`--a`, `--b`) is `base` (the config's base model), a run directory (its latest
checkpoint), a checkpoint directory `RUN/checkpoints/round-NNNN`, or the base URL of an
OpenAI-compatible endpoint (`--a-model`/`--b-model` name the model; the key is read from
$OPENAI_API_KEY). Local sides answer greedily in this process, as the loop's evaluation does.
Every problem with the options, the config or the files is reported, naming the option or
field, before any model is loaded.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from pathlib import Path

import click

from services.command_line import fail

STATE = "eval-state.json"
"""Written beside the report: the items and every judge's verdicts, what `--collect` completes."""


@click.command("eval")
@click.option("--a", "a_spec", default=None, help="Policy A: base | RUN_DIR | RUN/checkpoints/round-NNNN | http(s)://…/v1.")
@click.option("--b", "b_spec", default=None, help="Policy B (the baseline), same forms as --a.")
@click.option("--a-model", default=None, help="Model name at --a's endpoint (default: the first it lists).")
@click.option("--b-model", default=None, help="Model name at --b's endpoint.")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Run config (model, lora, data, reward, eval sections); default: a run side's config.json.")
@click.option("--prompts", "prompts_spec", default="held-out", show_default=True,
              help="held-out (the config's evaluation split) or a JSONL/Parquet file with prompt and optional category.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N prompts.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Answer length (default: coordinator.eval_max_new_tokens, else 48).")
@click.option("--judge", "judges", multiple=True, type=click.Choice(["rule", "reward-model", "llm", "human"]),
              help="Repeatable; default: the config's eval.judges, else rule.")
@click.option("--rule", type=click.Choice(["positive", "concise", "format"]), default=None,
              help="The rule judge's rule (default: the config's eval.rule, else its first annotator's, else positive).")
@click.option("--reward-model", "reward_spec", default=None,
              help="Run or checkpoint directory whose reward model judges (default: A's run, else B's).")
@click.option("--llm-url", default=None, help="llm judge: OpenAI-compatible base URL (…/v1).")
@click.option("--llm-model", default=None, help="llm judge: model name (default: the first the endpoint lists).")
@click.option("--llm-api-key-env", default="OPENAI_API_KEY", show_default=True, help="Environment variable with the API keys' value.")
@click.option("--store", default=None, help="human judge: the feedback store URL the service serves (tasks go in, judgements come out).")
@click.option("--feedback", "feedback_address", default=None, help="human judge: the feedback service's gRPC address, checked before publishing.")
@click.option("--token", envvar="HITL_TOKEN", default=None, help="Bearer token for --feedback (or $HITL_TOKEN).")
@click.option("--project", default=None, help="human judge: feedback project (default: eval.human.project, else 'eval').")
@click.option("--annotations", type=click.IntRange(min=1), default=None, help="human judge: annotators per pair (k).")
@click.option("--gold-tasks", type=click.Path(exists=True, dir_okay=False), default=None, help="human judge: gold tasks JSONL.")
@click.option("--gold-rate", type=float, default=None, help="human judge: gold tasks as a share of the pairs.")
@click.option("--min-gold-accuracy", type=float, default=None, help="human judge: leave out annotators below this on gold.")
@click.option("--timeout", "timeout_s", type=float, default=None, help="human judge: seconds to wait for the judgements.")
@click.option("--collect", "collect_id", default=None, help="Complete an earlier evaluation's human judgements (its eval id) in --out.")
@click.option("--eval-id", default=None, help="Id of this evaluation (default: random); names its labeling tasks.")
@click.option("--kl/--no-kl", default=True, show_default=True, help="Measure each local side's KL to its base model.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Directory for eval.json, eval.md, eval.png.")
def eval_command(a_spec, b_spec, a_model, b_model, config_path, prompts_spec, limit, max_new_tokens, judges, rule, reward_spec,
                 llm_url, llm_model, llm_api_key_env, store, feedback_address, token, project, annotations, gold_tasks, gold_rate,
                 min_gold_accuracy, timeout_s, collect_id, eval_id, kl, out_dir) -> None:
    """Compare policy A with policy B on a prompt set; print each judge's win-rate with its 95% interval."""
    human_options = dict(project=project, annotations_per_item=annotations, gold_tasks=gold_tasks, gold_rate=gold_rate,
                         min_gold_accuracy=min_gold_accuracy, timeout_s=timeout_s)
    if collect_id is not None:
        _collect(collect_id, out_dir, store, human_options)
        return
    if a_spec is None or b_spec is None:
        fail("--a and --b are required (or --collect EVAL_ID)")
    from rlhf.config import ConfigError
    from services.eval.answers import SourceError, load_prompts_for, read_config, resolve_source

    try:
        if config_path is not None and not config_path.exists():
            fail(f"--config {config_path}: no such file")
        config = read_config(config_path) if config_path is not None else None
        a = resolve_source(a_spec, "--a", config, a_model)
        b = resolve_source(b_spec, "--b", config or a.config, b_model)
        config = config or a.config or b.config
        if a.kind == "base" and config is not None and a.config is None:
            a = resolve_source(a_spec, "--a", config, a_model)
        prompts = load_prompts_for(prompts_spec, config, limit)
    except (ConfigError, SourceError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    eval_cfg = _eval_config(config, judges, rule, llm_url, llm_model, llm_api_key_env, human_options)
    eval_id = eval_id or uuid.uuid4().hex[:12]
    rule_cfg = _default_rule(config)
    reward_source = None
    if "reward-model" in eval_cfg.judges:
        reward_source = _reward_source(reward_spec, a, b, config)
    db = gold_pool = None
    if "human" in eval_cfg.judges:
        db, gold_pool = _human_setup(eval_cfg, store, feedback_address, token)
    max_new = max_new_tokens or (config.eval_max_new_tokens if config is not None else 48)
    texts = [p for p, _ in prompts]

    # -- answers ------------------------------------------------------------------------
    engines, kl_of = {}, {}
    answers = {}
    for side, source in (("a", a), ("b", b)):
        click.echo(f"answering {len(texts)} prompts with {side.upper()} ({source.label})", err=True)
        answers[side] = _answers(source, texts, max_new, engines, side)
    if kl:
        kl_of = _kl(a, b, engines, texts, answers)

    from rlhf.eval.judges import reward_model_scorer
    from rlhf.eval.report import build_report, judge_all, judge_lines, write_report
    from services.eval.answers import items_of
    from services.eval.judges import build_judges

    items = items_of(prompts, answers["a"], answers["b"])
    scorer = label = None
    if reward_source is not None:
        model, label = _load_reward_model(*reward_source)
        scorer = reward_model_scorer(model)
    try:
        built = build_judges(eval_cfg, eval_id=eval_id, rule=rule_cfg, reward_scorer=scorer, reward_label=label, store=db,
                             gold_pool=gold_pool or ())
        order = [j for j in built if j.name != "human"] + [j for j in built if j.name == "human"]  # people last: they take longest
        results = judge_all(items, order)
    finally:
        if db is not None:
            db.close()
    results.sort(key=lambda r: eval_cfg.judges.index(r.judge))
    sides = {"a": {**a.describe(), **kl_of.get("a", {})}, "b": {**b.describe(), **kl_of.get("b", {})}}
    extra = {"prompts": prompts_spec, "max_new_tokens": max_new}
    if "human" in eval_cfg.judges:
        extra["human"] = {"store": store, **eval_cfg.human.model_dump(mode="json")}  # type: ignore[union-attr]
    report = build_report(items, results, a=sides["a"], b=sides["b"], eval_id=eval_id, extra=extra)
    paths = write_report(report, out_dir)
    _save_state(out_dir, report, items, results)
    for line in judge_lines(report):
        click.echo(line)
    missing = report["judges"].get("human", {}).get("missing", 0)
    if missing:
        click.echo(f"human: {missing} pair(s) not judged yet; later: hitl eval --collect {eval_id} --store {store} --out {out_dir}",
                   err=True)
    for side in ("a", "b"):
        if "kl" in sides[side]:
            click.echo(f"KL of {side.upper()} to its base: {sides[side]['kl']:.3f} nats per answer")
    click.echo(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")


def _eval_config(config, judges, rule, llm_url, llm_model, llm_api_key_env, human_options):
    """The EvalConfig from the options over the config's `eval` section; errors name the option."""
    from pydantic import ValidationError

    from rlhf.eval.config import EvalConfig

    base = config.sections.eval if config is not None and config.sections.eval is not None else EvalConfig()
    data = base.model_dump(mode="json")
    if judges:
        data["judges"] = list(judges)
    if rule:
        data["rule"] = {**(data.get("rule") or {}), "rule": rule}
    if llm_url or llm_model:
        data["llm"] = {**(data.get("llm") or {}), **({"base_url": llm_url} if llm_url else {}),
                       **({"model": llm_model} if llm_model else {}), "api_key_env": llm_api_key_env}
    given = {k: v for k, v in human_options.items() if v is not None}
    if "human" in data["judges"] and (given or data.get("human") is None):
        data["human"] = {**(data.get("human") or {}), **given}
    try:
        return EvalConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        where = ".".join(str(x) for x in first["loc"])
        option = {"llm": "--llm-url", "human.gold_rate": "--gold-rate", "human.gold_tasks": "--gold-tasks",
                  "human.min_gold_accuracy": "--min-gold-accuracy", "human.timeout_s": "--timeout",
                  "human.annotations_per_item": "--annotations", "judges": "--judge"}.get(where, f"eval.{where}" if where else "--judge")
        message = first["msg"].removeprefix("Value error, ")
        if not where and message.startswith("llm: required"):
            option = "--llm-url"
        elif where == "human" and message.startswith("gold_rate"):
            option = "--gold-rate/--gold-tasks"
        fail(f"{option}: {message}")


def _default_rule(config):
    from rlhf.quality.judges import JudgeConfig

    if config is not None and config.first_rule:
        return JudgeConfig.model_validate(config.first_rule)
    return None


def _reward_source(spec, a, b, config):
    """(storage, rel, reward config, policy model config) of the reward model that judges."""
    from services.eval.answers import SourceError, resolve_source

    if spec is not None:
        try:
            source = resolve_source(spec, "--reward-model", config)
        except SourceError as err:
            fail(str(err))
        if source.kind != "checkpoint":
            fail(f"--reward-model {spec}: a run or checkpoint directory is needed")
    else:
        source = next((s for s in (a, b) if s.kind == "checkpoint"), None)
        if source is None:
            fail("--judge reward-model: neither side is a run checkpoint; give --reward-model RUN_DIR")
    rel = f"{source.checkpoint}/reward_model"
    if source.storage.read_text(f"{rel}/rounds.txt") is None:  # written by every reward-model checkpoint
        fail(f"--judge reward-model: {source.storage.location(rel)}: no reward-model checkpoint")
    sections = source.config.sections
    return source.storage, rel, sections.reward, sections.model, source.label, sections.template


def _load_reward_model(storage, rel, reward_cfg, model_cfg, label, template):
    from rlhf.eval.checkpoints import load_checkpointed_reward_model

    return load_checkpointed_reward_model(storage, rel, reward_cfg, model_cfg, template), f"{label}/reward_model"


def _human_setup(eval_cfg, store_url, feedback_address, token):
    if store_url is None:
        fail("--judge human: needs --store URL (the store the feedback service serves)")
    from services.eval.human import load_gold_pool
    from services.feedback.store import open_store

    gold_pool = []
    if eval_cfg.human.gold_tasks is not None:
        try:
            gold_pool = load_gold_pool(eval_cfg.human.gold_tasks)
        except ValueError as err:
            fail(f"--gold-tasks: {err}")
    if feedback_address is not None:
        from services.feedback.client import FeedbackClient

        client = FeedbackClient(feedback_address, token)
        try:
            client.wait_ready(10.0)
            client.stats(eval_cfg.human.project)
        except Exception as err:  # noqa: BLE001 - any failure to reach it is the same advice
            fail(f"--feedback {feedback_address}: the feedback service does not answer ({err})")
        finally:
            client.close()
    try:
        return open_store(store_url), gold_pool
    except Exception as err:  # noqa: BLE001
        fail(f"--store {store_url}: {err}")


def _answers(source, prompts, max_new, engines, side):
    from services.eval.answers import endpoint_answers, load_local, local_answers

    if source.kind == "endpoint":
        return endpoint_answers(source, prompts, max_new)
    engines[side] = load_local(source)
    return local_answers(engines[side], prompts, max_new)


def _kl(a, b, engines, prompts, answers) -> dict:
    """Each local side's KL to the base model of its config (B when B is that base)."""
    from services.eval.answers import kl_to_base, load_local

    out = {}
    for side, source in (("a", a), ("b", b)):
        if source.kind == "endpoint":
            continue
        if source.kind == "base":
            out[side] = {"kl": 0.0, "kl_reference": "the base model itself"}
            continue
        other = b if side == "a" else a
        other_side = "b" if side == "a" else "a"
        same_base = other.kind == "base" and other.config.sections.model == source.config.sections.model
        base = engines[other_side] if same_base else load_local(type(source)(label="base", kind="base", config=source.config))
        out[side] = {"kl": kl_to_base(engines[side], base, prompts, answers[side]),
                     "kl_reference": f"base model {source.config.sections.model.path or source.config.sections.model.source}"}
    return out


def _save_state(out_dir: Path, report: dict, items, results) -> None:
    state = {"eval_id": report["eval_id"], "report": {k: v for k, v in report.items() if k not in ("items", "judges", "agreement")},
             "items": [asdict(i) for i in items], "results": [asdict(r) for r in results]}
    (out_dir / STATE).write_text(json.dumps(state, indent=2) + "\n")


def _collect(eval_id: str, out_dir: Path, store_url: str | None, human_options: dict) -> None:
    """Complete an earlier evaluation: the human judgements received since, the report rewritten."""
    from rlhf.eval.config import HumanJudgeConfig
    from rlhf.eval.records import EvalItem, JudgeVerdicts
    from rlhf.eval.report import build_report, judge_lines, write_report
    from services.eval.human import HumanJudge
    from services.feedback.store import open_store

    path = out_dir / STATE
    if not path.exists():
        fail(f"--collect {eval_id}: {path}: no evaluation state here (--out is the directory of the earlier run)")
    state = json.loads(path.read_text())
    if state["eval_id"] != eval_id:
        fail(f"--collect {eval_id}: {path} holds evaluation {state['eval_id']}")
    saved = state["report"].get("human")
    if saved is None:
        fail(f"--collect {eval_id}: that evaluation had no human judge")
    store_url = store_url or saved.get("store")
    settings = {k: v for k, v in saved.items() if k != "store"}
    settings.update({k: v for k, v in human_options.items() if v is not None})
    items = [EvalItem(**i) for i in state["items"]]
    results = []
    for r in state["results"]:
        for key in ("verdicts", "scores_a", "scores_b", "item_details"):
            if r.get(key) is not None:
                r[key] = tuple(r[key])
        results.append(JudgeVerdicts(**r))
    db = open_store(store_url)
    try:
        human = HumanJudge(HumanJudgeConfig.model_validate(settings), db, eval_id).collect(items)
    finally:
        db.close()
    results = [human if r.judge == "human" else r for r in results]
    meta = state["report"]
    extra = {k: v for k, v in meta.items() if k not in ("eval_id", "a", "b", "n_items", "interval", "win_rate_of", "slices")}
    report = build_report(items, results, a=meta["a"], b=meta["b"], eval_id=eval_id, extra=extra)
    paths = write_report(report, out_dir)
    _save_state(out_dir, report, items, results)
    for line in judge_lines(report):
        click.echo(line)
    click.echo(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
