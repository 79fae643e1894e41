"""Preference pairs from ratings, UltraFeedback-style.

A ratings record gives candidates of a task a value per aspect, on the scales the task
declares (`LabelingTask.rating_scales`). Two candidates that one annotator rated become a
preference pair for the reward model:

- values are compared normalised by their aspect's scale, (value - min) / (max - min), so
  aspects of different scales weigh alike;
- ``pair_on: overall`` compares two candidates once: on the overall aspect where both carry it,
  else on the weighted mean of the aspects both were rated on; ``each_aspect`` compares them on
  every aspect both were rated on, one pair per aspect;
- a difference larger than ``margin`` is a preference for the higher-rated candidate (it is
  response A); equal values are a tie; a difference within the margin is skipped or a tie
  (``within_margin``); an aspect of weight 0 takes no part;
- the pairs of one annotator's ratings of one task share its weight, as a ranking's pairs do
  (`rlhf/preferences.py`): one rated task counts as much as one pairwise judgement. Under
  ``each_aspect`` the aspects share it in proportion to their weights, and each aspect's
  share is split evenly over its pairs.

:func:`rating_problem` says what is wrong with a ratings record (an unknown candidate, an
aspect the task has no scale for, a value off its scale); :func:`normalised_ratings` reads a
well-formed one; :func:`merge_ratings` joins one annotator's records of a task (a later value
of a candidate and aspect replaces an earlier one: UltraFeedback imports write a record per
aspect, labeling tools a record per candidate); :func:`rating_pairs` makes the pairs. All of
it is pure; `rules.curate` applies flags, annotator weights and duplicates.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.curation.config import RatingPairsConfig
from rlhf.preferences import Choice, PreferencePair
from rlhf.records import Task

_EQUAL = 1e-9
"""Normalised differences at most this are equal ratings (floating-point noise of a mean)."""


@dataclass(frozen=True)
class RatingProblem:
    """Why a ratings record cannot be used: the curation outcome it counts as, the field at
    fault and what is wrong with it."""

    outcome: str  # dropped/rating_unknown_candidate, dropped/rating_unknown_aspect, ...
    field: str  # e.g. ratings.entries[2].value
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


@dataclass(frozen=True)
class Rating:
    """One value of a candidate on an aspect, normalised to [0, 1] by the aspect's scale."""

    candidate_id: str
    aspect: str
    score: float  # (value - min) / (max - min)
    confidence: float = 1.0  # of the record it came from
    source: int = 0  # which record it came from (the caller's index)


@dataclass(frozen=True)
class RatingPair:
    """A preference pair made from ratings, with what made it."""

    pair: PreferencePair
    aspect: str | None  # the aspect compared; None: the overall comparison (`pair_on: overall`)
    difference: float  # normalised rating of response_a minus response_b's, >= 0
    candidate_ids: tuple[str, str]  # of response_a, response_b


def rating_problem(ratings: pb.Ratings, task: Task) -> RatingProblem | None:
    """What is wrong with a ratings record of ``task``, or None when every entry names a
    candidate of the task and an aspect it declares a scale for, at most once, with a value on
    that scale."""
    if not ratings.entries:
        return RatingProblem("dropped/rating_empty", "ratings.entries", "holds no rating")
    scales = {s.aspect: s for s in task.rating_scales}
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(ratings.entries):
        problem = _entry_problem(i, entry, task, scales)
        if problem is not None:
            return problem
        key = (entry.candidate_id, entry.aspect)
        if key in seen:
            return RatingProblem("dropped/rating_repeated", f"ratings.entries[{i}]",
                                 f"rates {entry.candidate_id!r} on {entry.aspect!r} a second time")
        seen.add(key)
    return None


def _entry_problem(i: int, entry: pb.Ratings.Entry, task: Task, scales: Mapping[str, pb.RatingScale]) -> RatingProblem | None:
    where = f"ratings.entries[{i}]"
    if entry.candidate_id not in task.candidate_ids:
        return RatingProblem("dropped/rating_unknown_candidate", f"{where}.candidate_id",
                             f"unknown candidate {entry.candidate_id!r} for task {task.task_id!r}")
    scale = scales.get(entry.aspect)
    if scale is None:
        declared = ", ".join(sorted(scales)) or "none"
        return RatingProblem("dropped/rating_unknown_aspect", f"{where}.aspect",
                             f"task {task.task_id!r} has no scale for {entry.aspect!r} (declared: {declared})")
    if not (math.isfinite(scale.min) and math.isfinite(scale.max) and scale.min < scale.max):
        return RatingProblem("dropped/rating_bad_scale", f"{where}.aspect",
                             f"the scale of {entry.aspect!r} is [{scale.min}, {scale.max}]; it needs finite min < max")
    if not (math.isfinite(entry.value) and scale.min <= entry.value <= scale.max):
        return RatingProblem("dropped/rating_out_of_range", f"{where}.value",
                             f"{entry.value} is outside the scale [{scale.min}, {scale.max}] of {entry.aspect!r}")
    return None


