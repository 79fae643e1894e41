"""Ratings as training data (rlhf/curation/ratings.py and its use in rules.curate, no Ray):
pairs by overall aspect or weighted mean or per aspect, scales, margins, ties, weights,
malformed records with their reasons, and how curation counts ratings records."""

from __future__ import annotations

import math

import pytest

from actors.config import RunConfig
from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.config import ConfigError, parse_config
from rlhf.curation.config import CurationConfig, RatingPairsConfig
from rlhf.curation.memory import CurationMemory
from rlhf.curation.ratings import merge_ratings, normalised_ratings, rating_pairs, rating_problem
from rlhf.curation.rules import curate
from rlhf.preferences import Choice, PreferencePair
from rlhf.records import StoredRecord, Task

SCALES = (pb.RatingScale(aspect="overall", min=1, max=7), pb.RatingScale(aspect="helpfulness", min=1, max=5),
          pb.RatingScale(aspect="honesty", min=0, max=100))


def task(task_id: str = "t", n: int = 2, prompt: str = "How do I boil an egg?") -> Task:
    cands = tuple(pb.Candidate(candidate_id=f"{task_id}-{i}", text=f"answer {i} to {prompt} ({task_id})") for i in range(n))
    return Task(task_id=task_id, project="p", prompt_id=f"pid-{task_id}", prompt=prompt, candidates=cands, rating_scales=SCALES)


def ratings(task_id: str, values: dict[int, dict[str, float]]) -> pb.Ratings:
    """{candidate index: {aspect: value}} as a Ratings message."""
    return pb.Ratings(entries=[pb.Ratings.Entry(candidate_id=f"{task_id}-{i}", aspect=aspect, value=value)
                               for i, by_aspect in values.items() for aspect, value in by_aspect.items()])


def pairs(values: dict[int, dict[str, float]], cfg: RatingPairsConfig = RatingPairsConfig(), n: int = 2, weight: float = 1.0):
    t = task(n=n)
    return rating_pairs(t, normalised_ratings(ratings("t", values), t), cfg, weight=weight)


def texts(made) -> list[tuple[str, str, Choice]]:
    return [(p.candidate_ids[0], p.candidate_ids[1], p.pair.choice) for p in made]


# -- pairing ----------------------------------------------------------------------------


def test_the_overall_aspect_decides_and_the_higher_rated_answer_is_a():
    made = pairs({0: {"overall": 2, "helpfulness": 5}, 1: {"overall": 6, "helpfulness": 1}})
    assert texts(made) == [("t-1", "t-0", Choice.A)]  # overall wins over helpfulness
    (p,) = made
    assert p.aspect is None and p.difference == pytest.approx(4 / 6)
    assert p.pair.response_a.startswith("answer 1") and p.pair.strength is None and p.pair.weight == 1.0
    assert p.pair.prompt_id == "pid-t"


def test_without_an_overall_rating_the_weighted_mean_of_normalised_aspects_decides():
    # helpfulness: 0 better by 0.5 (of a 1..5 scale); honesty: 1 better by 0.6 (of 0..100)
    values = {0: {"helpfulness": 4, "honesty": 20}, 1: {"helpfulness": 2, "honesty": 80}}
    assert texts(pairs(values)) == [("t-1", "t-0", Choice.A)]  # mean: (-0.5 + 0.6) / 2 = 0.05 for t-1
    assert pairs(values)[0].difference == pytest.approx(0.05)
    heavy = RatingPairsConfig(aspect_weights={"helpfulness": 3.0})
    assert texts(pairs(values, heavy)) == [("t-0", "t-1", Choice.A)]  # (3 * 0.5 - 0.6) / 4 = 0.225 for t-0
    assert pairs(values, heavy)[0].difference == pytest.approx(0.225)
    # an overall rating of only one of the two is not a comparison: the mean decides
    assert texts(pairs({0: {**values[0], "overall": 7}, 1: values[1]})) == [("t-1", "t-0", Choice.A)]
    # no overall aspect configured: the overall rating is one aspect of the mean
    plain = RatingPairsConfig(overall_aspect=None)
    assert pairs({0: {"overall": 7, "helpfulness": 1}, 1: {"overall": 1, "helpfulness": 2}}, plain)[0].difference \
        == pytest.approx((1.0 - 0.25) / 2)


