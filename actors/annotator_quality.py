"""Annotator quality in the loop: gold tasks in each round, quality per round and overall,
annotator weights and pausing for curation, and the table `hitl annotators` prints.

The figures themselves are `rlhf.quality`'s (Krippendorff's alpha, agreement with the
consensus and with gold, position bias, lead-time outliers, weights, pausing); this module
turns stored records into its `Judgement`s, keeps the running total over a run, and decides
what a round applies:

* `weights[a]` multiplies the weight of annotator a's preference and ranking items in the
  round's curation (the reward model's loss weights each pair by it);
* annotators in `paused` (gold accuracy under the threshold over at least `min_gold` gold
  answers) have their judgements kept in the store but left out of training, counted.

Gold tasks: a share `gold_rate` of each round's tasks carries a known answer. From a JSONL
file of gold tasks (`gold_tasks`), a gold pair is republished under the id of the round task
it replaces, its candidates in a seeded random order, with the policy version of the
replaced task's candidates and without metadata: nothing in what annotators receive tells a
gold task from the others. Without a file, for unattended runs with simulated annotators,
a round task whose two policy answers the noise-free rule separates by more than
`simulated_gold_margin` becomes a gold task with the rule's answer: the simulation's stand-in
for an operator's gold set.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.judges import Judge
from rlhf.quality import AnnotatorQuality, Judgement, QualityConfig, alpha_by_kind, annotator_report
from services.feedback.jsonl import JsonlError, read_tasks
from services.feedback.records import GoldAnswer, StoredRecord, Task

TIE: tuple[str] = ("tie",)
BOTH_BAD: tuple[str] = ("both_bad",)
TRAINED_KINDS = ("preference", "ranking")  # the kinds curation turns into training items


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
    agreement with that majority sets the weight (fewer: weight 1)."""
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
            pause_below_gold_accuracy=self.pause_below_gold_accuracy,
            lead_time_z=self.lead_time_z,
            position_bias_z=self.position_bias_z,
        )


class GoldFileError(ValueError):
    """A gold tasks file that cannot be used; the message names the file, line and field."""


# --------------------------------------------------------------------------- records -> judgements


def preference_value(p: pb.Preference) -> Hashable:
    """A preference as a value comparable across display orders: the winning candidate's id
    (as ("better", id)), or TIE / BOTH_BAD."""
    if p.choice == pb.Preference.CHOICE_A:
        return ("better", p.candidate_a_id)
    if p.choice == pb.Preference.CHOICE_B:
        return ("better", p.candidate_b_id)
    return TIE if p.choice == pb.Preference.CHOICE_TIE else BOTH_BAD


def gold_value(gold: GoldAnswer) -> Hashable:
    """A gold answer as the value a right preference has."""
    return TIE if gold.is_tie else ("better", gold.better)


def _chose_left(record: pb.FeedbackRecord) -> bool | None:
    """For a strict preference: did the annotator pick the answer shown first? Shown first is
    the first id of metadata `display_order` when a tool records it, else candidate A."""
    p = record.preference
    if p.choice not in (pb.Preference.CHOICE_A, pb.Preference.CHOICE_B):
        return None
    order = record.metadata.get("display_order", "")
    left = p.candidate_b_id if order == p.candidate_b_id or order.startswith(p.candidate_b_id + ",") else p.candidate_a_id
    winner = p.candidate_a_id if p.choice == pb.Preference.CHOICE_A else p.candidate_b_id
    return winner == left


def judgements_of(record: pb.FeedbackRecord) -> list[Judgement]:
    """The record's judgements: a preference is one (unit: the task), a ranking one per
    candidate (its rank), ratings one per (candidate, aspect); corrections and flags none."""
    lead = record.lead_time_seconds if record.HasField("lead_time_seconds") else None
    kind = record.WhichOneof("judgement")
    who, task = record.annotator_id, record.task_id
    if kind == "preference":
        return [Judgement(task, who, preference_value(record.preference), "preference", _chose_left(record), lead)]
    if kind == "ranking":
        return [Judgement((task, e.candidate_id), who, int(e.rank), "ranking", None, lead) for e in record.ranking.entries]
    if kind == "ratings":
        return [Judgement((task, e.candidate_id, e.aspect), who, float(e.value), "rating", None, lead) for e in record.ratings.entries]
    return []


def gold_units(gold: Mapping[str, GoldAnswer]) -> dict[Hashable, Hashable]:
    """Gold answers by task id as `rlhf.quality` grades them (preference units are task ids)."""
    return {task_id: gold_value(answer) for task_id, answer in gold.items()}


# --------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class QualitySummary:
    """Quality of a set of judgements: per annotator and alpha per question kind."""

    annotators: dict[str, AnnotatorQuality]
    alpha: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: rows sorted by annotator, NaN as None."""
        return {
            "alpha": {kind: _finite(value) for kind, value in sorted(self.alpha.items())},
            "annotators": [quality_row(q) for _, q in sorted(self.annotators.items())],
        }


def summarize(judgements: Sequence[Judgement], gold: Mapping[str, GoldAnswer], thresholds: QualityConfig) -> QualitySummary:
    """`rlhf.quality`'s figures over the judgements, graded against the gold answers."""
    return QualitySummary(annotator_report(judgements, gold_units(gold), thresholds), alpha_by_kind(judgements))


