"""From stored feedback records to reward-model training data.

Curation here: records judging flagged content are set aside (a flag on a
candidate removes that candidate's pairs; a flag on the prompt removes the
task), preferences become `PreferencePair`s and rankings `Ranking`s with the
task's texts resolved, and each outcome is counted so a round can report what
it used and what it left out. Annotator quality (`rlhf/quality/tracker.py`)
comes in as two optional inputs: per-annotator weights that multiply each item's
weight, and a set of paused annotators whose judgements are set aside.

With a `CurationConfig` and a `CurationMemory` (`rlhf/curation/memory.py`):
judgements under guidelines older than `min_guidelines_version` are set aside;
flags hold across rounds and are counted by category (`flag/harmful`, ...; an
item they remove counts as `dropped/flagged_<category>`); a preference between
duplicate responses is dropped and a ranking loses its repeated responses;
items that duplicate one kept earlier in the round, or used in an earlier round,
are dropped (`rlhf/curation/dedup.py`). Corrections become `Demonstration`s for the SFT
step when `max_demonstrations` > 0. Ratings become preference pairs
(`rlhf/curation/ratings.py`, settings in `CurationConfig.ratings`): one annotator's ratings
records of a task are merged (a later value of a candidate and aspect replaces an earlier
one) and paired at the position of the last of them; a malformed record (an unknown
candidate, an aspect the task has no scale for, a value off its scale) is dropped with the
reason (`dropped/rating_unknown_aspect`, ...; the details in `Curated.problems`).

Every record gets exactly one outcome in `counts` (the keys `<outcome>/<kind or reason>`);
`counts["pairs_from_ratings"]`, present when ratings were used, counts the pairs they made.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Collection, Iterable, Mapping

from rlhf.curation.config import CurationConfig
from rlhf.curation.memory import FLAG_KINDS, CurationMemory
from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.curation.dedup import Fingerprint, normalise
from rlhf.curation.ratings import Rating, merge_ratings, normalised_ratings, rating_pairs, rating_problem
from rlhf.quality.judges import answer_text
from rlhf.preferences import Choice, PreferencePair, Ranking
from rlhf.sft.data import Demonstration
from rlhf.records import StoredRecord, Task

_CHOICES = {
    pb.Preference.CHOICE_A: Choice.A,
    pb.Preference.CHOICE_B: Choice.B,
    pb.Preference.CHOICE_TIE: Choice.TIE,
    pb.Preference.CHOICE_BOTH_BAD: Choice.BOTH_BAD,
}


@dataclass(frozen=True)
class FlaggedContent:
    """What a flag points at, as text: a prompt (``response`` None: every item on the prompt)
    or one response to it, as the reward model's items hold them."""

    prompt: str
    response: str | None
    category: str  # harmful, pii, spam, other


@dataclass
class Curated:
    items: list[PreferencePair | Ranking] = field(default_factory=list)
    demonstrations: list[Demonstration] = field(default_factory=list)  # from corrections, for SFT
    counts: Counter = field(default_factory=Counter)  # one outcome per record: used/preference, dropped/flagged_pii, ...
    received: Counter = field(default_factory=Counter)  # records by kind
    by_annotator: Counter = field(default_factory=Counter)  # records by annotator
    used_by_annotator: Counter = field(default_factory=Counter)  # items and demonstrations used, by annotator
    flagged: list[FlaggedContent] = field(default_factory=list)  # this round's flags, resolved to texts
    problems: list[str] = field(default_factory=list)  # what is wrong with each malformed record: "<feedback_id>: <field>: <reason>"
    first_seq: int = 0
    last_seq: int = 0

    @property
    def outcomes(self) -> Counter:
        """`counts` less the derived counts (`pairs_from_ratings`): one outcome per record."""
        return Counter({key: n for key, n in self.counts.items() if "/" in key})


