"""Curation before training (rlhf/curation/rules.py, no Ray): one outcome per record, flags by
category and across rounds, guideline versions, duplicates within and across rounds,
corrections as demonstrations, and the config's errors."""

import pytest

from actors.config import RunConfig
from rlhf.curation.rules import curate
from rlhf.curation.config import CurationConfig, version_key
from rlhf.curation.memory import CurationMemory
from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.config import ConfigError, parse_config
from rlhf.preferences import Ranking
from services.feedback.records import StoredRecord, Task

LONG_A = ("The park is quiet in the early morning and the paths are still wet from the rain, "
          "so a short walk before work feels calm and slow and good for the mind.")
LONG_B = "Parks are nice. I like them a lot, especially the ducks on the pond near the gate."


def task(task_id: str, prompt: str, *texts: str) -> Task:
    cands = tuple(pb.Candidate(candidate_id=f"{task_id}-{i}", text=t) for i, t in enumerate(texts))
    return Task(task_id=task_id, project="p", prompt_id=f"pid-{prompt[:8]}", prompt=prompt, candidates=cands)


class Records:
    """Builds stored records in seq order."""

    def __init__(self) -> None:
        self.items: list[StoredRecord] = []

    def add(self, task_id: str, annotator: str = "ann", version: str = "", **judgement) -> None:
        r = pb.FeedbackRecord(feedback_id=f"f{len(self.items)}", project="p", task_id=task_id,
                              annotator_id=annotator, guidelines_version=version, **judgement)
        self.items.append(StoredRecord(seq=len(self.items) + 1, record=r, received_at=0.0))

    def prefer(self, task_id: str, annotator: str = "ann", version: str = "") -> None:
        self.add(task_id, annotator, version, preference=pb.Preference(
            candidate_a_id=f"{task_id}-0", candidate_b_id=f"{task_id}-1", choice=pb.Preference.CHOICE_A))

    def flag(self, task_id: str, kind: int, candidate: str = "") -> None:
        self.add(task_id, "mod", flag=pb.Flag(candidate_id=candidate, kind=kind, note="x"))

    def correct(self, task_id: str, text: str, annotator: str = "ann", candidate: int = 0) -> None:
        self.add(task_id, annotator, correction=pb.Correction(candidate_id=f"{task_id}-{candidate}", corrected_text=text))


def lookup(*tasks: Task):
    by_id = {t.task_id: t for t in tasks}
    return by_id.get


def test_every_record_gets_exactly_one_outcome_and_flags_count_by_category():
    tasks = [task(f"t{i}", f"Prompt number {i} about parks", LONG_A + f" {i}", LONG_B + f" {i}") for i in range(6)]
    rec = Records()
    rec.flag("t1", pb.Flag.KIND_HARMFUL, "t1-0")
    rec.flag("t2", pb.Flag.KIND_PII)  # the prompt
    rec.flag("t2", pb.Flag.KIND_SPAM, "t2-1")
    for i in range(6):
        rec.prefer(f"t{i}")
    rec.prefer("missing")
    rec.add("t3", ratings=pb.Ratings(entries=[pb.Ratings.Entry(candidate_id="t3-0", aspect="a", value=1)]))
    rec.correct("t4", "A better answer about parks.")
    rec.add("t5", "ranker", ranking=pb.Ranking(entries=[pb.Ranking.Entry(candidate_id="t5-0", rank=2),
                                                        pb.Ranking.Entry(candidate_id="t5-1", rank=1)]))
    rec.add("t5", ranking=pb.Ranking(entries=[pb.Ranking.Entry(candidate_id="t5-0", rank=2),
                                              pb.Ranking.Entry(candidate_id="t5-1", rank=1)]))
    out = curate(rec.items, lookup(*tasks))
    assert sum(out.counts.values()) == sum(out.outcomes.values()) == len(rec.items)
    assert out.counts["flag/harmful"] == 1 and out.counts["flag/pii"] == 1 and out.counts["flag/spam"] == 1
    assert out.counts["dropped/flagged_harmful"] == 1  # t1: a flagged candidate
    assert out.counts["dropped/flagged_pii"] == 1  # t2: the prompt's flag wins over the candidate's
    assert out.counts["used/preference"] == 4 and out.counts["used/ranking"] == 1
    assert out.counts["dropped/duplicate_exact"] == 1  # ann ranked the pair they had already judged
    assert out.counts["dropped/unknown_task"] == 1
    assert out.counts["dropped/rating_unknown_aspect"] == 1  # t3 declares no scale for "a"
    assert out.counts["not_used/correction"] == 1  # SFT off: no demonstrations
    assert out.received["preference"] == 7 and out.by_annotator["mod"] == 3 and out.used_by_annotator["ann"] == 4
    assert not out.demonstrations