def quality_row(q: AnnotatorQuality) -> dict[str, Any]:
    """One annotator's figures as a JSON-ready dict (floats rounded to 4 places)."""
    return {k: _finite(v) if isinstance(v, float) else v for k, v in asdict(q).items()}


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 4)


TABLE_COLUMNS = ("annotator", "judgements", "gold answered", "gold accuracy", "consensus agreement",
                 "position bias", "lead-time outlier", "weight", "paused")


def format_table(summary: Mapping[str, Any]) -> str:
    """The plain-text table of `QualitySummary.as_dict()`: a row per annotator, then alpha per kind."""
    rows = [TABLE_COLUMNS] + [_table_cells(row) for row in summary["annotators"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    alphas = summary["alpha"] or {}
    lines.append("Krippendorff's alpha: " + (", ".join(f"{k} {_num(v, 3)}" for k, v in alphas.items()) or "no judgements"))
    return "\n".join(lines)


def _table_cells(row: Mapping[str, Any]) -> tuple[str, ...]:
    bias = "-" if row["left_rate"] is None else f"left {row['left_rate']:.0%} z={row['position_z']:+.1f}" + (" !" if row["position_biased"] else "")
    lead = "-" if row["lead_time_z"] is None else f"{'yes' if row['lead_time_outlier'] else 'no'} (median {row['median_lead_time_s']:.1f}s z={row['lead_time_z']:+.1f})"
    return (
        row["annotator"],
        str(row["judgements"]),
        str(row["gold_answered"]),
        _num(row["gold_accuracy"], 2),
        _num(row["consensus_agreement"], 2),
        bias,
        lead,
        f"{row['weight']:.2f}",
        "PAUSED" if row["paused"] else "no",
    )


def _num(value: float | None, places: int) -> str:
    return "-" if value is None else f"{value:.{places}f}"


def store_summary(store: Any, projects: Iterable[str] | None, cfg: AnnotatorQualityConfig) -> QualitySummary:
    """Quality over every record of the projects in a store (what `hitl annotators` prints)."""
    names = None if projects is None else list(projects)
    judgements = [j for stored in store.iter_after(0, names) for j in judgements_of(stored.record)]
    return summarize(judgements, store.gold_answers(names), cfg.thresholds())


# --------------------------------------------------------------------------- gold tasks


def gold_count(rate: float, tasks: int) -> int:
    """Gold tasks among a round's tasks: rate × tasks, rounded, at least one when rate > 0."""
    if rate <= 0.0 or tasks == 0:
        return 0
    return min(tasks, max(1, round(rate * tasks)))


def load_gold_tasks(path: Path) -> list[Task]:
    """The gold pairs of a JSONL file of tasks; every line needs `gold` and exactly 2 candidates."""
    try:
        tasks = list(read_tasks(Path(path)))
    except (JsonlError, OSError) as err:
        raise GoldFileError(f"gold tasks file: {err}") from None
    for number, task in enumerate(tasks, start=1):
        if task.gold is None:
            raise GoldFileError(f"{path}: task {number} ({task.task_id!r}): gold: required in a gold tasks file")
        if len(task.candidates) != 2:
            raise GoldFileError(f"{path}: task {number} ({task.task_id!r}): candidates: a gold pair needs exactly 2, got {len(task.candidates)}")
        if not task.gold.is_tie and task.gold.better not in task.candidate_ids:
            raise GoldFileError(f"{path}: task {number} ({task.task_id!r}): gold.better: unknown candidate {task.gold.better!r}")
    if not tasks:
        raise GoldFileError(f"{path}: no gold tasks")
    return tasks


def gold_from_file(slot: Task, gold: Task, rng: random.Random, prompt_id: Callable[[str], str]) -> Task:
    """`gold` republished in place of the round task `slot`: the slot's ids, annotations wanted
    and policy version, the gold pair's texts in a random order, no metadata."""
    order = [0, 1]
    rng.shuffle(order)
    version = slot.candidates[0].policy_version if slot.candidates else 0
    candidates = []
    better = None
    for j, source_index in enumerate(order):
        source = gold.candidates[source_index]
        candidate_id = f"{slot.task_id}-{j}"
        candidates.append(pb.Candidate(candidate_id=candidate_id, text=source.text, policy_version=version))
        if gold.gold is not None and source.candidate_id == gold.gold.better:
            better = candidate_id
    return Task(
        task_id=slot.task_id, project=slot.project, prompt_id=prompt_id(gold.prompt), prompt=gold.prompt,
        candidates=tuple(candidates), annotations_wanted=slot.annotations_wanted, gold=GoldAnswer(better),
    )


def rule_gold(task: Task, judge: Judge, margin: float) -> GoldAnswer | None:
    """The noise-free rule's answer for a pair it separates by more than `margin`, else None."""
    if len(task.candidates) != 2:
        return None
    a, b = task.candidates
    gap = judge.score(task.prompt, a.text) - judge.score(task.prompt, b.text)
    if abs(gap) <= max(margin, judge.cfg.tie_margin):
        return None
    return GoldAnswer(a.candidate_id if gap > 0 else b.candidate_id)


def mix_gold(
    tasks: Sequence[Task],
    round_index: int,
    cfg: AnnotatorQualityConfig,
    pool: Sequence[Task],
    judge: Judge | None,
    prompt_id: Callable[[str], str],
) -> list[Task]:
    """The round's tasks with `gold_count(...)` of them gold (see the module docstring).
    Deterministic for (cfg.seed, round_index)."""
    out = list(tasks)
    n = gold_count(cfg.gold_rate, len(out))
    if n == 0:
        return out
    rng = random.Random(f"hitl-gold:{cfg.seed}:{round_index}")
    if pool:
        for j, position in enumerate(sorted(rng.sample(range(len(out)), n))):
            out[position] = gold_from_file(out[position], pool[(round_index * n + j) % len(pool)], rng, prompt_id)
        return out
    if judge is None:
        raise ValueError("coordinator.quality.gold_tasks: required when no simulated annotator's rule can make gold pairs")
    answers = {i: rule_gold(t, judge, cfg.simulated_gold_margin) for i, t in enumerate(out)}
    separable = [i for i, answer in answers.items() if answer is not None]
    for position in rng.sample(separable, min(n, len(separable))):
        out[position] = replace(out[position], gold=answers[position])
    return out


# --------------------------------------------------------------------------- the loop's tracker


@dataclass
class AppliedQuality:
    """What one round applies to curation, and what its report says."""

    weights: dict[str, float]  # annotator -> multiplier of their items' weights (absent: 1)
    paused: frozenset[str]  # annotators whose judgements are left out of training
    report: dict[str, Any] = field(default_factory=dict)


class QualityTracker:
    """The coordinator's view of annotator quality over a run.

    Keeps the judgements of every record of the project up to the last round's end (read
    from the store incrementally, so a resumed or recovered run rebuilds the same view) and,
    per round, summarises the round's records and all records so far; the overall summary
    sets the weights and the paused set the round applies.
    """

    def __init__(self, cfg: AnnotatorQualityConfig, store: Any, project: str, judge: Judge | None,
                 prompt_id: Callable[[str], str]):
        self.cfg = cfg
        self.store = store
        self.project = project
        self.judge = judge
        self.prompt_id = prompt_id
        self.pool = load_gold_tasks(cfg.gold_tasks) if cfg.gold_tasks is not None and cfg.gold_rate > 0 else []
        self._seen: list[tuple[int, Judgement]] = []  # (seq, judgement), in seq order
        self._mark = 0  # every record with seq <= mark is in _seen
        self._gold_published: dict[int, int] = {}

    def mix_gold(self, round_index: int, tasks: Sequence[Task]) -> list[Task]:
        """The round's tasks with gold tasks mixed in at `gold_rate`."""
        mixed = mix_gold(tasks, round_index, self.cfg, self.pool, self.judge, self.prompt_id)
        self._gold_published[round_index] = sum(t.gold is not None for t in mixed)
        return mixed

    def assess(self, records: Sequence[StoredRecord], round_index: int | None = None) -> AppliedQuality:
        """Quality of the round's records and of everything up to them; the weights and paused set."""
        upto = records[-1].seq if records else self._mark
        overall_js = self._catch_up(upto)
        round_js = [j for s in records for j in judgements_of(s.record)]
        gold = self.store.gold_answers([self.project])
        thresholds = self.cfg.thresholds()
        overall = summarize(overall_js, gold, thresholds)
        this_round = summarize(round_js, gold, thresholds)
        paused = frozenset(a for a, q in overall.annotators.items() if q.paused) if self.cfg.pause else frozenset()
        weights = {a: q.weight for a, q in overall.annotators.items()} if self.cfg.apply_weights else {}
        held_back = Counter(
            s.record.annotator_id for s in records
            if s.record.annotator_id in paused and s.record.WhichOneof("judgement") in TRAINED_KINDS
        )
        report = {
            "round": this_round.as_dict(),
            "overall": overall.as_dict(),
            "gold_tasks_published": self._gold_published.get(round_index, 0) if round_index is not None else None,
            "weights": {a: round(w, 4) for a, w in sorted(weights.items())},
            "paused": sorted(paused),
            "paused_judgements": dict(sorted(held_back.items())),
        }
        return AppliedQuality(weights, paused, report)

    def _catch_up(self, upto: int) -> list[Judgement]:
        """Judgements of every record with seq <= upto (reading only what is new)."""
        if upto < self._mark:  # a round redone after a restore: forget what came after it
            self._seen = [(seq, j) for seq, j in self._seen if seq <= upto]
            self._mark = upto
        while self._mark < upto:
            page = [s for s in self.store.read_after(self._mark, 1000, [self.project]) if s.seq <= upto]
            if not page:
                break
            self._seen.extend((s.seq, j) for s in page for j in judgements_of(s.record))
            self._mark = page[-1].seq
        self._mark = max(self._mark, upto)
        return [j for _, j in self._seen]
