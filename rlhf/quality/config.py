"""The configuration of annotator quality in the loop: gold tasks, the figures' thresholds,
and what they do to training (weights, pausing)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from rlhf.quality.figures import QualityConfig


class AnnotatorQualityConfig(BaseModel):
    """Gold tasks, annotator quality figures, and what they do to training."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gold_rate: float = Field(0.0, ge=0.0, le=1.0)
    """Share of each round's tasks that are gold tasks (at least one when > 0)."""
    gold_tasks: Path | None = None
    """JSONL file of gold tasks (`hitl feedback tasks load` format, each line with `gold`);
    None: gold pairs made from policy answers the simulated annotators' rule clearly separates."""
    simulated_gold_margin: float = Field(0.5, gt=0.0)
    """Without `gold_tasks`: smallest score difference (in the rule's units) between a task's two
    answers under the noise-free rule for the task to serve as a gold pair."""
    seed: int = Field(0, ge=0)
    """Seed of where gold tasks sit among a round's tasks and of their candidates' order."""
    min_gold: int = Field(5, ge=1)
    """Gold answers an annotator needs before gold accuracy sets the weight and may pause."""
    pause_below_gold_accuracy: float = Field(0.6, ge=0.0, le=1.0)
    """Annotators whose gold accuracy is below this (over at least `min_gold`) are paused."""
    min_consensus: int = Field(5, ge=1)
    """Without enough gold: units with a majority among the other annotators needed before
    agreement with that majority sets the weight (fewer: `new_annotator_weight`)."""
    new_annotator_weight: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of an annotator whom neither gold nor consensus has measured yet: below an
    honest annotator's (an annotator right 90% of the time earns 0.8), so that ids invented
    to outvote people start with little say and earn the rest on gold."""
    position_bias_z: float = Field(3.0, gt=0.0)
    """|z| of the rate of choosing the answer shown first beyond which it is reported as biased."""
    lead_time_z: float = Field(3.0, gt=0.0)
    """Robust |z| of an annotator's median lead time beyond which it is reported as an outlier."""
    apply_weights: bool = True
    """Multiply each annotator's item weights by their quality weight (2·accuracy − 1)."""
    pause: bool = True
    """Leave paused annotators' judgements out of training."""

    @field_validator("gold_tasks")
    @classmethod
    def _needs_a_rate(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("gold_rate") == 0.0:
            raise ValueError("given, but gold_rate is 0: no gold task would be published")
        return value

    def thresholds(self) -> QualityConfig:
        """The figures' thresholds, as `rlhf.quality` takes them."""
        return QualityConfig(
            min_gold=self.min_gold,
            min_consensus=self.min_consensus,
            prior_weight=self.new_annotator_weight,
            pause_below_gold_accuracy=self.pause_below_gold_accuracy,
            lead_time_z=self.lead_time_z,
            position_bias_z=self.position_bias_z,
        )