def test_guidelines_older_than_the_minimum_are_set_aside():
    assert version_key("v2.1") == (2, 1) and version_key("2.1.0") == (2, 1) and version_key("draft") is None
    assert version_key("v2.10") > version_key("v2.9")
    tasks = [task(f"t{i}", f"Question {i}", f"answer one {i}", f"answer two {i}") for i in range(5)]
    rec = Records()
    for i, version in enumerate(["v1.9", "2.0", "v10", "", "draft"]):
        rec.prefer(f"t{i}", version=version)
    strict = curate(rec.items, lookup(*tasks), cfg=CurationConfig(min_guidelines_version="v2"))
    assert strict.counts == {"set_aside/old_guidelines": 1, "used/preference": 2, "set_aside/unversioned_guidelines": 2}
    lenient = curate(rec.items, lookup(*tasks), cfg=CurationConfig(min_guidelines_version="v2", keep_unversioned=True))
    assert lenient.counts == {"set_aside/old_guidelines": 1, "used/preference": 4}
    assert curate(rec.items, lookup(*tasks)).counts == {"used/preference": 5}  # no minimum: all used


def test_exact_and_near_duplicates_within_a_round():
    original = task("t0", "Tell me about the park.", LONG_A, LONG_B)
    reworded = task("t1", "tell me about the PARK", LONG_B.upper(), LONG_A + "!")  # same after normalising
    near = task("t2", "Tell me about the park.", LONG_A.replace("the mind", "the soul"), LONG_B)
    fresh = task("t3", "Tell me about the park.", LONG_A, "Something else entirely, about trains and stations.")
    rec = Records()
    for t in ("t0", "t1", "t2", "t3"):
        rec.prefer(t)
    rec.prefer("t0", annotator="other")  # another annotator's judgement of the same pair
    tasks = lookup(original, reworded, near, fresh)
    out = curate(rec.items, tasks)
    assert out.counts == {"used/preference": 3, "dropped/duplicate_exact": 1, "dropped/duplicate_near": 1}
    assert [i.annotator_id for i in out.items] == ["ann", "ann", "other"]
    pooled = curate(rec.items, tasks, cfg=CurationConfig(per_annotator=False))
    assert pooled.counts["used/preference"] == 2 and pooled.counts["dropped/duplicate_exact"] == 2
    off = curate(rec.items, tasks, cfg=CurationConfig(dedup=False))
    assert off.counts == {"used/preference": 5}


def test_identical_responses():
    same = task("t0", "Say hi.", "Hello there!", "hello there")
    ranked = task("t1", "Say hi.", "Hi.", "Good day to you.", "hi")
    rec = Records()
    rec.prefer("t0")
    rec.add("t1", ranking=pb.Ranking(entries=[pb.Ranking.Entry(candidate_id="t1-0", rank=3),
                                              pb.Ranking.Entry(candidate_id="t1-1", rank=2),
                                              pb.Ranking.Entry(candidate_id="t1-2", rank=1)]))
    out = curate(rec.items, lookup(same, ranked))
    assert out.counts == {"dropped/identical_responses": 1, "used/ranking": 1}
    (ranking,) = out.items
    assert isinstance(ranking, Ranking)
    assert ranking.responses == ("hi", "Good day to you.") and ranking.ranks == (1, 2)  # the best-ranked copy stays


