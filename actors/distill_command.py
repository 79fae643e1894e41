"""`hitl distill`: train a student model to imitate a teacher over a run's prompt set, then
compare the two with `hitl eval`.

    hitl distill --teacher runs/big --student base --config configs/local.yaml --out runs/distilled
    hitl distill --teacher /models/teacher-hf --student base --config C --mode sequence --out OUT
    hitl distill --teacher base --student /models/small-hf --config C --divergence jsd --beta 0.5 --no-eval --out OUT

A model (`--teacher`, `--student`) is `base` (the config's model), a run directory (its latest
checkpoint), a checkpoint directory `RUN/checkpoints/round-NNNN`, or a Hugging Face model
directory. Both must share the tokenizer; their sizes may differ. A student from a checkpoint
trains what its run trained (its adapters, or every weight); otherwise the config's `lora`
section decides. The config is a run config (`--config`; default: the student's run, else the
teacher's); its optional `distill` section (rlhf/distill/config.py) is overridden by the
options. Prompts: the config's training split; the held-out split measures the student.

The result is a run-shaped directory: `config.json`, `report.json` (the distillation's figures
before and after, both models' sizes), the student as a checkpoint (`checkpoints/LATEST`), so
`hitl generation serve OUT` serves it; and, with `--eval`, `eval/eval.{json,md,png}`: the student
(A) against the teacher (B) on the held-out prompts, by the config's `eval` judges (or
`--judge`), with `hitl eval`'s code.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from services.command_line import fail

MODES = ("token", "sequence")
DIVERGENCES = ("forward", "reverse", "jsd")


@click.command("distill")
@click.option("--teacher", "teacher_spec", required=True,
              help="The teacher: base | RUN_DIR | RUN/checkpoints/round-NNNN | a Hugging Face model directory.")
@click.option("--student", "student_spec", required=True, help="The student, same forms as --teacher.")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Run config (model, lora, deepspeed, data, eval and an optional distill section); "
                   "default: the student's run config, else the teacher's.")
@click.option("--mode", type=click.Choice(MODES), default=None, help="token (teacher logits) or sequence (SFT on its answers).")
@click.option("--divergence", type=click.Choice(DIVERGENCES), default=None, help="Token-level loss: forward KL, reverse KL or generalised JSD.")
@click.option("--beta", type=float, default=None, help="--divergence jsd: the interpolation (0 forward KL, 1 reverse KL).")
@click.option("--temperature", type=float, default=None, help="Token-level: softmax temperature of both models' logits.")
@click.option("--lmbda", type=float, default=None, help="Token-level: share of minibatches on the student's own answers.")
@click.option("--epochs", type=int, default=None, help="Passes over the teacher's answers.")
@click.option("--lr", type=float, default=None, help="The student's learning rate.")
@click.option("--prompts", "prompt_limit", type=int, default=None, help="Train on the first N prompts of the training split.")
@click.option("--judge", "judges", multiple=True, type=click.Choice(["rule", "reward-model", "llm"]),
              help="Repeatable; the evaluation's judges (default: the config's eval.judges, else rule).")
@click.option("--eval/--no-eval", "run_eval", default=True, show_default=True,
              help="Compare the student with the teacher afterwards (hitl eval, into OUT/eval).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Directory for the student.")
@click.pass_context
def distill_command(ctx: click.Context, teacher_spec: str, student_spec: str, config_path: Path | None, mode, divergence, beta,
                    temperature, lmbda, epochs, lr, prompt_limit, judges, run_eval: bool, out_dir: Path) -> None:
    """Distil TEACHER into STUDENT (token-level or sequence-level) and compare them."""
    if out_dir.exists() and any(out_dir.iterdir()):
        fail(f"--out {out_dir}: exists and is not empty")
    overrides = {k: v for k, v in dict(mode=mode, divergence=divergence, beta=beta, temperature=temperature, lmbda=lmbda,
                                       epochs=epochs, lr=lr, prompts=prompt_limit).items() if v is not None}
    teacher, student, config_file = _sources(teacher_spec, student_spec, config_path)
    run_cfg, cfg = _configs(config_file.path, overrides)
    _check_batches(cfg, run_cfg)
    tokenizer = _shared_tokenizer(teacher, student)
    train_prompts, held_out_prompts = _prompts(run_cfg, cfg)

    summary = distill_models(teacher, student, run_cfg, cfg, tokenizer, train_prompts, held_out_prompts, out_dir)
    if run_eval:
        summary["evaluation"] = _evaluate(ctx, out_dir, teacher_spec, teacher, run_cfg, cfg, judges)
        report_path = out_dir / "report.json"
        report_path.write_text(json.dumps({**json.loads(report_path.read_text()), "evaluation": summary["evaluation"]}, indent=2))
    click.echo(json.dumps(summary))


# -- the inputs, checked before any model loads -------------------------------------------


def _sources(teacher_spec: str, student_spec: str, config_path: Path | None):
    """(teacher, student, run config file) as `services.eval.answers.PolicySource`s."""
    from rlhf.config import ConfigError
    from services.eval.answers import SourceError, read_config

    try:
        if config_path is not None and not config_path.exists():
            fail(f"--config {config_path}: no such file")
        config_file = read_config(config_path) if config_path is not None else None
        # run and checkpoint directories carry their own config: resolve them first
        given = {option: _source(spec, option, config_file) if spec != "base" else None
                 for option, spec in (("--student", student_spec), ("--teacher", teacher_spec))}
        if config_file is None:
            config_file = next((s.config for s in given.values() if s is not None and s.kind == "checkpoint"), None)
        if config_file is None:
            fail("--config is required (neither --teacher nor --student is a run or checkpoint directory)")
        teacher = given["--teacher"] or _source(teacher_spec, "--teacher", config_file)
        student = given["--student"] or _source(student_spec, "--student", config_file)
    except (ConfigError, SourceError, FileNotFoundError) as err:
        fail(str(err))
    return teacher, student, config_file


def _source(spec: str, option: str, config_file):
    """A local model: `hitl eval`'s forms (`services.eval.answers.resolve_source`) or a Hugging
    Face model directory (as a `base` side whose model is that directory)."""
    from rlhf.models import ModelConfig
    from services.eval.answers import PolicySource, RunConfigFile, Sections, SourceError, resolve_source

    path = Path(spec)
    if spec.startswith(("http://", "https://")):
        raise SourceError(f"{option} {spec}: an endpoint gives no logits nor weights; a local model is needed")
    if path.is_dir() and _is_hf_model_dir(path):
        model = ModelConfig(source="hf", path=str(path.resolve()))
        sections = (config_file.sections if config_file is not None else Sections()).model_copy(update={"model": model})
        raw = config_file.raw if config_file is not None else {}
        return PolicySource(label=path.name, kind="base", config=RunConfigFile(path / "config.json", sections, raw))
    return resolve_source(spec, option, config_file)


def _is_hf_model_dir(path: Path) -> bool:
    """A transformers model directory: its config.json names a `model_type` (a run's does not)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def _configs(path: Path, overrides: dict):
    """(RunConfig, DistillConfig) of the config file; the `distill` section is read apart, with
    the options over it. Errors name the dotted field."""
    import yaml

    from actors.config import RunConfig
    from rlhf.config import ConfigError, ConfigIssue, parse_config
    from rlhf.distill import DistillConfig

    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        raw = dict(raw or {})
        section = raw.pop("distill", None) or {}
        if not isinstance(section, dict):
            raise ConfigError(str(path), (ConfigIssue("distill", "expected a mapping"),))
        run_cfg = parse_config(raw, RunConfig, source=str(path))
        try:
            cfg = parse_config({**section, **overrides}, DistillConfig, source=str(path))
        except ConfigError as err:
            issues = tuple(ConfigIssue("distill" if i.field == "<root>" else f"distill.{i.field}", i.message) for i in err.issues)
            raise ConfigError(f"{path} (with the options)", issues) from None
    except (ConfigError, OSError, ValueError) as err:
        fail(str(err))
    return run_cfg, cfg


def _check_batches(cfg, run_cfg) -> None:
    gas = run_cfg.deepspeed.gradient_accumulation_steps
    if cfg.batch_size % gas:
        fail(f"distill.batch_size ({cfg.batch_size}) must divide by deepspeed.gradient_accumulation_steps ({gas})")


def _shared_tokenizer(teacher, student):
    """The student's tokenizer, once it is known to be the teacher's too."""
    from rlhf.distill import TokenizerMismatch, check_same_tokenizer
    from rlhf.models import load_tokenizer

    teacher_tokenizer = load_tokenizer(teacher.config.sections.model)
    tokenizer = load_tokenizer(student.config.sections.model)
    try:
        check_same_tokenizer(teacher_tokenizer, tokenizer, teacher.label, student.label)
    except TokenizerMismatch as err:
        fail(str(err))
    if getattr(teacher_tokenizer, "chat_template", None) != getattr(tokenizer, "chat_template", None):
        click.echo(f"note: the chat templates of {teacher.label} and {student.label} differ; prompts use the student's", err=True)
    return tokenizer


def _prompts(run_cfg, cfg) -> tuple[list[str], list[str]]:
    from rlhf.prompts import load_prompts, split_prompts

    d = run_cfg.data
    try:
        split = split_prompts(load_prompts(d), d.validation_fraction, d.split_seed)
    except (OSError, ValueError) as err:
        fail(f"data.prompt_sources: {err}")
    train = list(split.train[: cfg.prompts] if cfg.prompts else split.train)
    return train, list(split.evaluation[: cfg.held_out_prompts])


# -- training -------------------------------------------------------------------------------


def distill_models(teacher, student, run_cfg, cfg, tokenizer, train_prompts: list[str], held_out_prompts: list[str],
                   out: Path) -> dict:
    """Load both models, write the teacher's answers, train the student, write the run-shaped
    output; returns a summary."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from actors.config import run_config_json
    from actors.trained_run import write_trained_run
    from rlhf.distill import distill, student_trainer, write_answers
    from rlhf.lineage import digest
    from services.eval.answers import load_local

    teacher_model = load_local(teacher).model.eval()
    student_model, student_lora = _load_student(student, run_cfg)
    sizes = {"teacher": _size(teacher_model, teacher.label), "student": _size(student_model, student.label)}
    if (sizes["teacher"]["hidden_size"], sizes["teacher"]["layers"]) != (sizes["student"]["hidden_size"], sizes["student"]["layers"]):
        click.echo(f"teacher {teacher.label}: {_describe(sizes['teacher'])}; student {student.label}: {_describe(sizes['student'])}",
                   err=True)
    trainer = student_trainer(student_model, tokenizer, cfg, run_cfg.deepspeed, run_cfg.template)
    teacher_model.to(trainer.dist.device)
    click.echo(f"the teacher answers {len(train_prompts)} training and {len(held_out_prompts)} held-out prompts", err=True)
    answers = write_answers(teacher_model, tokenizer, train_prompts, cfg, device=trainer.dist.device, template=run_cfg.template)
    held_out = write_answers(teacher_model, tokenizer, held_out_prompts, cfg, first_index=len(train_prompts),
                             device=trainer.dist.device, template=run_cfg.template)
    click.echo(f"{cfg.mode}-level distillation: {cfg.epochs} epoch(s) over {len(answers)} answers", err=True)
    report = distill(trainer, teacher_model, answers, held_out, cfg)

    out_cfg = type(run_cfg).model_validate({**run_cfg.model_dump(), "model": student.config.sections.model.model_dump(),
                                            "lora": student_lora.model_dump(), "distill": cfg.model_dump()})
    summary = {"mode": cfg.mode, "divergence": cfg.divergence if cfg.mode == "token" else None, "out": str(out),
               "answers": report.answers, "loss_before": report.loss_before, "loss_after": report.loss_after,
               "held_out_before": _plain(report.held_out_before), "held_out_after": _plain(report.held_out_after)}
    full = {**summary, "teacher": {**teacher.describe(), **sizes["teacher"]}, "student": {**student.describe(), **sizes["student"]},
            "distill": cfg.model_dump(mode="json"), "report": _plain(report), "prompts": len(train_prompts),
            "held_out_prompts": len(held_out_prompts), "answers_sha256": digest([list(a.answer_ids) for a in answers]),
            "device": str(trainer.dist.device), "torch": torch.__version__}
    write_trained_run(out, run_config_json(out_cfg), trainer, full)
    return summary


def _load_student(source, run_cfg):
    """(model, its PEFT config): from a checkpoint, what its run trained with the tensors
    applied; else the source's model with the config's `lora` section."""
    import torch

    from rlhf.models import LoraConfig, load_policy
    from rlhf.models.peft_kinds import adapter_parameters
    from rlhf.storage import read_policy
    from services.generation.engine import WeightUpdate, check_update

    model_cfg = source.config.sections.model
    if source.kind != "checkpoint":
        return load_policy(model_cfg, run_cfg.lora).model, run_cfg.lora
    version, tensors, adapters_only = read_policy(source.storage, f"{source.checkpoint}/policy")
    lora = source.config.sections.lora if adapters_only else LoraConfig(enabled=False)
    if adapters_only and not lora.enabled:
        fail(f"--student {source.label}: the checkpoint holds adapters but its run's lora section is off")
    model = load_policy(model_cfg, lora).model
    targets = dict(adapter_parameters(model)) if adapters_only else dict(model.state_dict())
    try:
        check_update(WeightUpdate(max(1, version), tensors, adapters_only), targets, adapters_only)
    except ValueError as err:
        fail(f"--student {source.label}: {err}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)
    return model, lora


def _size(model, label: str) -> dict:
    config = getattr(model, "config", None)
    return {"parameters": sum(p.numel() for p in model.parameters()), "hidden_size": getattr(config, "hidden_size", None),
            "layers": getattr(config, "num_hidden_layers", None)}


def _describe(size: dict) -> str:
    return f"{size['parameters'] / 1e6:.2f}M parameters, hidden size {size['hidden_size']}, {size['layers']} layers"


def _plain(obj):
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else obj


# -- the comparison -------------------------------------------------------------------------


def _evaluate(ctx: click.Context, out: Path, teacher_spec: str, teacher, run_cfg, cfg, judges: tuple[str, ...]) -> dict:
    """`hitl eval --a OUT --b TEACHER` on the held-out prompts, into OUT/eval; A's win-rates."""
    from actors.config import run_config_json
    from services.eval.command import eval_command

    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    b_spec = teacher_spec
    if teacher.kind == "base":  # the config's model or a model directory: a config whose base model is the teacher
        config_path = eval_dir / "teacher-config.json"
        teacher_cfg = type(run_cfg).model_validate({**run_cfg.model_dump(), "model": teacher.config.sections.model.model_dump()})
        config_path.write_text(run_config_json(teacher_cfg))
        b_spec = "base"
    click.echo(f"comparing the student (A) with the teacher (B) on held-out prompts: hitl eval --a {out} --b {b_spec} "
               f"--config {config_path} --out {eval_dir}", err=True)
    ctx.invoke(eval_command, a_spec=str(out), b_spec=b_spec, config_path=config_path, prompts_spec="held-out",
               limit=cfg.held_out_prompts or None, judges=tuple(judges), kl=False, out_dir=eval_dir)
    report = json.loads((eval_dir / "eval.json").read_text())
    return {name: {"win_rate": j.get("win_rate"), "interval": j.get("interval"), "n": j.get("n")}
            for name, j in report["judges"].items()}
