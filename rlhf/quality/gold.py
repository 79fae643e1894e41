"""Gold tasks: a share of each round's tasks carries a known answer.

From a pool of gold pairs (a JSONL file of tasks, read by the caller), a gold pair is
republished under the id of the round task it replaces, its candidates in a seeded random
order, with the policy version of the replaced task's candidates and without metadata:
nothing in what annotators receive tells a gold task from the others. Without a pool, for
unattended runs with simulated annotators, a round task whose two policy answers the
noise-free rule separates by more than `simulated_gold_margin` becomes a gold task with the
rule's answer: the simulation's stand-in for an operator's gold set.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Callable, Sequence

from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.quality.config import AnnotatorQualityConfig
from rlhf.quality.judges import Judge
from rlhf.records import GoldAnswer, Task


class GoldFileError(ValueError):
    """A gold tasks file that cannot be used; the message names the file, line and field."""


def gold_count(rate: float, tasks: int) -> int:
    """Gold tasks among a round's tasks: rate × tasks, rounded, at least one when rate > 0."""
    if rate <= 0.0 or tasks == 0:
        return 0
    return min(tasks, max(1, round(rate * tasks)))


def check_gold_pool(tasks: Sequence[Task], where: str) -> list[Task]:
    """The gold pairs of a tasks file (read by the caller; `where` names it in errors): every
    task needs `gold` and exactly 2 candidates."""
    for number, task in enumerate(tasks, start=1):
        if task.gold is None:
            raise GoldFileError(f"{where}: task {number} ({task.task_id!r}): gold: required in a gold tasks file")
        if len(task.candidates) != 2:
            raise GoldFileError(f"{where}: task {number} ({task.task_id!r}): candidates: a gold pair needs exactly 2, got {len(task.candidates)}")
        if not task.gold.is_tie and task.gold.better not in task.candidate_ids:
            raise GoldFileError(f"{where}: task {number} ({task.task_id!r}): gold.better: unknown candidate {task.gold.better!r}")
    if not tasks:
        raise GoldFileError(f"{where}: no gold tasks")
    return list(tasks)


def gold_from_file(slot: Task, gold: Task, rng: random.Random, prompt_id: Callable[[str], str]) -> Task:
    """`gold` republished in place of the round task `slot`: the slot's ids, annotations wanted,
    policy version and metadata (the template version: nothing tells it from a round task), the
    gold pair's texts in a random order; the gold file's own metadata is not sent."""
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
        candidates=tuple(candidates), metadata=dict(slot.metadata), annotations_wanted=slot.annotations_wanted,
        gold=GoldAnswer(better),
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