def test_duplicates_and_flags_hold_across_rounds_through_the_checkpoint(tmp_path):
    cfg = CurationConfig()
    first = task("r0-t0", "Describe rain.", LONG_A, LONG_B)
    flagged = task("r0-t1", "Describe snow.", "Snow is cold.", "Snow is white and soft.")
    again = task("r1-t0", "Describe rain.", LONG_B, LONG_A)  # the same pair published again
    rec0 = Records()
    rec0.prefer("r0-t0")
    rec0.flag("r0-t1", pb.Flag.KIND_OTHER)
    memory = CurationMemory(cfg)
    out0 = curate(rec0.items, lookup(first, flagged, again), cfg=cfg, memory=memory, round_=0)
    assert out0.counts == {"used/preference": 1, "flag/other": 1}
    memory.save(tmp_path)

    restored = CurationMemory.load(tmp_path, cfg)
    rec1 = Records()
    rec1.prefer("r1-t0")
    rec1.prefer("r0-t1", annotator="late")  # a late judgement of the task flagged last round
    out1 = curate(rec1.items, lookup(first, flagged, again), cfg=cfg, memory=restored, round_=1)
    assert out1.counts == {"dropped/duplicate_seen": 1, "dropped/flagged_other": 1}
    # a memory saved with other signature settings is refused, naming the setting
    with pytest.raises(ValueError, match="num_perm: saved 64, now 128"):
        CurationMemory.load(tmp_path, CurationConfig(num_permutations=128))
    assert len(CurationMemory.load(tmp_path / "none", cfg).index) == 0  # an older checkpoint: empty


def test_corrections_become_demonstrations():
    t0 = task("t0", "Describe the sea.", "The sea is big.", "Water.")
    t1 = task("t1", "Describe a forest.", "Trees.", "A forest is green.")
    rec = Records()
    rec.correct("t0", "The sea is vast, blue and always moving.")
    rec.correct("t0", "the sea is vast blue and always moving", annotator="b")  # a duplicate demonstration
    rec.correct("t0", "The sea is big.", candidate=0)  # unchanged: no demonstration
    rec.flag("t1", pb.Flag.KIND_PII, "t1-1")
    rec.correct("t1", "A forest is green and full of birds.", candidate=1)  # of a flagged candidate
    rec.correct("t1", "Trees as far as the eye can see.", annotator="c")
    rec.correct("t1", "Tall trees, moss and quiet paths.", annotator="d")  # over the limit of 2
    out = curate(rec.items, lookup(t0, t1), max_demonstrations=2)
    assert out.counts == {"used/correction": 2, "dropped/duplicate_exact": 1, "dropped/unchanged_correction": 1,
                          "flag/pii": 1, "dropped/flagged_pii": 1, "not_used/correction_over_limit": 1}
    assert [(d.prompt, d.response, d.annotator_id) for d in out.demonstrations] == [
        ("Describe the sea.", "The sea is vast, blue and always moving.", "ann"),
        ("Describe a forest.", "Trees as far as the eye can see.", "c"),
    ]
    assert out.demonstrations[0].prompt_id == t0.prompt_id


@pytest.mark.parametrize(
    ("section", "field", "message"),
    [
        ({"curation": {"near_duplicate_threshold": 0}}, "curation.near_duplicate_threshold", "must be > 0.0"),
        ({"curation": {"min_guidelines_version": "latest"}}, "curation.min_guidelines_version", "must contain a version number"),
        ({"curation": {"dedupe": True}}, "curation.dedupe", "unknown key; expected one of: dedup,"),
        ({"sft": {"lr": -1}}, "sft.lr", "must be > 0.0"),
        ({"sft": {"epoch": 2}}, "sft.epoch", "unknown key; expected one of: enabled, lr, epochs"),
    ],
)
def test_config_errors_name_the_dotted_field(section, field, message):
    with pytest.raises(ConfigError) as err:
        parse_config(section, RunConfig)
    (issue,) = err.value.issues
    assert issue.field == field and message in issue.message


def test_an_empty_answer_shown_as_the_placeholder_trains_as_the_empty_text():
    from rlhf.quality.judges import NO_ANSWER, Judge, JudgeConfig

    empty = task("t0", "Say something about parks.", LONG_B, NO_ANSWER)
    rec = Records()
    rec.prefer("t0")  # the annotator preferred the real answer over the empty one
    out = curate(rec.items, lookup(empty), cfg=CurationConfig(), memory=CurationMemory(CurationConfig()))
    [pair] = out.items
    assert (pair.response_a, pair.response_b) == (LONG_B, "")  # what the policy wrote, not the placeholder
    assert Judge(JudgeConfig(rule="concise")).compare("", NO_ANSWER, LONG_B) == "b"  # an empty answer is never concise