def test_an_aspect_of_weight_zero_takes_no_part():
    values = {0: {"overall": 7, "helpfulness": 1}, 1: {"overall": 1, "helpfulness": 5}}
    assert texts(pairs(values)) == [("t-0", "t-1", Choice.A)]
    no_overall = RatingPairsConfig(aspect_weights={"overall": 0.0})
    assert texts(pairs(values, no_overall)) == [("t-1", "t-0", Choice.A)]  # helpfulness decides
    only_overall = RatingPairsConfig(aspect_weights={"overall": 0.0})
    assert texts(pairs({0: {"overall": 7}, 1: {"overall": 1}}, only_overall)) == []  # nothing left to compare


def test_equal_ratings_are_ties_and_the_margin_skips_or_ties_close_ones():
    assert texts(pairs({0: {"overall": 4}, 1: {"overall": 4}})) == [("t-0", "t-1", Choice.TIE)]
    close = {0: {"overall": 4}, 1: {"overall": 5}}  # 1/6 apart
    assert texts(pairs(close)) == [("t-1", "t-0", Choice.A)]  # margin 0: any difference
    assert texts(pairs(close, RatingPairsConfig(margin=0.2))) == []
    assert texts(pairs(close, RatingPairsConfig(margin=0.2, within_margin="tie"))) == [("t-1", "t-0", Choice.TIE)]
    assert texts(pairs({0: {"overall": 4}, 1: {"overall": 6}}, RatingPairsConfig(margin=0.2))) == [("t-1", "t-0", Choice.A)]
    # exactly at the margin is not more than it
    assert texts(pairs({0: {"overall": 1}, 1: {"overall": 4}}, RatingPairsConfig(margin=0.5))) == []


def test_strength_from_the_normalised_difference():
    cfg = RatingPairsConfig(strength_from_difference=True)
    assert pairs({0: {"overall": 1}, 1: {"overall": 7}}, cfg)[0].pair.strength == pytest.approx(1.0)
    assert pairs({0: {"overall": 3}, 1: {"overall": 1}}, cfg)[0].pair.strength == pytest.approx(1 / 3)
    assert pairs({0: {"overall": 3}, 1: {"overall": 3}}, cfg)[0].pair.strength is None  # a tie has none


def test_a_rated_task_counts_as_one_judgement_shared_by_its_pairs():
    values = {0: {"overall": 7}, 1: {"overall": 4}, 2: {"overall": 1}}
    made = pairs(values, n=3, weight=0.6)
    assert texts(made) == [("t-0", "t-1", Choice.A), ("t-0", "t-2", Choice.A), ("t-1", "t-2", Choice.A)]
    assert [p.pair.weight for p in made] == pytest.approx([0.2, 0.2, 0.2])
    with pytest.raises(ValueError, match="weight must be >= 0"):
        pairs(values, n=3, weight=-1.0)


def test_each_aspect_makes_its_own_pairs_weighted_by_the_aspect_weights():
    cfg = RatingPairsConfig(pair_on="each_aspect", aspect_weights={"helpfulness": 3.0, "honesty": 1.0, "overall": 0.0})
    values = {0: {"overall": 7, "helpfulness": 5, "honesty": 10}, 1: {"overall": 1, "helpfulness": 1, "honesty": 90},
              2: {"helpfulness": 3}}
    made = pairs(values, cfg, n=3)
    by_aspect = {(p.aspect, *p.candidate_ids): p for p in made}
    assert set(by_aspect) == {("helpfulness", "t-0", "t-1"), ("helpfulness", "t-0", "t-2"), ("helpfulness", "t-2", "t-1"),
                              ("honesty", "t-1", "t-0")}
    assert all(p.pair.choice is Choice.A for p in made)
    # helpfulness gets 3/4 of the weight over its 3 pairs; honesty 1/4 over its 1
    assert by_aspect[("helpfulness", "t-0", "t-1")].pair.weight == pytest.approx(0.25)
    assert by_aspect[("honesty", "t-1", "t-0")].pair.weight == pytest.approx(0.25)
    assert sum(p.pair.weight for p in made) == pytest.approx(1.0)


def test_a_later_value_replaces_an_earlier_one_when_records_merge():
    t = task()
    first = normalised_ratings(ratings("t", {0: {"overall": 7}, 1: {"overall": 1}}), t, source=0)
    second = normalised_ratings(ratings("t", {0: {"overall": 1}}), t, source=1)
    merged = merge_ratings([first, second])
    assert sorted((r.candidate_id, r.score, r.source) for r in merged) == [("t-0", 0.0, 1), ("t-1", 0.0, 0)]
    assert texts(rating_pairs(t, merged, RatingPairsConfig())) == [("t-0", "t-1", Choice.TIE)]


