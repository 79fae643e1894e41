"""The RLHF config: one typed model per component, loaded from YAML and validated on load.

    from rlhf.config import load_config
    cfg = load_config("configs/tiny.yaml")        # -> RLHFConfig
    cfg.ppo.clip_range, cfg.model.source, cfg.reward.max_epochs

A wrong key, type or range fails at load with :class:`ConfigError`, one line per problem,
each naming the dotted field path and what was expected, e.g.::

    configs/bad.yaml: invalid config
      ppo.clip_range: must be > 0.0, got -1
      model.layers: unknown key; expected one of: source, path, hidden_size, ...

:func:`load_config` is generic: a later run config that adds sections (``feedback``,
``cluster``) subclasses :class:`RLHFConfig` and passes itself as ``cls``.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf.models.config import CriticConfig, LoraConfig, ModelConfig
from rlhf.po.config import POConfig
from rlhf.ppo.config import PO_ALGORITHMS, DeepSpeedConfig, PPOConfig
from rlhf.reward.config import RewardConfig
from rlhf.sft.config import BestOfNConfig, SFTConfig
from rlhf.templates import PromptTemplate

ConfigT = TypeVar("ConfigT", bound=BaseModel)
_UNION_TYPE = type(int | None)


class PromptSource(BaseModel):
    """One source of prompts for rollouts and labeling tasks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["builtin", "text", "jsonl", "parquet", "datasets"] = "builtin"
    """``builtin``: a prompt set shipped with hitl (no download); ``text``: one prompt per
    line of ``path``; ``jsonl``: one JSON object per line of ``path``, prompt under ``field``;
    ``parquet``: a Parquet file, prompt in column ``field``; ``datasets``: a directory written by
    Hugging Face ``datasets`` (``save_to_disk``), prompt in column ``field`` (needs the
    ``datasets`` package: ``pip install 'hitl[prompts]'``)."""

    name: str = "default"
    """``builtin`` only: which shipped prompt set."""

    path: Path | None = None
    """``text``, ``jsonl``, ``parquet``: the file to read; ``datasets``: the directory."""

    field: str = "prompt"
    """``jsonl``, ``parquet``, ``datasets``: the key (column) holding the prompt text."""

    category_field: str | None = None
    """``jsonl``, ``parquet``, ``datasets``: the key (column) holding each prompt's category (a
    string; a missing or null value: no category), for per-category counts and evaluation
    slices; None: the prompts have no category."""

    split: str | None = None
    """``datasets`` only: the split to read when the directory holds several (a ``DatasetDict``);
    None: the only one."""

    @model_validator(mode="after")
    def _check_path(self) -> PromptSource:
        if self.kind == "builtin" and self.path is not None:
            raise ValueError("path must be unset for kind='builtin'")
        if self.kind != "builtin" and self.path is None:
            raise ValueError(f"path is required for kind={self.kind!r}")
        if self.category_field is not None and self.kind in ("builtin", "text"):
            raise ValueError(f"category_field: kind {self.kind!r} has no fields (use jsonl, parquet or datasets)")
        if self.split is not None and self.kind != "datasets":
            raise ValueError(f"split: only for kind 'datasets', not {self.kind!r}")
        return self


class DataConfig(BaseModel):
    """Where prompts come from and how they are split and bounded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_sources: tuple[PromptSource, ...] = (PromptSource(),)
    """Prompt sources, read in order and concatenated (duplicates removed)."""

    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of prompts held out to evaluate the policy (win rate), never trained on."""

    split_seed: int = Field(0, ge=0)
    """Seed of the train/validation split of the prompts."""

    max_prompt_tokens: int = Field(256, ge=1)
    """Prompts longer than this (chat-formatted, in tokens) are dropped from the prompt set
    rather than truncated; must not exceed ``ppo.max_prompt_tokens``."""

    max_response_tokens: int = Field(256, ge=1)
    """Responses of labeled feedback longer than this (in tokens) are truncated at the end
    before reward-model training."""

    @model_validator(mode="after")
    def _non_empty(self) -> DataConfig:
        if not self.prompt_sources:
            raise ValueError("prompt_sources must name at least one source")
        return self


