"""Where the two sides' answers come from: a local policy (the base model of a config, a run's
checkpoint, a run's latest) generated in this process, or an OpenAI-compatible endpoint.

A local policy is loaded as the loop's generation engines load it (`PolicyEngine`, with the
checkpoint's `policy/` tensors applied as a weight update, as `hitl generation serve` does)
and answers each prompt greedily in the chat template, as the loop's evaluation does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from rlhf.config import DataConfig, parse_config
from rlhf.eval.config import EvalConfig
from rlhf.eval.records import EvalItem
from rlhf.models import LoraConfig, ModelConfig
from rlhf.reward.config import RewardConfig
from rlhf.storage import CheckpointStorage
from rlhf.templates import PromptTemplate
from services.generation.config import GenerationConfig


class Sections(BaseModel):
    """The sections of a run config (YAML profile or a run's config.json) that an evaluation reads."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    template: PromptTemplate = Field(default_factory=PromptTemplate)
    eval: EvalConfig | None = None


@dataclass(frozen=True)
class RunConfigFile:
    path: Path
    sections: Sections
    raw: dict[str, Any]

    @property
    def eval_max_new_tokens(self) -> int:
        return int((self.raw.get("coordinator") or {}).get("eval_max_new_tokens") or 48)

    @property
    def first_rule(self) -> dict | None:
        """The first simulated annotator's judge (the loop's evaluation rule), if any."""
        annotators = (self.raw.get("annotators") or {}).get("annotators") or []
        return annotators[0].get("judge") if annotators else None


def read_config(path: Path) -> RunConfigFile:
    """A run profile or a run's config.json; a bad section raises `rlhf.config.ConfigError` naming the dotted field."""
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    data = data or {}
    return RunConfigFile(path, parse_config(data, Sections, source=str(path)), data)


@dataclass(frozen=True)
class PolicySource:
    """One side of an evaluation."""

    label: str
    kind: str  # "base", "checkpoint" or "endpoint"
    config: RunConfigFile | None = None  # local sides
    storage: CheckpointStorage | None = None  # checkpoint: the run's checkpoint storage ...
    checkpoint: str | None = None  # ... and the round in it (round-NNNN)
    url: str | None = None  # endpoint
    model_name: str | None = None

    def describe(self) -> dict:
        out: dict[str, Any] = {"label": self.label, "kind": self.kind}
        if self.storage is not None:
            out["checkpoint"] = self.storage.location(self.checkpoint or "")
        if self.url:
            out.update(url=self.url, model=self.model_name)
        if self.config is not None:
            out["config"] = str(self.config.path)
        return out


class SourceError(ValueError):
    """A side that cannot be used; the message names the option."""


def run_checkpoints(run_dir: Path, config: RunConfigFile) -> CheckpointStorage:
    storage = (config.raw.get("coordinator") or {}).get("storage")
    return CheckpointStorage(storage or str(run_dir / "checkpoints"))


def resolve_source(spec: str, option: str, config: RunConfigFile | None, model_name: str | None = None) -> PolicySource:
    """`base` (the config's base model), a run directory (its LATEST checkpoint), a checkpoint
    directory `RUN/checkpoints/round-NNNN`, or an http(s) URL of an OpenAI-compatible endpoint."""
    if spec.startswith(("http://", "https://")):
        return PolicySource(label=model_name or spec, kind="endpoint", url=spec, model_name=model_name)
    if spec == "base":
        if config is None:
            raise SourceError(f"{option} base: needs --config (or a run on the other side) for the base model")
        return PolicySource(label=f"base ({config.sections.model.path or config.sections.model.source})", kind="base", config=config)
    path = Path(spec)
    if not path.is_dir():
        raise SourceError(f"{option} {spec}: not 'base', an http(s) URL, a run directory or a checkpoint directory")
    if (path / "config.json").exists():
        run_config = read_config(path / "config.json")
        storage = run_checkpoints(path, run_config)
        latest = (storage.read_text("LATEST") or "").strip()
        if not latest:
            raise SourceError(f"{option} {spec}: {storage.location('LATEST')}: no checkpoint")
        return PolicySource(label=f"{path.name}/{latest}", kind="checkpoint", config=run_config, storage=storage, checkpoint=latest)
    if (path / "policy").is_dir():
        run_dir = path.parent.parent
        run_config = read_config(run_dir / "config.json") if (run_dir / "config.json").exists() else config
        if run_config is None:
            raise SourceError(f"{option} {spec}: no config.json in {run_dir}; give --config")
        return PolicySource(label=f"{run_dir.name}/{path.name}", kind="checkpoint", config=run_config,
                            storage=CheckpointStorage(str(path.parent)), checkpoint=path.name)
    raise SourceError(f"{option} {spec}: a directory without config.json (a run) or policy/ (a checkpoint)")


def load_prompts_for(spec: str, config: RunConfigFile | None, limit: int | None) -> list[tuple[str, str | None]]:
    """(prompt, category) pairs: `held-out` (the config's evaluation split, as the loop splits
    it, with the categories of the config's prompt sources) or a JSONL / Parquet file with
    `prompt` and optional `category` (read by `rlhf.prompts`, as the loop reads prompt sources)."""
    from rlhf.config import PromptSource
    from rlhf.prompts import PromptSourceError, load_prompt_set, read_prompts, split_prompts

    if spec == "held-out":
        if config is None:
            raise SourceError("--prompts held-out: needs --config or a run on either side")
        d = config.sections.data
        found = [(p.text, p.category) for p in split_prompts(load_prompt_set(d), d.validation_fraction, d.split_seed).evaluation]
        if not found:
            raise SourceError(f"--prompts held-out: {config.path}: the evaluation split is empty (data.validation_fraction)")
    else:
        path = Path(spec)
        if not path.is_file():
            raise SourceError(f"--prompts {spec}: not 'held-out' nor a file")
        kind = "parquet" if path.suffix == ".parquet" else "jsonl"
        try:
            source = PromptSource(kind=kind, path=path, field="prompt", category_field=_category_field(path, kind))
            found = [(p.text, p.category) for p in read_prompts(source, "--prompts")]
        except PromptSourceError as err:
            raise SourceError(f"--prompts {err.detail}") from None
        if not found:
            raise SourceError(f"--prompts {spec}: no prompts")
    return found[:limit] if limit else found


def _category_field(path: Path, kind: str) -> str | None:
    """`category` when the file can have it: every JSONL file (a line may leave it out), a
    Parquet file with that column."""
    if kind == "jsonl":
        return "category"
    import pyarrow.parquet as pq

    try:
        return "category" if "category" in pq.read_schema(path).names else None
    except (OSError, ValueError):
        return None  # not Parquet: the reader says so


# -- answering ---------------------------------------------------------------------------


@dataclass
class LocalPolicy:
    """A local side loaded into a `PolicyEngine`."""

    engine: Any
    source: PolicySource


def load_local(source: PolicySource):
    """The side's engine: the base model (LoRA off), or the checkpoint's served tensors applied."""
    from rlhf.storage import read_policy
    from services.generation.engine import PolicyEngine, WeightUpdate

    cfg = source.config.sections  # type: ignore[union-attr]
    if source.kind == "base":
        return PolicyEngine(cfg.model, None, cfg.generation.max_prompt_tokens, template=cfg.template)
    version, tensors, adapters_only = read_policy(source.storage, f"{source.checkpoint}/policy")  # type: ignore[arg-type]
    if adapters_only and not cfg.lora.enabled:
        raise SourceError(f"{source.label}: the checkpoint holds adapters but the run's lora section is off")
    engine = PolicyEngine(cfg.model, cfg.lora if adapters_only else None, cfg.generation.max_prompt_tokens, template=cfg.template)
    engine.load_weights(WeightUpdate(max(1, version), tensors, adapters_only))
    return engine


def local_answers(engine, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers in the run's template (the loop's evaluation requests)."""
    from services.generation.config import SamplingDefaults
    from services.generation.engine import GenerateRequest

    defaults = SamplingDefaults(max_new_tokens=max_new_tokens, temperature=0.0)
    out: list[str] = []
    for k in range(0, len(prompts), batch_size):
        requests = [GenerateRequest(messages=(("user", p),), temperature=0.0, max_new_tokens=max_new_tokens)
                    for p in prompts[k:k + batch_size]]
        out.extend(r.texts[0] for r in engine.generate(requests, defaults))
    return out


def endpoint_answers(source: PolicySource, prompts: Sequence[str], max_new_tokens: int, api_key_env: str | None = "OPENAI_API_KEY",
                     concurrency: int = 4, client=None) -> list[str]:
    """Greedy (temperature 0) chat answers of an OpenAI-compatible endpoint."""
    if client is None:
        from openai import OpenAI

        key = os.environ.get(api_key_env, "") if api_key_env else ""
        client = OpenAI(base_url=source.url, api_key=key or "none", max_retries=2)
    model = source.model_name or next(iter(client.models.list())).id

    def ask(prompt: str) -> str:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], temperature=0.0,
                                           max_tokens=max_new_tokens)
        return r.choices[0].message.content or ""

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(ask, prompts))


def kl_to_base(engine, base_engine, prompts: Sequence[str], answers: Sequence[str]) -> float:
    """Mean summed token log-ratio of the side's answers, its policy over the base (rlhf/eval/kl.py)."""
    from rlhf.eval.kl import mean_log_ratio
    from services.generation.engine import GenerateRequest

    texts = [engine.prompt_text(GenerateRequest(messages=(("user", p),))) for p in prompts]
    return mean_log_ratio(engine.model, base_engine.model, engine.tokenizer, texts, answers)


def items_of(prompts: Sequence[tuple[str, str | None]], answers_a: Sequence[str], answers_b: Sequence[str]) -> list[EvalItem]:
    return [EvalItem(prompt=p, category=c, answer_a=a, answer_b=b) for (p, c), a, b in zip(prompts, answers_a, answers_b, strict=True)]