@pytest.mark.parametrize(
    ("entry", "outcome", "field", "message"),
    [
        (("t-9", "overall", 3), "dropped/rating_unknown_candidate", "ratings.entries[1].candidate_id", "unknown candidate 't-9'"),
        (("t-1", "tone", 3), "dropped/rating_unknown_aspect", "ratings.entries[1].aspect", "no scale for 'tone' (declared: helpfulness, honesty, overall)"),
        (("t-1", "overall", 8), "dropped/rating_out_of_range", "ratings.entries[1].value", "8.0 is outside the scale [1.0, 7.0] of 'overall'"),
        (("t-1", "overall", 0.5), "dropped/rating_out_of_range", "ratings.entries[1].value", "outside the scale"),
        (("t-1", "overall", math.nan), "dropped/rating_out_of_range", "ratings.entries[1].value", "nan is outside"),
        (("t-0", "overall", 3), "dropped/rating_repeated", "ratings.entries[1]", "rates 't-0' on 'overall' a second time"),
    ],
)
def test_malformed_ratings_name_the_entry_and_what_is_wrong(entry, outcome, field, message):
    msg = pb.Ratings(entries=[pb.Ratings.Entry(candidate_id="t-0", aspect="overall", value=4),
                              pb.Ratings.Entry(candidate_id=entry[0], aspect=entry[1], value=entry[2])])
    problem = rating_problem(msg, task())
    assert problem is not None
    assert (problem.outcome, problem.field) == (outcome, field) and message in problem.reason
    assert str(problem).startswith(field + ": ")


def test_empty_ratings_and_bad_scales_are_problems_too():
    assert rating_problem(pb.Ratings(), task()).outcome == "dropped/rating_empty"
    flat = Task(task_id="t", project="p", prompt_id="x", prompt="q", candidates=task().candidates,
                rating_scales=(pb.RatingScale(aspect="overall", min=3, max=3),))
    problem = rating_problem(ratings("t", {0: {"overall": 3}}), flat)
    assert problem.outcome == "dropped/rating_bad_scale" and "needs finite min < max" in problem.reason
    assert rating_problem(ratings("t", {0: {"overall": 1}, 1: {"overall": 7}}), task()) is None  # the ends are on the scale


# -- config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratings_section", "field", "message"),
    [
        ({"aspect_weights": {"helpfulness": -1}}, "curation.ratings.aspect_weights", "the weight of 'helpfulness' must be a finite number >= 0"),
        ({"margin": 1.0}, "curation.ratings.margin", "must be < 1"),
        ({"pair_on": "mean"}, "curation.ratings.pair_on", "overall"),
        ({"margins": 0.1}, "curation.ratings.margins", "unknown key; expected one of: enabled, pair_on"),
        ({"default_aspect_weight": 0}, "curation.ratings", "every aspect has weight 0"),
    ],
)
def test_ratings_config_errors_name_the_dotted_field(ratings_section, field, message):
    with pytest.raises(ConfigError) as err:
        parse_config({"curation": {"ratings": ratings_section}}, RunConfig)
    (issue,) = err.value.issues
    assert issue.field == field and message in issue.message


def test_ratings_config_defaults_and_weights():
    cfg = parse_config({"curation": {"ratings": {"aspect_weights": {"verbosity": 0}, "margin": 0.1}}}, RunConfig).curation.ratings
    assert cfg.enabled and cfg.pair_on == "overall" and cfg.overall_aspect == "overall"
    assert cfg.weight_of("verbosity") == 0.0 and cfg.weight_of("helpfulness") == 1.0
    assert RatingPairsConfig(enabled=False, default_aspect_weight=0.0).enabled is False  # off: no weight needed


# -- curation ---------------------------------------------------------------------------


class Records:
    def __init__(self) -> None:
        self.items: list[StoredRecord] = []

    def add(self, task_id: str, annotator: str = "ann", confidence: float | None = None, **judgement) -> None:
        r = pb.FeedbackRecord(feedback_id=f"f{len(self.items)}", project="p", task_id=task_id, annotator_id=annotator,
                              confidence=confidence, **judgement)
        self.items.append(StoredRecord(seq=len(self.items) + 1, record=r, received_at=0.0))

    def rate(self, task_id: str, values: dict[int, dict[str, float]], annotator: str = "ann", **kw) -> None:
        self.add(task_id, annotator, ratings=ratings(task_id, values), **kw)


def lookup(*tasks: Task):
    return {t.task_id: t for t in tasks}.get


