"""The committer counts every record of a group once, by kind, result and reason."""

from hitl.feedback.v1 import feedback_pb2 as pb
from services.feedback.committer import GroupCommitter
from services.feedback.metrics import FeedbackMetrics
from services.feedback.records import Rejection
from services.feedback.store import Outcome, Status
from services.feedback.store.base import PreparedRow


def _counts(metrics: FeedbackMetrics) -> dict[tuple[str, str, str], float]:
    out = {}
    for metric in metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "hitl_feedback_records_total":
                out[(sample.labels["kind"], sample.labels["result"], sample.labels["reason"])] = sample.value
    return out


def test_a_group_is_counted_record_by_record():
    metrics = FeedbackMetrics.create()
    committer = GroupCommitter(store=None, writer=None, metrics=metrics)  # type: ignore[arg-type]
    pref = pb.FeedbackRecord(preference=pb.Preference(choice=pb.Preference.CHOICE_A))
    corr = pb.FeedbackRecord(correction=pb.Correction(corrected_text="x"))
    ratings = pb.FeedbackRecord(ratings=pb.Ratings())
    records = [pref] * 5 + [corr] * 3 + [pref, ratings, ratings, pb.FeedbackRecord()]
    outcomes = (
        [Outcome(Status.ACCEPTED, seq=i) for i in range(8)]
        + [Outcome(Status.DUPLICATE, seq=1)]
        + [
            Outcome(Status.REJECTED, rejection=Rejection("ratings.entries[3].value", "must be finite")),
            Outcome(Status.REJECTED, rejection=Rejection("ratings.entries[7].value", "must be finite")),
            Outcome(Status.REJECTED, rejection=Rejection("judgement", "exactly one must be set")),
        ]
    )
    committer._observe(records, outcomes, 0.01)
    committer._observe(records[:5], outcomes[:5], 0.01)
    assert _counts(metrics) == {
        ("preference", "accepted", ""): 10.0,
        ("correction", "accepted", ""): 3.0,
        ("preference", "duplicate", ""): 1.0,
        ("ratings", "rejected", "ratings.entries[].value"): 2.0,
        ("none", "rejected", "judgement"): 1.0,
    }


def test_an_all_accepted_group_is_counted_from_its_prepared_rows(tmp_path):
    """A group whose records were all accepted is tallied from the kinds in its prepared rows;
    the counts are those of the record-by-record tally."""
    from services.feedback.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    try:
        pref = pb.FeedbackRecord(feedback_id="p", project="demo", task_id="t1", annotator_id="a",
                                 preference=pb.Preference(candidate_a_id="c0", candidate_b_id="c1", choice=pb.Preference.CHOICE_A))
        corr = pb.FeedbackRecord(feedback_id="c", project="demo", task_id="t1", annotator_id="a",
                                 correction=pb.Correction(candidate_id="c0", corrected_text="x"))
        ranking = pb.FeedbackRecord(feedback_id="r", project="demo", task_id="t1", annotator_id="a",
                                    ranking=pb.Ranking(entries=[pb.Ranking.Entry(candidate_id="c0", rank=1), pb.Ranking.Entry(candidate_id="c1", rank=2)]))
        records = [pref] * 4 + [corr] * 2 + [ranking]
        prepared = store.prepare(records)
        assert all(type(item) is PreparedRow for item in prepared)
        outcomes = [Outcome(Status.ACCEPTED, seq=i) for i in range(len(records))]
        fast, slow = FeedbackMetrics.create(), FeedbackMetrics.create()
        GroupCommitter(store=None, writer=None, metrics=fast)._observe(records, outcomes, 0.01, prepared)  # type: ignore[arg-type]
        GroupCommitter(store=None, writer=None, metrics=slow)._observe(records, outcomes, 0.01)  # type: ignore[arg-type]
        assert _counts(fast) == _counts(slow) == {
            ("preference", "accepted", ""): 4.0,
            ("correction", "accepted", ""): 2.0,
            ("ranking", "accepted", ""): 1.0,
        }
        # with one outcome not accepted, the records are read (the fast path does not apply)
        mixed = outcomes[:-1] + [Outcome(Status.DUPLICATE, seq=1)]
        metrics = FeedbackMetrics.create()
        GroupCommitter(store=None, writer=None, metrics=metrics)._observe(records, mixed, 0.01, prepared)  # type: ignore[arg-type]
        assert _counts(metrics)[("ranking", "duplicate", "")] == 1.0
    finally:
        store.close()