def curate(
    records: Iterable[StoredRecord],
    task_of: Callable[[str], Task | None],
    weights: Mapping[str, float] | None = None,
    paused: Collection[str] = (),
    *,
    cfg: CurationConfig | None = None,
    memory: CurationMemory | None = None,
    round_: int = 0,
    max_demonstrations: int = 0,
) -> Curated:
    """Training items from a watermark range of records (see the module docstring).

    `weights[annotator]` (absent: 1) multiplies the weight of that annotator's items; an item
    whose weight comes to 0 is dropped (`dropped/zero_weight`). Preferences and rankings of
    `paused` annotators are counted (`paused/<kind>`) and not used; neither are their flags, nor
    the flags of an annotator whose weight is 0. A preference or ranking followed (in
    `records`) by another of the same annotator on the same task is replaced by it
    (`superseded/<kind>`): one vote per annotator and task.

    `memory` carries flags and used items across rounds (updated in place; a fresh one when
    None); `round_` tags what this round uses. Up to `max_demonstrations` corrections become
    demonstrations (0: corrections are `not_used/correction`).
    """
    records = list(records)
    cfg = cfg or CurationConfig()
    memory = memory if memory is not None else CurationMemory(cfg)
    out = Curated()
    if records:
        out.first_seq, out.last_seq = records[0].seq, records[-1].seq
    # a later preference or ranking of the same annotator on the same task is an edit: it replaces the earlier
    last = {(s.record.task_id, s.record.annotator_id, s.record.WhichOneof("judgement")): i for i, s in enumerate(records)}
    for s in records:
        out.received[s.record.WhichOneof("judgement")] += 1
        out.by_annotator[s.record.annotator_id] += 1
        if s.record.WhichOneof("judgement") == "flag":
            if s.record.annotator_id in paused:  # a paused annotator's flag removes nothing
                out.counts["paused/flag"] += 1
                continue
            if weights is not None and weights.get(s.record.annotator_id, 1.0) == 0.0:  # nor does a weightless one's
                out.counts["dropped/zero_weight"] += 1
                continue
            category = memory.add_flag(s.record.flag, s.record.task_id)
            out.counts[f"flag/{category}"] += 1
            content = _flagged_content(s.record, task_of(s.record.task_id), category)
            if content is not None:
                out.flagged.append(content)
    groups = _ratings_groups(records, task_of, paused, cfg, out) if cfg.ratings.enabled else {}
    for i, s in enumerate(records):
        r = s.record
        kind = r.WhichOneof("judgement")
        if kind == "ratings" and cfg.ratings.enabled:
            if i in groups:  # the group's last record: the annotator's ratings of the task are complete
                _curate_ratings(groups[i], weights, cfg, memory, round_, out)
            continue
        if kind in ("preference", "ranking") and last[(r.task_id, r.annotator_id, kind)] != i:
            out.counts[f"superseded/{kind}"] += 1
            continue
        if kind == "correction" and max_demonstrations > 0:
            _use(out, r, _curate_correction(r, task_of, weights, paused, cfg, memory, round_, max_demonstrations, out))
            continue
        if kind not in ("preference", "ranking"):
            if kind != "flag":
                out.counts[f"not_used/{kind}"] += 1
            continue
        if r.annotator_id in paused:
            out.counts[f"paused/{kind}"] += 1
            continue
        reason = cfg.set_aside_reason(r.guidelines_version)
        if reason:
            out.counts[reason] += 1
            continue
        task = task_of(r.task_id)
        if task is None:
            out.counts["dropped/unknown_task"] += 1
            continue
        item, reason = _item(r, task, memory)
        if item is None:
            out.counts[reason] += 1
            continue
        item, fp = _without_repeats(item, memory, cfg)
        if item is None:
            out.counts["dropped/identical_responses"] += 1
            continue
        if weights is not None and r.annotator_id in weights:
            item = replace(item, weight=item.weight * weights[r.annotator_id])
        if item.weight == 0.0:
            out.counts["dropped/zero_weight"] += 1
            continue
        reason = memory.admit(fp, round_)
        if reason:
            out.counts[reason] += 1
            continue
        out.items.append(item)
        _use(out, r, None)
    return out


def _flagged_content(r: pb.FeedbackRecord, task: Task | None, category: str) -> FlaggedContent | None:
    """The texts a flag record points at (None when its task or candidate is unknown)."""
    if task is None:
        return None
    if not r.flag.candidate_id:
        return FlaggedContent(task.prompt, None, category)
    text = next((c.text for c in task.candidates if c.candidate_id == r.flag.candidate_id), None)
    return None if text is None else FlaggedContent(task.prompt, answer_text(text), category)


