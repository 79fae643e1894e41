"""What an evaluation uses: its judges and their settings (the `eval` section of a run config,
and what `hitl eval` builds from its options)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rlhf.quality.judges import JudgeConfig

JudgeName = Literal["rule", "reward-model", "llm", "human"]


class LlmJudgeConfig(BaseModel):
    """An OpenAI-compatible chat endpoint as judge (rlhf/eval/judges.py `LlmJudge`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(min_length=1)
    """The endpoint's base URL, up to and including `/v1` (e.g. http://127.0.0.1:8000/v1)."""
    model: str | None = None
    """The model name sent with each request (None: the server's own)."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """The environment variable holding the API key (never the key itself in a config)."""
    max_tokens: int = Field(8, ge=1, le=256)
    """Tokens the judge may write (its answer is one letter)."""
    timeout_s: float = Field(60.0, gt=0)
    concurrency: int = Field(4, ge=1, le=64)
    """Requests in flight at once."""


class HumanJudgeConfig(BaseModel):
    """Pairs published as labeling tasks through the feedback service (services/eval/human.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    project: str = Field("eval", min_length=1)
    """The feedback project the tasks go to (annotators pull from it)."""
    annotations_per_item: int = Field(3, ge=1, le=100)
    """k: distinct annotators asked per pair; the item's verdict is their majority."""
    gold_tasks: Path | None = None
    """A tasks JSONL with `gold` on every line: gold pairs mixed among the published ones."""
    gold_rate: float = Field(0.0, ge=0.0, lt=1.0)
    """Gold tasks added, as a share of the pairs (at least one when > 0)."""
    min_gold_accuracy: float = Field(0.0, ge=0.0, le=1.0)
    """Annotators below this accuracy on the gold tasks they answered are left out."""
    timeout_s: float = Field(600.0, ge=0.0)
    """How long to wait for k judgements of every pair (0: publish and return)."""
    poll_s: float = Field(1.0, gt=0.0)
    seed: int = 0
    """Seed of the candidates' shown order and of where gold tasks fall."""

    @model_validator(mode="after")
    def _gold(self) -> "HumanJudgeConfig":
        if self.gold_rate > 0 and self.gold_tasks is None:
            raise ValueError("gold_rate > 0 needs gold_tasks (a tasks JSONL with gold on every line)")
        return self


class EvalConfig(BaseModel):
    """The judges of an evaluation and their settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    judges: list[JudgeName] = Field(default_factory=lambda: ["rule"], min_length=1)
    """Any combination, each at most once: `rule`, `reward-model`, `llm`, `human`."""
    rule: JudgeConfig | None = None
    """The `rule` judge's rule (None: the first simulated annotator's, else `positive`)."""
    llm: LlmJudgeConfig | None = None
    """Required when `judges` has `llm`."""
    human: HumanJudgeConfig | None = None
    """Required when `judges` has `human`."""

    @model_validator(mode="after")
    def _sections(self) -> "EvalConfig":
        if len(set(self.judges)) != len(self.judges):
            raise ValueError(f"judges: each judge at most once, got {self.judges}")
        for name in ("llm", "human"):
            if name in self.judges and getattr(self, name) is None:
                raise ValueError(f"{name}: required when judges has {name!r}")
        return self
