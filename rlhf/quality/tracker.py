"""Annotator quality in the loop: gold tasks in each round, quality per round and overall,
annotator weights and pausing for curation, and the table `hitl annotators` prints.

The figures themselves are `rlhf.quality.figures`'s (Krippendorff's alpha, agreement with the
consensus and with gold, position bias, lead-time outliers, weights, pausing); this module
turns stored records into its `Judgement`s, keeps the running total over a run, and decides
what a round applies:

* `weights[a]` multiplies the weight of annotator a's preference and ranking items in the
  round's curation (the reward model's loss weights each pair by it);
* annotators in `paused` (gold accuracy under the threshold over at least `min_gold` gold
  answers) have their judgements kept in the store but left out of training, counted.

Gold tasks are mixed in by `rlhf.quality.gold`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.quality.config import AnnotatorQualityConfig
from rlhf.quality.figures import AnnotatorQuality, Judgement, QualityConfig, alpha_by_kind, annotator_report
from rlhf.quality.gold import mix_gold
from rlhf.quality.judges import Judge
from rlhf.records import GoldAnswer, StoredRecord, Task

TIE: tuple[str] = ("tie",)
BOTH_BAD: tuple[str] = ("both_bad",)
TRAINED_KINDS = ("preference", "ranking", "ratings")  # the kinds curation turns into training items (ratings: when curation.ratings.enabled)


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
                 prompt_id: Callable[[str], str], pool: Sequence[Task] = ()):
        self.cfg = cfg
        self.store = store
        self.project = project
        self.judge = judge
        self.prompt_id = prompt_id
        self.pool = list(pool) if cfg.gold_rate > 0 else []  # gold pairs (`load_gold_tasks` reads a file of them)
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