def test_a_late_flag_reaches_the_items_of_earlier_rounds():
    from rlhf.curation.rules import FlaggedContent, without_flagged
    from rlhf.preferences import Choice, PreferencePair

    memory = CurationMemory(CurationConfig())
    t0 = task("t0", "Prompt about parks", LONG_A, LONG_B)
    t1 = task("t1", "Prompt about rivers", LONG_A + " rivers", LONG_B + " rivers")
    t2 = task("t2", "Prompt about hills", LONG_A + " hills", LONG_B + " hills", "A third answer about hills.")
    first = Records()
    first.prefer("t0")
    first.prefer("t1")
    first.add("t2", ranking=pb.Ranking(entries=[pb.Ranking.Entry(candidate_id="t2-0", rank=1),
                                                 pb.Ranking.Entry(candidate_id="t2-1", rank=2),
                                                 pb.Ranking.Entry(candidate_id="t2-2", rank=3)]))
    round0 = curate(first.items, lookup(t0, t1, t2), memory=memory, round_=0)
    assert len(round0.items) == 3 and round0.flagged == []

    later = Records()
    later.flag("t0", pb.Flag.KIND_PII)  # the prompt: every item on it goes
    later.flag("t2", pb.Flag.KIND_HARMFUL, "t2-1")  # one ranked response: the ranking loses it
    later.flag("nope", pb.Flag.KIND_SPAM, "nope-0")  # an unknown task points at nothing
    round1 = curate(later.items, lookup(t0, t1, t2), memory=memory, round_=1)
    assert round1.flagged == [FlaggedContent("Prompt about parks", None, "pii"),
                              FlaggedContent("Prompt about hills", LONG_B + " hills", "harmful")]

    kept, changed = without_flagged(round0.items, round1.flagged)
    assert changed == 2
    assert [item.prompt for item in kept] == ["Prompt about rivers", "Prompt about hills"]
    assert kept[0] == round0.items[1]
    assert kept[1].responses == (LONG_A + " hills", "A third answer about hills.") and kept[1].ranks == (1, 2)

    # a flagged response in a preference drops the pair; a ranking left with one response goes
    pair = PreferencePair(prompt="P", response_a="a", response_b="b", choice=Choice.A)
    short = Ranking(prompt="P", responses=("a", "c"), ranks=(1, 2))
    other = PreferencePair(prompt="Q", response_a="a", response_b="b", choice=Choice.B)
    kept, changed = without_flagged([pair, short, other], [FlaggedContent("P", "a", "spam")])
    assert kept == [other] and changed == 2
    assert without_flagged([pair, other], []) == ([pair, other], 0)


def test_a_later_judgement_of_the_same_annotator_replaces_the_earlier():
    tasks = [task(f"t{i}", f"Prompt number {i} about parks", LONG_A + f" {i}", LONG_B + f" {i}") for i in range(2)]
    rec = Records()
    for _ in range(3):
        rec.prefer("t0", "sybil")  # one vote, sent three times
    rec.prefer("t0", "ann")
    rec.prefer("t1", "ann")
    out = curate(rec.items, lookup(*tasks))
    assert out.counts["superseded/preference"] == 2 and sum(out.counts.values()) == len(rec.items)
    assert sorted(i.annotator_id for i in out.items) == ["ann", "ann", "sybil"]
    assert out.items[0].annotator_id == "sybil" and rec.items[2].seq == 3  # the one kept is the last sent


def test_flags_of_paused_or_weightless_annotators_remove_nothing():
    tasks = [task(f"t{i}", f"Prompt number {i} about parks", LONG_A + f" {i}", LONG_B + f" {i}") for i in range(2)]
    rec = Records()
    rec.flag("t0", pb.Flag.KIND_HARMFUL, "t0-0")  # by "mod"
    rec.prefer("t0")
    out = curate(rec.items, lookup(*tasks), paused={"mod"})
    assert out.counts["paused/flag"] == 1 and out.counts["used/preference"] == 1 and not out.flagged
    out = curate(rec.items, lookup(*tasks), weights={"mod": 0.0})
    assert out.counts["dropped/zero_weight"] == 1 and out.counts["used/preference"] == 1
    out = curate(rec.items, lookup(*tasks))  # a flag that counts still removes the item
    assert out.counts["dropped/flagged_harmful"] == 1
