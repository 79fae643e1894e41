"""The committer counts every record of a group once, by kind, result and reason."""

from hitl.feedback.v1 import feedback_pb2 as pb
from services.feedback.committer import GroupCommitter
from services.feedback.metrics import FeedbackMetrics
from services.feedback.records import Rejection
from services.feedback.store import Outcome, Status


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