def normalised_ratings(ratings: pb.Ratings, task: Task, confidence: float = 1.0, source: int = 0) -> list[Rating]:
    """The entries of a well-formed record (see :func:`rating_problem`) on [0, 1]."""
    scales = {s.aspect: s for s in task.rating_scales}
    out = []
    for entry in ratings.entries:
        scale = scales[entry.aspect]
        score = (entry.value - scale.min) / (scale.max - scale.min)
        out.append(Rating(entry.candidate_id, entry.aspect, score, confidence, source))
    return out


def merge_ratings(records: Iterable[Sequence[Rating]]) -> list[Rating]:
    """One annotator's ratings of one task from its records in order: a later value of a
    (candidate, aspect) replaces an earlier one."""
    merged: dict[tuple[str, str], Rating] = {}
    for ratings in records:
        for rating in ratings:
            merged.pop((rating.candidate_id, rating.aspect), None)  # re-insert: keeps the latest order
            merged[(rating.candidate_id, rating.aspect)] = rating
    return list(merged.values())


def rating_pairs(
    task: Task,
    ratings: Iterable[Rating],
    cfg: RatingPairsConfig,
    *,
    texts: Mapping[str, str] | None = None,
    annotator_id: str = "",
    weight: float = 1.0,
) -> list[RatingPair]:
    """The preference pairs one annotator's ratings of ``task`` make (see the module
    docstring), candidates in the task's order; ``texts`` maps candidate ids to the response
    texts the pairs hold (default: the candidates' texts), ``weight`` is shared by the pairs."""
    if weight < 0.0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    scores = _scores_by_candidate(task, ratings, cfg)
    if cfg.pair_on == "overall":
        groups = {None: _compared(scores, lambda a, b: _overall_difference(a, b, cfg), cfg)}
    else:
        aspects = sorted({aspect for by_aspect in scores.values() for aspect in by_aspect})
        groups = {aspect: _compared(scores, lambda a, b, x=aspect: _aspect_difference(a, b, x), cfg) for aspect in aspects}
    groups = {aspect: found for aspect, found in groups.items() if found}
    total = sum(1.0 if aspect is None else cfg.weight_of(aspect) for aspect in groups)
    texts = texts if texts is not None else {c.candidate_id: c.text for c in task.candidates}
    out = []
    for aspect, found in groups.items():
        share = weight * (1.0 if aspect is None else cfg.weight_of(aspect)) / total / len(found)
        out += [_pair(task, hi, lo, diff, aspect, share, texts, annotator_id, cfg) for hi, lo, diff in found]
    return out


def _scores_by_candidate(task: Task, ratings: Iterable[Rating], cfg: RatingPairsConfig) -> dict[str, dict[str, float]]:
    """Normalised scores by candidate (in the task's order) and aspect; aspects of weight 0 left out."""
    by_candidate: dict[str, dict[str, float]] = {}
    for rating in ratings:
        if cfg.weight_of(rating.aspect) > 0.0:
            by_candidate.setdefault(rating.candidate_id, {})[rating.aspect] = rating.score
    return {c.candidate_id: by_candidate[c.candidate_id] for c in task.candidates if c.candidate_id in by_candidate}


def _overall_difference(a: Mapping[str, float], b: Mapping[str, float], cfg: RatingPairsConfig) -> float | None:
    """a's rating minus b's on the overall aspect, else on the weighted mean of the aspects
    both carry; None when they share none."""
    overall = cfg.overall_aspect
    if overall is not None and overall in a and overall in b:
        return a[overall] - b[overall]
    common = [x for x in a if x in b and x != overall]
    if not common:
        return None
    total = sum(cfg.weight_of(x) for x in common)
    return sum(cfg.weight_of(x) * (a[x] - b[x]) for x in common) / total


def _aspect_difference(a: Mapping[str, float], b: Mapping[str, float], aspect: str) -> float | None:
    return a[aspect] - b[aspect] if aspect in a and aspect in b else None


def _compared(scores: Mapping[str, Mapping[str, float]], difference, cfg: RatingPairsConfig) -> list[tuple[str, str, float]]:
    """(better or first candidate, the other, difference >= 0) for each two candidates that
    make a pair: a difference over the margin, an equal rating, or one within the margin when
    it counts as a tie."""
    out = []
    for first, second in itertools.combinations(scores, 2):
        diff = difference(scores[first], scores[second])
        if diff is None:
            continue
        if abs(diff) <= cfg.margin and abs(diff) > _EQUAL and cfg.within_margin == "skip":
            continue
        out.append((first, second, diff) if diff >= 0 else (second, first, -diff))
    return out


def _pair(task: Task, hi: str, lo: str, diff: float, aspect: str | None, weight: float, texts: Mapping[str, str],
          annotator_id: str, cfg: RatingPairsConfig) -> RatingPair:
    preferred = diff > cfg.margin and diff > _EQUAL
    strength = min(1.0, diff) if preferred and cfg.strength_from_difference else None
    pair = PreferencePair(
        prompt=task.prompt,
        response_a=texts[hi],
        response_b=texts[lo],
        choice=Choice.A if preferred else Choice.TIE,
        strength=strength,
        annotator_id=annotator_id,
        weight=weight,
        prompt_id=task.prompt_id,
    )
    return RatingPair(pair=pair, aspect=aspect, difference=diff, candidate_ids=(hi, lo))