def without_flagged(
    items: Iterable[PreferencePair | Ranking], flagged: Iterable[FlaggedContent]
) -> tuple[list[PreferencePair | Ranking], int]:
    """``items`` less what a flag of a later round reaches, and how many items changed.

    Curation keeps flagged content out of the round it arrives in; a flag that comes after its
    content was used reaches the reward model's earlier items through this: an item on a
    flagged prompt is dropped, a preference with a flagged response is dropped, and a ranking
    loses the flagged response (re-ranked densely; dropped below 2 responses), as curation does
    for a ranking in its own round. Texts are compared as the items hold them, so the same
    flagged text is left out wherever it was judged."""
    prompts = {f.prompt for f in flagged if f.response is None}
    responses = {(f.prompt, f.response) for f in flagged if f.response is not None}
    kept: list[PreferencePair | Ranking] = []
    changed = 0
    for item in items:
        if item.prompt in prompts:
            changed += 1
            continue
        if isinstance(item, PreferencePair):
            if (item.prompt, item.response_a) in responses or (item.prompt, item.response_b) in responses:
                changed += 1
                continue
            kept.append(item)
            continue
        keep = [i for i, text in enumerate(item.responses) if (item.prompt, text) not in responses]
        if len(keep) == len(item.responses):
            kept.append(item)
            continue
        changed += 1
        if len(keep) >= 2:
            kept.append(_keep_responses(item, keep))
    return kept, changed


@dataclass
class _RatingsGroup:
    """One annotator's well-formed ratings records of one task in a round, in order."""

    task: Task
    annotator_id: str
    records: list[pb.FeedbackRecord] = field(default_factory=list)
    ratings: list[list[Rating]] = field(default_factory=list)  # normalised, per record


def _ratings_groups(records: list[StoredRecord], task_of: Callable[[str], Task | None], paused: Collection[str],
                    cfg: CurationConfig, out: Curated) -> dict[int, _RatingsGroup]:
    """The round's ratings records that can be paired, grouped by (task, annotator) and keyed by
    the index of each group's last record; the others are counted here with their reason."""
    groups: dict[tuple[str, str], _RatingsGroup] = {}
    last: dict[tuple[str, str], int] = {}
    for i, s in enumerate(records):
        r = s.record
        if r.WhichOneof("judgement") != "ratings":
            continue
        task, reason = _ratings_task(r, task_of, paused, cfg, out)
        if task is None:
            out.counts[reason] += 1
            continue
        key = (r.task_id, r.annotator_id)
        group = groups.setdefault(key, _RatingsGroup(task, r.annotator_id))
        group.ratings.append(normalised_ratings(r.ratings, task, _confidence(r), source=len(group.records)))
        group.records.append(r)
        last[key] = i
    return {last[key]: group for key, group in groups.items()}


def _ratings_task(r: pb.FeedbackRecord, task_of: Callable[[str], Task | None], paused: Collection[str],
                  cfg: CurationConfig, out: Curated) -> tuple[Task | None, str]:
    """The task of a ratings record that can be paired, or (None, the record's outcome); a
    malformed record's details go to `out.problems`."""
    if r.annotator_id in paused:
        return None, "paused/ratings"
    reason = cfg.set_aside_reason(r.guidelines_version)
    if reason:
        return None, reason
    task = task_of(r.task_id)
    if task is None:
        return None, "dropped/unknown_task"
    problem = rating_problem(r.ratings, task)
    if problem is not None:
        out.problems.append(f"{r.feedback_id or r.task_id}: {problem}")
        return None, problem.outcome
    return task, ""


def _curate_ratings(group: _RatingsGroup, weights: Mapping[str, float] | None, cfg: CurationConfig,
                    memory: CurationMemory, round_: int, out: Curated) -> None:
    """Pair one annotator's ratings of a task; each of its records counts `used/ratings` when a
    pair was kept, else the reason none was; a record whose every value a later one replaced
    counts `superseded/ratings`."""
    merged = merge_ratings(group.ratings)
    sources = {rating.source for rating in merged}
    kept, reason = _rating_items(group, merged, weights, cfg, memory, round_)
    out.items.extend(kept)
    for n, r in enumerate(group.records):
        if n not in sources:
            out.counts["superseded/ratings"] += 1
        else:
            _use(out, r, None if kept else reason)
    if kept:
        out.counts["pairs_from_ratings"] += len(kept)