def test_ratings_become_items_and_count_as_used():
    tasks = [task(f"t{i}", prompt=f"Question number {i} about eggs") for i in range(3)]
    rec = Records()
    rec.rate("t0", {0: {"overall": 6}, 1: {"overall": 2}})
    rec.rate("t1", {0: {"overall": 3}, 1: {"overall": 3}})  # a tie
    rec.rate("t2", {0: {"overall": 2}, 1: {"overall": 5}}, confidence=0.5)
    out = curate(rec.items, lookup(*tasks), weights={"ann": 0.8})
    assert out.counts == {"used/ratings": 3, "pairs_from_ratings": 3}
    assert out.outcomes == {"used/ratings": 3}
    assert [(p.choice, p.response_a) for p in out.items] == [
        (Choice.A, tasks[0].candidates[0].text), (Choice.TIE, tasks[1].candidates[0].text), (Choice.A, tasks[2].candidates[1].text)]
    assert [p.weight for p in out.items] == pytest.approx([0.8, 0.8, 0.4])  # annotator weight x confidence
    assert all(isinstance(p, PreferencePair) and p.annotator_id == "ann" for p in out.items)
    assert out.used_by_annotator["ann"] == 3 and out.received["ratings"] == 3


def test_records_of_one_annotator_on_a_task_merge_and_replaced_ones_are_superseded():
    t = task("t0", n=3)
    rec = Records()
    rec.rate("t0", {0: {"overall": 7}})  # a labeling tool: one record per candidate
    rec.rate("t0", {1: {"overall": 1}})
    rec.rate("t0", {2: {"overall": 2}})
    rec.rate("t0", {2: {"overall": 4}})  # an edit: replaces the record before
    rec.rate("t0", {0: {"overall": 5}, 1: {"overall": 5}}, annotator="other")  # another annotator: pairs of their own
    out = curate(rec.items, lookup(t))
    assert out.counts == {"used/ratings": 4, "superseded/ratings": 1, "pairs_from_ratings": 4}
    mine = [(p.response_a[:8], p.response_b[:8], p.choice) for p in out.items if p.annotator_id == "ann"]
    assert mine == [("answer 0", "answer 1", Choice.A), ("answer 0", "answer 2", Choice.A), ("answer 2", "answer 1", Choice.A)]
    assert [p.weight for p in out.items if p.annotator_id == "ann"] == pytest.approx([1 / 3] * 3)
    assert [p.choice for p in out.items if p.annotator_id == "other"] == [Choice.TIE]


def test_malformed_paused_flagged_and_unpaired_ratings_are_counted_with_their_reason():
    tasks = [task(f"t{i}", prompt=f"Question number {i} about eggs") for i in range(7)]
    rec = Records()
    rec.rate("t0", {0: {"overall": 9}, 1: {"overall": 1}})  # off the scale
    rec.add("t1", ratings=pb.Ratings(entries=[pb.Ratings.Entry(candidate_id="t1-0", aspect="tone", value=1)]))
    rec.add("t2", ratings=pb.Ratings(entries=[pb.Ratings.Entry(candidate_id="nope", aspect="overall", value=1)]))
    rec.rate("t3", {0: {"overall": 6}, 1: {"overall": 2}}, annotator="sleepy")  # paused
    rec.rate("t4", {0: {"overall": 6}})  # one candidate: nothing to compare
    rec.add("t5", "mod", flag=pb.Flag(candidate_id="t5-1", kind=pb.Flag.KIND_PII))
    rec.rate("t5", {0: {"overall": 6}, 1: {"overall": 2}})  # the other candidate is flagged
    rec.rate("t6", {0: {"overall": 6}, 1: {"overall": 2}})
    rec.rate("missing", {0: {"overall": 6}})
    out = curate(rec.items, lookup(*tasks), paused={"sleepy"})
    assert out.counts == {
        "dropped/rating_out_of_range": 1, "dropped/rating_unknown_aspect": 1, "dropped/rating_unknown_candidate": 1,
        "paused/ratings": 1, "dropped/ratings_no_pairs": 1, "flag/pii": 1, "dropped/flagged_pii": 1,
        "used/ratings": 1, "pairs_from_ratings": 1, "dropped/unknown_task": 1,
    }
    assert sum(out.outcomes.values()) == len(rec.items)
    assert out.problems == [
        "f0: ratings.entries[0].value: 9.0 is outside the scale [1.0, 7.0] of 'overall'",
        "f1: ratings.entries[0].aspect: task 't1' has no scale for 'tone' (declared: helpfulness, honesty, overall)",
        "f2: ratings.entries[0].candidate_id: unknown candidate 'nope' for task 't2'",
    ]
    assert [p.prompt for p in out.items] == [tasks[6].prompt]


