"""From stored feedback records to reward-model training data.

Curation here: records judging flagged content are set aside (a flag on a
candidate removes that candidate's pairs; a flag on the prompt removes the
task), preferences become `PreferencePair`s and rankings `Ranking`s with the
task's texts resolved, and each outcome is counted so a round can report what
it used and what it left out. Annotator quality (`actors/annotator_quality.py`)
comes in as two optional inputs: per-annotator weights that multiply each item's
weight, and a set of paused annotators whose judgements are set aside.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Collection, Iterable, Mapping

from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.preferences import Choice, PreferencePair, Ranking
from services.feedback.records import StoredRecord, Task

_CHOICES = {
    pb.Preference.CHOICE_A: Choice.A,
    pb.Preference.CHOICE_B: Choice.B,
    pb.Preference.CHOICE_TIE: Choice.TIE,
    pb.Preference.CHOICE_BOTH_BAD: Choice.BOTH_BAD,
}


@dataclass
class Curated:
    items: list[PreferencePair | Ranking] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # used/preference, dropped/flagged, ...
    first_seq: int = 0
    last_seq: int = 0


def curate(
    records: Iterable[StoredRecord],
    task_of: Callable[[str], Task | None],
    weights: Mapping[str, float] | None = None,
    paused: Collection[str] = (),
) -> Curated:
    """Training items from a watermark range of records (see the module docstring).

    `weights[annotator]` (absent: 1) multiplies the weight of that annotator's items; an item
    whose weight comes to 0 is dropped (`dropped/zero_weight`). Preferences and rankings of
    `paused` annotators are counted (`paused/<kind>`) and not used.
    """
    records = list(records)
    out = Curated()
    if records:
        out.first_seq, out.last_seq = records[0].seq, records[-1].seq
    flagged_tasks: set[str] = set()
    flagged_candidates: set[tuple[str, str]] = set()
    for s in records:
        if s.record.WhichOneof("judgement") == "flag":
            f = s.record.flag
            if f.candidate_id:
                flagged_candidates.add((s.record.task_id, f.candidate_id))
            else:
                flagged_tasks.add(s.record.task_id)
            out.counts["flag"] += 1
    for s in records:
        r = s.record
        kind = r.WhichOneof("judgement")
        if kind not in ("preference", "ranking"):
            if kind != "flag":
                out.counts[f"not_used/{kind}"] += 1
            continue
        if r.annotator_id in paused:
            out.counts[f"paused/{kind}"] += 1
            continue
        task = task_of(r.task_id)
        if task is None:
            out.counts["dropped/unknown_task"] += 1
            continue
        if r.task_id in flagged_tasks:
            out.counts["dropped/flagged"] += 1
            continue
        item = _item(r, task, flagged_candidates)
        if item is None:
            out.counts["dropped/flagged"] += 1
            continue
        if weights is not None and r.annotator_id in weights:
            item = replace(item, weight=item.weight * weights[r.annotator_id])
        if item.weight == 0.0:
            out.counts["dropped/zero_weight"] += 1
            continue
        out.items.append(item)
        out.counts[f"used/{kind}"] += 1
    return out


def _item(r: pb.FeedbackRecord, task: Task, flagged: set[tuple[str, str]]) -> PreferencePair | Ranking | None:
    text = {c.candidate_id: c.text for c in task.candidates}
    weight = r.confidence if r.HasField("confidence") and r.confidence > 0 else 1.0
    if r.WhichOneof("judgement") == "preference":
        p = r.preference
        if (r.task_id, p.candidate_a_id) in flagged or (r.task_id, p.candidate_b_id) in flagged:
            return None
        choice = _CHOICES[p.choice]
        return PreferencePair(
            prompt=task.prompt,
            response_a=text[p.candidate_a_id],
            response_b=text[p.candidate_b_id],
            choice=choice,
            strength=p.strength if p.HasField("strength") and choice in (Choice.A, Choice.B) else None,
            annotator_id=r.annotator_id,
            weight=weight,
            prompt_id=task.prompt_id,
        )
    entries = [e for e in r.ranking.entries if (r.task_id, e.candidate_id) not in flagged]
    if len(entries) < 2:
        return None
    ranks = sorted({e.rank for e in entries})
    dense = {rank: i + 1 for i, rank in enumerate(ranks)}  # re-rank after removals
    return Ranking(
        prompt=task.prompt,
        responses=tuple(text[e.candidate_id] for e in entries),
        ranks=tuple(dense[e.rank] for e in entries),
        annotator_id=r.annotator_id,
        weight=weight,
        prompt_id=task.prompt_id,
    )
