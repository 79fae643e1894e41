"""Annotator quality: agreement, gold accuracy, position bias, lead-time outliers, weights.

Inputs are `Judgement`s: one annotator's value on one *unit* (the thing judged: a task's
preference, one candidate's rank, one (candidate, aspect) rating). Values are normalised
so that annotators who saw the candidates in different orders are comparable (a preference's
value is the id of the winning candidate, or "tie" / "both_bad").

- `krippendorff_alpha(units, level)`: Krippendorff's alpha for nominal, ordinal or interval
  data (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"), from the
  coincidence matrix; units with fewer than two values are not pairable and left out.
- `annotator_report(...)`: per annotator: judgements, agreement with the leave-one-out
  consensus, gold accuracy, left-position rate and its z-score, median lead time and its
  robust z-score, the derived weight, and whether the annotator is paused.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Literal, Mapping, Sequence

Level = Literal["nominal", "ordinal", "interval"]


@dataclass(frozen=True)
class Judgement:
    unit: Hashable  # what was judged (task id, (task, candidate), (task, candidate, aspect))
    annotator: str
    value: Hashable | float  # normalised answer
    kind: str = "preference"  # question kind: preference, ranking, rating
    chose_left: bool | None = None  # strict preferences: did the annotator pick the answer shown first?
    lead_time_s: float | None = None


def krippendorff_alpha(units: Mapping[Hashable, Sequence[Hashable | float]], level: Level = "nominal") -> float:
    """Alpha over units -> the values annotators gave them; nan when nothing is pairable or no variation."""
    pairable = {u: list(vs) for u, vs in units.items() if len(vs) >= 2}
    if not pairable:
        return float("nan")
    coincidence: dict[tuple, float] = defaultdict(float)
    for values in pairable.values():
        m = len(values)
        for i, a in enumerate(values):
            for j, b in enumerate(values):
                if i != j:
                    coincidence[(a, b)] += 1.0 / (m - 1)
    marginals: dict = defaultdict(float)
    for (a, _), w in coincidence.items():
        marginals[a] += w
    n = sum(marginals.values())
    if n <= 1:
        return float("nan")
    delta = _metric(level, marginals)
    observed = sum(w * delta(a, b) for (a, b), w in coincidence.items()) / n
    expected = sum(marginals[a] * marginals[b] * delta(a, b) for a in marginals for b in marginals) / (n * (n - 1))
    if expected == 0:
        return float("nan") if observed == 0 else 0.0
    return 1.0 - observed / expected


def _metric(level: Level, marginals: Mapping):
    if level == "nominal":
        return lambda a, b: 0.0 if a == b else 1.0
    if level == "interval":
        return lambda a, b: (float(a) - float(b)) ** 2
    # ordinal: squared sum of the marginals between the two ranks (each end counted half)
    order = sorted(marginals)
    index = {v: i for i, v in enumerate(order)}
    counts = [marginals[v] for v in order]

    def ordinal(a, b) -> float:
        i, j = sorted((index[a], index[b]))
        if i == j:
            return 0.0
        return (sum(counts[i : j + 1]) - (counts[i] + counts[j]) / 2.0) ** 2

    return ordinal


@dataclass(frozen=True)
class QualityConfig:
    min_gold: int = 5  # gold answers needed before gold accuracy counts
    min_consensus: int = 1  # units with a majority of the others needed before consensus agreement sets the weight
    prior_weight: float = 1.0  # the weight of an annotator neither gold nor consensus has measured yet
    pause_below_gold_accuracy: float = 0.6
    lead_time_z: float = 3.0  # robust z beyond which an annotator's median lead time is an outlier
    position_bias_z: float = 3.0  # |z| beyond which the left-position rate counts as biased


@dataclass
class AnnotatorQuality:
    annotator: str
    judgements: int = 0
    consensus_agreement: float | None = None  # share of units where they matched the others' majority
    consensus_units: int = 0  # units where the others had a strict majority
    gold_answered: int = 0
    gold_accuracy: float | None = None
    left_rate: float | None = None  # share of strict preferences for the answer shown first
    position_z: float | None = None
    position_biased: bool = False
    median_lead_time_s: float | None = None
    lead_time_z: float | None = None
    lead_time_outlier: bool = False
    weight: float = 1.0
    paused: bool = False
    reasons: list[str] = field(default_factory=list)
    superseded: int = 0  # answers replaced by a later answer of theirs to the same unit (edits, not votes)


def latest_judgements(judgements: Iterable[Judgement]) -> list[Judgement]:
    """One judgement per (annotator, unit, kind): the last one given. A second answer to the
    same unit is an edit, not another vote: an annotator who answers a unit three times
    counts once, in consensus, gold and every figure."""
    latest: dict[tuple, Judgement] = {}
    for j in judgements:
        latest.pop((j.annotator, j.unit, j.kind), None)  # re-inserted: the last answer keeps the last place
        latest[(j.annotator, j.unit, j.kind)] = j
    return list(latest.values())


def _consensus(judgements: Sequence[Judgement]) -> dict[str, tuple[int, int]]:
    """Per annotator: (units where the others have a strict majority, matches with it).

    Two passes. First, each annotator's agreement with the plain majority of everyone on each
    unit gives a provisional weight (2·agreement − 1, floored at 0). Then each annotator is
    compared with the majority of the *others*, each other counted with that provisional
    weight. So annotators who always vote against the rest carry no weight in anyone's
    consensus: two invented ids that side against three people no longer make every unit a
    tie from each person's point of view."""
    by_unit: dict[Hashable, list[Judgement]] = defaultdict(list)
    for j in judgements:
        by_unit[j.unit].append(j)
    first: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for unit_judgements in by_unit.values():
        top = _strict_top(Counter(j.value for j in unit_judgements))
        if top is None or len(unit_judgements) < 2:
            continue
        for j in unit_judgements:
            first[j.annotator][0] += 1
            first[j.annotator][1] += int(j.value == top)
    provisional = {a: max(0.0, 2.0 * m / u - 1.0) for a, (u, m) in first.items()}
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for unit_judgements in by_unit.values():
        for j in unit_judgements:
            others: Counter = Counter()
            for o in unit_judgements:
                if o.annotator != j.annotator:
                    others[o.value] += provisional.get(o.annotator, 1.0)
            top = _strict_top(others)
            if top is None:
                continue  # no strict majority among the others
            tally[j.annotator][0] += 1
            tally[j.annotator][1] += int(j.value == top)
    return {a: (t[0], t[1]) for a, t in tally.items()}


