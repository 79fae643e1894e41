"""Validation of single records and tasks (no server, no store)."""

import math

import pytest

from hitl.feedback.v1 import feedback_pb2 as pb
from services.feedback.records import Limits, check_against_task, check_record, check_task, content_hash
from tests.services.feedback.conftest import make_task, preference

LIMITS = Limits()


def rejected_field(record, task=None):
    r = check_record(record, LIMITS)
    if r is None and task is not None:
        r = check_against_task(record, task)
    return None if r is None else r.field


def test_good_preference_passes():
    assert rejected_field(preference("f1"), make_task()) is None


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: setattr(r, "feedback_id", ""), "feedback_id"),
        (lambda r: setattr(r, "feedback_id", "x" * 129), "feedback_id"),
        (lambda r: setattr(r, "project", " "), "project"),
        (lambda r: setattr(r, "annotator_id", ""), "annotator_id"),
        (lambda r: setattr(r, "task_id", ""), "task_id"),
        (lambda r: setattr(r, "confidence", 1.5), "confidence"),
        (lambda r: setattr(r, "confidence", math.nan), "confidence"),
        (lambda r: setattr(r, "lead_time_seconds", -1.0), "lead_time_seconds"),
        (lambda r: r.metadata.update({f"k{i}": "v" for i in range(65)}), "metadata"),
        (lambda r: r.metadata.update({"k": "v" * 4097}), "metadata[k]"),
        (lambda r: setattr(r.preference, "choice", pb.Preference.CHOICE_UNSPECIFIED), "preference.choice"),
        (lambda r: setattr(r.preference, "candidate_b_id", "c0"), "preference.candidate_b_id"),
        (lambda r: setattr(r.preference, "strength", 0.0), "preference.strength"),
        (lambda r: r.ClearField("preference"), "judgement"),
    ],
)
def test_stateless_rejections_name_the_field(mutate, field):
    record = preference("f1")
    mutate(record)
    assert rejected_field(record) == field


def test_strength_only_with_a_strict_choice():
    record = preference("f1", choice=pb.Preference.CHOICE_TIE)
    record.preference.strength = 0.5
    assert rejected_field(record) == "preference.strength"


def ranking(entries):
    return pb.FeedbackRecord(
        feedback_id="r", project="demo", task_id="t1", annotator_id="a",
        ranking=pb.Ranking(entries=[pb.Ranking.Entry(candidate_id=c, rank=k) for c, k in entries]),
    )


def test_rankings():
    task = make_task(n=3)
    assert rejected_field(ranking([("c0", 1), ("c1", 1), ("c2", 3)]), task) is None  # ties allowed
    assert rejected_field(ranking([("c0", 1), ("c0", 2), ("c2", 3)]), task) == "ranking.entries[1].candidate_id"
    assert rejected_field(ranking([("c0", 1), ("c1", 4), ("c2", 3)]), task) == "ranking.entries[1].rank"
    assert rejected_field(ranking([("c0", 1), ("c1", 2)]), task) == "ranking.entries"  # not every candidate
    assert rejected_field(ranking([("c0", 1), ("c9", 2), ("c2", 3)]), task) == "ranking.entries[1].candidate_id"


def ratings(*entries):
    return pb.FeedbackRecord(
        feedback_id="r", project="demo", task_id="t1", annotator_id="a",
        ratings=pb.Ratings(entries=[pb.Ratings.Entry(candidate_id=c, aspect=a, value=v) for c, a, v in entries]),
    )


def test_ratings_follow_the_declared_scales():
    task = make_task(scales=[("helpfulness", 1, 7), ("harmlessness", 0, 1)])
    assert rejected_field(ratings(("c0", "helpfulness", 7), ("c1", "harmlessness", 0.5)), task) is None
    assert rejected_field(ratings(("c0", "helpfulness", 8)), task) == "ratings.entries[0].value"
    assert rejected_field(ratings(("c0", "style", 3)), task) == "ratings.entries[0].aspect"
    assert rejected_field(ratings(("c0", "helpfulness", math.inf)), task) == "ratings.entries[0].value"
    assert rejected_field(ratings(("c0", "helpfulness", 3), ("c0", "helpfulness", 4)), task) == "ratings.entries[1]"
    assert rejected_field(ratings(), task) == "ratings.entries"


def test_corrections_and_flags():
    task = make_task()
    good = pb.FeedbackRecord(feedback_id="x", project="demo", task_id="t1", annotator_id="a",
                             correction=pb.Correction(candidate_id="c1", corrected_text="better"))
    assert rejected_field(good, task) is None
    good.correction.corrected_text = "   "
    assert rejected_field(good, task) == "correction.corrected_text"
    good.correction.corrected_text = "x" * (LIMITS.max_text_bytes + 1)
    assert rejected_field(good, task) == "correction.corrected_text"
    flag = pb.FeedbackRecord(feedback_id="y", project="demo", task_id="t1", annotator_id="a",
                             flag=pb.Flag(kind=pb.Flag.KIND_PII))
    assert rejected_field(flag, task) is None  # flags the prompt
    flag.flag.kind = pb.Flag.KIND_OTHER
    assert rejected_field(flag, task) == "flag.note"
    flag.flag.note = "odd"
    flag.flag.candidate_id = "c7"
    assert rejected_field(flag, task) == "flag.candidate_id"


def test_task_dependent_checks():
    record = preference("f1")
    assert check_against_task(record, None).field == "task_id"
    assert check_against_task(record, make_task(project="other")).field == "project"
    record.prompt_id = "nope"
    assert check_against_task(record, make_task()).field == "prompt_id"
    record.prompt_id = "p-t1"
    record.preference.candidate_a_id = "zz"
    assert check_against_task(record, make_task()).field == "preference.candidate_a_id"


def test_task_checks():
    assert check_task(make_task(), LIMITS) is None
    assert check_task(make_task(n=1), LIMITS).field == "candidates"
    assert check_task(make_task(wanted=0), LIMITS).field == "annotations_wanted"
    assert check_task(make_task(scales=[("a", 3, 1)]), LIMITS).field == "rating_scales[0]"


def test_content_hash_ignores_nothing_but_order_of_map_entries():
    a, b = preference("f1"), preference("f1")
    a.metadata.update({"x": "1", "y": "2"})
    b.metadata.update({"y": "2", "x": "1"})
    assert content_hash(a) == content_hash(b)
    b.metadata["x"] = "3"
    assert content_hash(a) != content_hash(b)
