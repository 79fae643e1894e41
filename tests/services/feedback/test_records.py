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


def _variants():
    """Good and bad corrections and preferences around every limit the fast path checks."""

    def correction(**kw):
        return pb.FeedbackRecord(feedback_id="x", project="demo", task_id="t1", annotator_id="a",
                                 correction=pb.Correction(candidate_id="c1", corrected_text="better", **kw))

    texts = ["", " ", "\t\n", "a", "é" * 3, "\x00", "a\x00b", "x" * 8, "x" * 9, "é" * 4, "é" * 5, "😀" * 2, "😀" * 3, " x ", "y" * 40]
    numbers = [None, -1.0, -0.0, 0.0, 0.5, 1.0, 1.5, math.nan, math.inf, -math.inf]
    for base in (lambda: preference("f1"), correction):
        for name in ("feedback_id", "project", "task_id", "annotator_id", "prompt_id", "guidelines_version"):
            for text in texts:
                r = base()
                setattr(r, name, text)
                yield r
        for name in ("confidence", "lead_time_seconds"):
            for value in numbers:
                r = base()
                if value is not None:
                    setattr(r, name, value)
                yield r
        for key, value in [("k", "v"), ("k" * 9, "v"), ("é" * 3, "v"), ("k", "v" * 17), ("k", "é" * 5), ("k", "é" * 4), ("", "")]:
            r = base()
            r.metadata[key] = value
            yield r
        r = base()
        r.metadata.update({f"k{i}": "v" for i in range(5)})
        yield r
    for name in ("candidate_id", "corrected_text", "note"):
        for text in texts:
            r = correction()
            setattr(r.correction, name, text)
            yield r
    for name in ("candidate_a_id", "candidate_b_id"):
        for text in texts + ["c0", "c1"]:
            r = preference("f1")
            setattr(r.preference, name, text)
            yield r
    for choice in range(-1, 6):
        for strength in (None, 0.0, 0.5, 1.0, 2.0, math.nan):
            r = preference("f1", choice=choice)
            if strength is not None:
                r.preference.strength = strength
            yield r
    yield ranking([("c0", 1), ("c1", 2)])
    yield ratings(("c0", "helpfulness", 3))
    yield pb.FeedbackRecord(feedback_id="y", project="demo", task_id="t1", annotator_id="a", flag=pb.Flag(kind=pb.Flag.KIND_PII))
    yield pb.FeedbackRecord(feedback_id="z", project="demo", task_id="t1", annotator_id="a")


@pytest.mark.parametrize(
    "limits",
    [LIMITS, Limits(max_id_bytes=8, max_text_bytes=16, max_note_bytes=8, max_metadata_entries=4,
                    max_metadata_key_bytes=8, max_metadata_value_bytes=16)],
)
def test_the_fast_path_accepts_only_what_the_exact_checks_accept(limits):
    """check_record answers through plain_fields for common records; it must never pass a record
    that the full checks reject, with limits small enough that the size shortcuts are tested too."""
    from services.feedback.records import _check_record_exactly, plain_fields

    fast_passes = 0
    for record in _variants():
        exact = _check_record_exactly(record, limits)
        fields = plain_fields(record, limits, record.ByteSize())
        if fields is not None:
            fast_passes += 1
            assert exact is None, (record, exact)
            kind = record.WhichOneof("judgement")
            refs = (record.correction.candidate_id,) if kind == "correction" else (record.preference.candidate_a_id, record.preference.candidate_b_id)
            assert fields == (record.project, record.feedback_id, kind, record.task_id, record.annotator_id, record.prompt_id, refs)
        assert check_record(record, limits) == exact
    assert fast_passes > 20  # the fast path is taken for the common records


def test_common_records_take_the_fast_path():
    from services.feedback.records import plain_fields

    good = preference("f1", confidence=0.9, lead_time_seconds=12.0)
    good.metadata["notes"] = "n" * 1024
    assert plain_fields(good, LIMITS, good.ByteSize()) is not None


def test_wire_records_are_the_records_protobuf_parsed_from_the_request():
    """Every occurrence of the records field is one record, whatever lies between; each slice
    parses to its record; a message this does not walk gives None (the records are serialised
    then)."""
    from services.feedback.records import wire_records

    big = preference("big", confidence=0.5)
    big.metadata["notes"] = "n" * 300  # a record longer than 127 bytes: a two-byte length
    records = [preference("a"), big, correction("c", "x" * 20_000), preference("d")]
    request = pb.SubmitFeedbackRequest(records=records)
    data = request.SerializeToString()
    slices = wire_records(data, 1)
    assert [pb.FeedbackRecord.FromString(bytes(s)) for s in slices] == records
    batch = pb.FeedbackBatch(sequence=300, records=records).SerializeToString()
    assert [pb.FeedbackRecord.FromString(bytes(s)) for s in wire_records(batch, 2)] == records
    # other fields (known or not, of every wire type) between and around the records
    other = (
        b"\x08\xac\x02"  # field 1, varint 300
        + b"\x19" + bytes(8)  # field 3, fixed64
        + b"\x25" + bytes(4)  # field 4, fixed32
        + b"\x7a\x03abc"  # field 15, bytes
    )
    mixed = other + pb.FeedbackBatch(records=records[:2]).SerializeToString() + other + pb.FeedbackBatch(records=records[2:]).SerializeToString()
    parsed = pb.FeedbackBatch.FromString(mixed)
    assert list(parsed.records) == records
    assert [pb.FeedbackRecord.FromString(bytes(s)) for s in wire_records(mixed, 2)] == records
    assert wire_records(b"", 2) == []
    assert wire_records(b"\x12\x05ab", 2) is None  # truncated
    assert wire_records(b"\x0b\x0c", 2) is None  # a group


def correction(fid, text):
    return pb.FeedbackRecord(feedback_id=fid, project="demo", task_id="t1", annotator_id="a",
                             correction=pb.Correction(candidate_id="c0", corrected_text=text))