def _rating_items(group: _RatingsGroup, merged: list[Rating], weights: Mapping[str, float] | None,
                  cfg: CurationConfig, memory: CurationMemory, round_: int) -> tuple[list[PreferencePair], str]:
    """The pairs of a group's merged ratings that survive flags, weights and duplicates, and
    (when none does) why."""
    task = group.task
    flag = memory.flag_on(task.task_id)
    if flag:
        return [], f"dropped/flagged_{flag}"
    rated = {rating.candidate_id for rating in merged}
    flags = {c: memory.flag_on(task.task_id, [c]) for c in rated}
    merged = [rating for rating in merged if flags[rating.candidate_id] is None]
    confidences = {rating.source: rating.confidence for rating in merged}  # of the records still in play
    weight = sum(confidences.values()) / len(confidences) if confidences else 1.0
    weight *= weights.get(group.annotator_id, 1.0) if weights is not None else 1.0
    if weight == 0.0:
        return [], "dropped/zero_weight"
    texts = {c.candidate_id: answer_text(c.text) for c in task.candidates}
    made = rating_pairs(task, merged, cfg.ratings, texts=texts, annotator_id=group.annotator_id, weight=weight)
    if not made:
        flagged = [f for f in flags.values() if f]
        return [], (f"dropped/flagged_{min(flagged, key=_severity)}" if flagged else "dropped/ratings_no_pairs")
    kept, reasons = [], []
    for made_pair in made:
        reason = _admit_rating_pair(made_pair.pair, made_pair.aspect, memory, cfg, round_)
        if reason:
            reasons.append(reason)
        else:
            kept.append(made_pair.pair)
    return kept, (reasons[0] if reasons else "")


def _admit_rating_pair(pair: PreferencePair, aspect: str | None, memory: CurationMemory, cfg: CurationConfig,
                       round_: int) -> str | None:
    """None when the pair is kept (and remembered as used), else why not. An overall pair is a
    judgement of its two responses like a preference of them; an aspect's pair is judged on
    that aspect only, so it duplicates only pairs of the same aspect."""
    scope = memory.judgement_scope(pair.annotator_id) + ("" if aspect is None else f"|aspect:{aspect}")
    fp = memory.fingerprint(scope, pair.prompt, [pair.response_a, pair.response_b])
    if cfg.drop_identical_responses and memory.repeated_responses(fp):
        return "dropped/identical_responses"
    return memory.admit(fp, round_)


def _severity(category: str) -> int:
    return list(FLAG_KINDS.values()).index(category)


def _use(out: Curated, r: pb.FeedbackRecord, reason: str | None) -> None:
    """Count a record used (reason None) or left out."""
    if reason:
        out.counts[reason] += 1
        return
    out.counts[f"used/{r.WhichOneof('judgement')}"] += 1
    out.used_by_annotator[r.annotator_id] += 1


def _curate_correction(
    r: pb.FeedbackRecord, task_of: Callable[[str], Task | None], weights: Mapping[str, float] | None,
    paused: Collection[str], cfg: CurationConfig, memory: CurationMemory, round_: int, limit: int, out: Curated,
) -> str | None:
    """Append the correction's demonstration to `out`, or say why it is left out. A correction
    of a flagged candidate or prompt is left out (its text may carry what was flagged), as is
    one that leaves the candidate unchanged."""
    if r.annotator_id in paused:
        return "paused/correction"
    reason = cfg.set_aside_reason(r.guidelines_version)
    if reason:
        return reason
    task = task_of(r.task_id)
    if task is None:
        return "dropped/unknown_task"
    c = r.correction
    flag = memory.flag_on(r.task_id, [c.candidate_id])
    if flag:
        return f"dropped/flagged_{flag}"
    original = next((x.text for x in task.candidates if x.candidate_id == c.candidate_id), "")
    if normalise(c.corrected_text) == normalise(original):
        return "dropped/unchanged_correction"
    weight = _confidence(r) * (weights.get(r.annotator_id, 1.0) if weights is not None else 1.0)
    if weight == 0.0:
        return "dropped/zero_weight"
    if len(out.demonstrations) >= limit:
        return "not_used/correction_over_limit"
    reason = memory.admit(memory.fingerprint("demonstration", task.prompt, [c.corrected_text]), round_)
    if reason:
        return reason
    out.demonstrations.append(Demonstration(prompt=task.prompt, response=c.corrected_text, prompt_id=task.prompt_id,
                                            annotator_id=r.annotator_id, weight=weight))
    return None