def _strict_top(counts: Counter) -> Hashable | None:
    """The value with the most (weighted) votes, if it has more than any other and more than 0."""
    ranked = counts.most_common(2) + [(None, 0), (None, 0)]
    (top, n), (_, second) = ranked[0], ranked[1]
    return top if n > 0 and n != second else None


def _robust_z(values: Mapping[str, float]) -> dict[str, float]:
    xs = list(values.values())
    if len(xs) < 3:
        return {k: 0.0 for k in values}
    med = statistics.median(xs)
    mad = statistics.median(abs(x - med) for x in xs) * 1.4826
    if mad == 0:
        return {k: 0.0 for k in values}
    return {k: (v - med) / mad for k, v in values.items()}


def annotator_report(
    judgements: Iterable[Judgement],
    gold: Mapping[Hashable, Hashable | float] | None = None,
    cfg: QualityConfig | None = None,
) -> dict[str, AnnotatorQuality]:
    """Quality figures per annotator (see the module docstring); gold maps unit -> right answer."""
    cfg = cfg or QualityConfig()
    given = list(judgements)
    judgements = latest_judgements(given)
    answered = Counter(j.annotator for j in given)
    gold = gold or {}
    report: dict[str, AnnotatorQuality] = {}
    by_annotator: dict[str, list[Judgement]] = defaultdict(list)
    for j in judgements:
        by_annotator[j.annotator].append(j)
    consensus = _consensus([j for j in judgements if j.unit not in gold])
    log_lead = {}
    for name, js in by_annotator.items():
        q = AnnotatorQuality(name, judgements=len(js), superseded=answered[name] - len(js))
        if consensus.get(name, (0, 0))[0]:
            units, matches = consensus[name]
            q.consensus_agreement = matches / units
            q.consensus_units = units
        graded = [j for j in js if j.unit in gold]
        q.gold_answered = len(graded)
        if graded:
            q.gold_accuracy = sum(j.value == gold[j.unit] for j in graded) / len(graded)
        sided = [j.chose_left for j in js if j.chose_left is not None]
        if sided:
            n = len(sided)
            q.left_rate = sum(sided) / n
            q.position_z = (q.left_rate - 0.5) / math.sqrt(0.25 / n)
            q.position_biased = abs(q.position_z) > cfg.position_bias_z
        leads = [j.lead_time_s for j in js if j.lead_time_s is not None and j.lead_time_s > 0]
        if leads:
            q.median_lead_time_s = statistics.median(leads)
            log_lead[name] = math.log(q.median_lead_time_s)
        report[name] = q
    for name, z in _robust_z(log_lead).items():
        report[name].lead_time_z = z
        report[name].lead_time_outlier = abs(z) > cfg.lead_time_z
    for q in report.values():
        _weigh(q, cfg)
    return report


def _weigh(q: AnnotatorQuality, cfg: QualityConfig) -> None:
    """Weight = how far above chance the annotator is (2·accuracy − 1, floored at 0), from
    gold when enough gold was answered, else from consensus when the others agreed on enough
    units, else the prior (`prior_weight`: below an honest annotator's, a new id earns its say);
    pause under the gold threshold."""
    q.weight = cfg.prior_weight
    if q.gold_accuracy is not None and q.gold_answered >= cfg.min_gold:
        q.weight = max(0.0, 2.0 * q.gold_accuracy - 1.0)
        if q.gold_accuracy < cfg.pause_below_gold_accuracy:
            q.paused = True
            q.reasons.append(f"gold accuracy {q.gold_accuracy:.2f} < {cfg.pause_below_gold_accuracy:.2f} over {q.gold_answered}")
    elif q.consensus_agreement is not None and q.consensus_units >= cfg.min_consensus:
        q.weight = max(0.0, 2.0 * q.consensus_agreement - 1.0)
    if q.position_biased:
        q.reasons.append(f"picks the left answer {q.left_rate:.0%} of the time (z={q.position_z:.1f})")
    if q.lead_time_outlier:
        q.reasons.append(f"median lead time {q.median_lead_time_s:.1f}s is an outlier (z={q.lead_time_z:.1f})")


def alpha_by_kind(judgements: Iterable[Judgement], levels: Mapping[str, Level] | None = None) -> dict[str, float]:
    """Krippendorff's alpha per question kind (preference: nominal, ranking: ordinal, rating: interval)."""
    levels = {"preference": "nominal", "ranking": "ordinal", "rating": "interval", **(levels or {})}
    units: dict[str, dict[Hashable, list]] = defaultdict(lambda: defaultdict(list))
    for j in latest_judgements(judgements):  # one value per annotator and unit
        units[j.kind][j.unit].append(j.value)
    return {kind: krippendorff_alpha(u, levels.get(kind, "nominal")) for kind, u in units.items()}