def test_ratings_off_leave_them_unused():
    rec = Records()
    rec.rate("t0", {0: {"overall": 6}, 1: {"overall": 2}})
    cfg = CurationConfig(ratings=RatingPairsConfig(enabled=False))
    out = curate(rec.items, lookup(task("t0")), cfg=cfg)
    assert out.counts == {"not_used/ratings": 1} and not out.items


def test_rating_pairs_are_deduplicated_like_preferences():
    t = task("t0")
    same = Task(task_id="t1", project="p", prompt_id="pid-t1", prompt=t.prompt, candidates=tuple(
        pb.Candidate(candidate_id=f"t1-{i}", text=c.text) for i, c in enumerate(t.candidates)), rating_scales=SCALES)
    rec = Records()
    rec.add("t0", preference=pb.Preference(candidate_a_id="t0-0", candidate_b_id="t0-1", choice=pb.Preference.CHOICE_A))
    rec.rate("t0", {0: {"overall": 6}, 1: {"overall": 2}})  # the same annotator's judgement of the same pair
    rec.rate("t1", {0: {"overall": 6}, 1: {"overall": 2}}, annotator="other")
    memory = CurationMemory(CurationConfig())
    out = curate(rec.items, lookup(t, same), memory=memory)  # t1: the same texts as t0
    assert out.counts == {"used/preference": 1, "dropped/duplicate_exact": 1, "used/ratings": 1, "pairs_from_ratings": 1}
    # each aspect is its own question: its pairs duplicate only pairs of the same aspect
    per_aspect = CurationConfig(ratings=RatingPairsConfig(pair_on="each_aspect"))
    rec2 = Records()
    rec2.add("t0", preference=pb.Preference(candidate_a_id="t0-0", candidate_b_id="t0-1", choice=pb.Preference.CHOICE_A))
    rec2.rate("t0", {0: {"overall": 6, "helpfulness": 4}, 1: {"overall": 2, "helpfulness": 2}})
    out2 = curate(rec2.items, lookup(t), cfg=per_aspect)
    assert out2.counts == {"used/preference": 1, "used/ratings": 1, "pairs_from_ratings": 2}
    # a later round's identical ratings were seen before
    again = curate(rec.items[2:], lookup(same), memory=memory, round_=1)
    assert again.counts == {"dropped/duplicate_seen": 1}


def test_identical_answers_make_no_pair():
    t = Task(task_id="t0", project="p", prompt_id="x", prompt="Say hi.", rating_scales=SCALES,
             candidates=(pb.Candidate(candidate_id="t0-0", text="Hello there!"), pb.Candidate(candidate_id="t0-1", text="hello there")))
    rec = Records()
    rec.rate("t0", {0: {"overall": 6}, 1: {"overall": 2}})
    assert curate(rec.items, lookup(t)).counts == {"dropped/identical_responses": 1}


def test_an_ultrafeedback_row_imports_as_one_record_per_aspect_and_pairs_as_one_judgement(tmp_path):
    import json

    from services.feedback.formats import ultrafeedback_items

    def completion(text: str, helpfulness: str, honesty: str) -> dict:
        return {"response": text, "annotations": {"helpfulness": {"Rating": helpfulness, "Rationale": "r"},
                                                  "honesty": {"Rating": honesty, "Rationale": "r"}}}

    row = {"instruction": "Name a fruit.", "completions": [completion("An apple.", "5", "5"), completion("A rock.", "1", "2"),
                                                            completion("A pear, maybe.", "4", "5")]}
    path = tmp_path / "uf.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (item,) = ultrafeedback_items(path, "p", "uf")
    assert [len(r.ratings.entries) for r in item.records] == [3, 3]  # helpfulness, then honesty
    stored = [StoredRecord(seq=i + 1, record=r, received_at=0.0) for i, r in enumerate(item.records)]
    out = curate(stored, lookup(item.task))
    assert out.counts == {"used/ratings": 2, "pairs_from_ratings": 3}
    # the mean of helpfulness and honesty (both 1..5): apple 1.0, pear 0.875, rock 0.125
    assert [(p.response_a, p.response_b, p.choice) for p in out.items] == [
        ("An apple.", "A rock.", Choice.A), ("An apple.", "A pear, maybe.", Choice.A), ("A pear, maybe.", "A rock.", Choice.A)]
    assert sum(p.weight for p in out.items) == pytest.approx(1.0)