def _confidence(r: pb.FeedbackRecord) -> float:
    return r.confidence if r.HasField("confidence") and r.confidence > 0 else 1.0


def _responses(item: PreferencePair | Ranking) -> list[str]:
    return [item.response_a, item.response_b] if isinstance(item, PreferencePair) else list(item.responses)


def _without_repeats(item: PreferencePair | Ranking, memory: CurationMemory, cfg: CurationConfig):
    """(item, its fingerprint) with repeated responses handled: a preference between
    duplicates is dropped (None); a ranking keeps the best-ranked copy of each response, and is
    dropped when fewer than 2 responses remain."""
    fp = _fingerprint(item, memory)
    repeats = memory.repeated_responses(fp) if cfg.drop_identical_responses else []
    if not repeats:
        return item, fp
    if isinstance(item, PreferencePair):
        return None, fp
    # ranking: drop every copy ranked lower than (or level with, after) its best-ranked twin
    order = sorted(range(len(item.responses)), key=lambda i: item.ranks[i])
    ranked = replace(item, responses=tuple(item.responses[i] for i in order), ranks=tuple(item.ranks[i] for i in order))
    repeats = set(memory.repeated_responses(_fingerprint(ranked, memory)))
    keep = [i for i in range(len(ranked.responses)) if i not in repeats]
    if len(keep) < 2:
        return None, fp
    kept = _keep_responses(ranked, keep)
    return kept, _fingerprint(kept, memory)


def _keep_responses(item: Ranking, keep: list[int]) -> Ranking:
    """The ranking of the responses at ``keep`` only, re-ranked densely (ties stay ties)."""
    dense = {rank: n + 1 for n, rank in enumerate(sorted({item.ranks[i] for i in keep}))}
    return replace(item, responses=tuple(item.responses[i] for i in keep), ranks=tuple(dense[item.ranks[i]] for i in keep))


def _fingerprint(item: PreferencePair | Ranking, memory: CurationMemory) -> Fingerprint:
    return memory.fingerprint(memory.judgement_scope(item.annotator_id), item.prompt, _responses(item))


def _item(r: pb.FeedbackRecord, task: Task, memory: CurationMemory) -> tuple[PreferencePair | Ranking | None, str]:
    """The record's item with the task's texts, or (None, why it is dropped)."""
    text = {c.candidate_id: answer_text(c.text) for c in task.candidates}  # what the policy wrote
    weight = _confidence(r)
    prompt_flag = memory.flag_on(r.task_id)
    if prompt_flag:
        return None, f"dropped/flagged_{prompt_flag}"
    if r.WhichOneof("judgement") == "preference":
        p = r.preference
        flag = memory.flag_on(r.task_id, [p.candidate_a_id, p.candidate_b_id])
        if flag:
            return None, f"dropped/flagged_{flag}"
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
        ), ""
    entries = [e for e in r.ranking.entries if memory.flag_on(r.task_id, [e.candidate_id]) is None]
    if len(entries) < 2:
        return None, f"dropped/flagged_{memory.flag_on(r.task_id, [e.candidate_id for e in r.ranking.entries])}"
    ranks = sorted({e.rank for e in entries})
    dense = {rank: i + 1 for i, rank in enumerate(ranks)}  # re-rank after removals
    return Ranking(
        prompt=task.prompt,
        responses=tuple(text[e.candidate_id] for e in entries),
        ranks=tuple(dense[e.rank] for e in entries),
        annotator_id=r.annotator_id,
        weight=weight,
        prompt_id=task.prompt_id,
    ), ""