class RLHFConfig(BaseModel):
    """Everything the RLHF core needs, one section per component."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig = ModelConfig()
    """The policy's weights and how they are held."""

    lora: LoraConfig = LoraConfig()
    """LoRA adapters of the policy (off: full fine-tuning)."""

    critic: CriticConfig = CriticConfig()
    """The value function (used by the ``gae`` estimator only)."""

    reward: RewardConfig = RewardConfig()
    """The Bradley–Terry reward model and its training."""

    ppo: PPOConfig = PPOConfig()
    """The PPO-family algorithm."""

    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    """How the DeepSpeed engines run."""

    sft: SFTConfig = SFTConfig()
    """Supervised fine-tuning on human corrections before each round's PPO (off by default)."""

    po: POConfig = POConfig()
    """Preference optimisation (DPO, IPO, KTO) when ``ppo.algorithm`` names one; its loss is the
    algorithm's."""

    data: DataConfig = DataConfig()
    """Prompt sources, splits and length bounds."""

    best_of_n: BestOfNConfig = BestOfNConfig()
    """Rejection-sampling fine-tuning when ``ppo.algorithm`` is ``best_of_n``."""

    template: PromptTemplate = PromptTemplate()
    """How every prompt is laid out for the policy and the reward model (system prompt,
    few-shot turns, chat-template arguments; ``rlhf/templates.py``); its ``version`` is recorded
    in each policy's lineage and each labeling task's metadata. Default: one user turn."""

    @model_validator(mode="after")
    def _po_loss_is_the_algorithm(self) -> RLHFConfig:
        algorithm = self.ppo.algorithm
        if algorithm not in PO_ALGORITHMS:
            return self
        if "loss" in self.po.model_fields_set and self.po.loss != algorithm:
            raise ValueError(f"po.loss: {self.po.loss!r} contradicts ppo.algorithm {algorithm!r} (set the algorithm only)")
        if self.po.loss != algorithm:
            object.__setattr__(self, "po", self.po.model_copy(update={"loss": algorithm}))
        return self

    @model_validator(mode="after")
    def _template_needs_chat_template(self) -> RLHFConfig:
        if not self.template.is_default and not self.ppo.chat_template:
            raise ValueError("template: a system prompt, few-shot turns or chat-template arguments need "
                             "ppo.chat_template (rollouts from raw text would not show them)")
        return self

    @model_validator(mode="after")
    def _check_lengths(self) -> RLHFConfig:
        if self.data.max_prompt_tokens > self.ppo.max_prompt_tokens:
            raise ValueError(
                f"data.max_prompt_tokens ({self.data.max_prompt_tokens}) must be <= "
                f"ppo.max_prompt_tokens ({self.ppo.max_prompt_tokens})"
            )
        return self

    @property
    def reward_model(self) -> ModelConfig:
        """The reward model's backbone: its own if configured, else the policy's."""
        return self.reward.model or self.model


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config: the dotted field path and what was wrong."""

    field: str  # e.g. "ppo.clip_range", "data.prompt_sources[0].path", "<root>"
    message: str  # e.g. "must be > 0.0, got -1"

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class ConfigError(ValueError):
    """A config that cannot be used; ``issues`` lists every problem found."""

    def __init__(self, source: str, issues: tuple[ConfigIssue, ...]) -> None:
        self.source = source
        self.issues = issues
        lines = "\n".join(f"  {issue}" for issue in issues)
        super().__init__(f"{source}: invalid config\n{lines}")


def load_config(path: str | Path, cls: type[ConfigT] = RLHFConfig) -> ConfigT:  # type: ignore[assignment]
    """Read a YAML file into ``cls``; any problem raises :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(str(path), (ConfigIssue("<file>", str(error)),)) from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(str(path), (ConfigIssue("<yaml>", str(error)),)) from error
    return parse_config(data if data is not None else {}, cls, source=str(path))


def parse_config(data: object, cls: type[ConfigT], source: str = "<config>") -> ConfigT:
    """Validate already-parsed data (a mapping) into ``cls``; raises :class:`ConfigError`."""
    if not isinstance(data, Mapping):
        issue = ConfigIssue("<root>", f"expected a mapping of sections, got {type(data).__name__}")
        raise ConfigError(source, (issue,))
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(source, _issues(cls, error)) from None


def _issues(cls: type[BaseModel], error: ValidationError) -> tuple[ConfigIssue, ...]:
    """One issue per field path; alternatives of a union are joined with "or"."""
    expected: dict[str, list[str]] = {}
    got: dict[str, str] = {}
    for detail in error.errors(include_url=False):
        field, message = _describe(cls, detail)
        if message not in expected.setdefault(field, []):
            expected[field].append(message)
        if "input" in detail and detail["type"] not in _NO_INPUT:
            got[field] = f", got {detail['input']!r}"
    return tuple(
        ConfigIssue(field, " or ".join(messages) + got.get(field, ""))
        for field, messages in expected.items()
    )


_NO_INPUT = ("missing", "extra_forbidden", "value_error")


def _describe(cls: type[BaseModel], detail: Mapping[str, Any]) -> tuple[str, str]:
    loc: tuple[Any, ...] = tuple(detail["loc"])
    kind: str = detail["type"]
    if kind == "extra_forbidden":
        parent_path, parent = _walk(cls, loc[:-1])
        expected = ", ".join(parent.model_fields) if parent is not None else "no keys here"
        return _join(parent_path + [str(loc[-1])]), f"unknown key; expected one of: {expected}"
    path, _ = _walk(cls, loc)
    return _join(path), _message(kind, detail)


def _message(kind: str, detail: Mapping[str, Any]) -> str:
    ctx: Mapping[str, Any] = detail.get("ctx") or {}
    if kind == "missing":
        return "required, but missing"
    if kind in _BOUNDS:
        symbol, key = _BOUNDS[kind]
        return f"must be {symbol} {ctx[key]}"
    if kind in ("literal_error", "enum"):
        return f"must be one of {ctx.get('expected')}"
    if kind == "value_error":
        return str(ctx.get("error", detail["msg"]))
    text: str = detail["msg"]
    return f"{text[:1].lower()}{text[1:]}"


_BOUNDS = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}


def _walk(cls: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None]:
    """Map a pydantic error location to field names (dropping union-member tags) and the
    model class that the location ends in, if any."""
    path: list[str] = []
    annotation: Any = cls
    for item in loc:
        model = _model_in(annotation)
        if isinstance(item, int):
            path.append(f"[{item}]")
            annotation = _item_type(annotation)
        elif model is not None and item in model.model_fields:
            path.append(str(item))
            annotation = model.model_fields[item].annotation
        # anything else is a tag pydantic adds for a union member: not a field
    return path, _model_in(annotation)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config model class inside an annotation (``X``, ``X | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, _UNION_TYPE):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _item_type(annotation: Any) -> Any:
    args = [arg for arg in typing.get_args(annotation) if arg is not Ellipsis]
    return args[0] if args else None


def _join(parts: list[str]) -> str:
    text = ".".join(parts).replace(".[", "[")
    return text or "<root>"

