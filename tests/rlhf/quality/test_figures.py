"""Annotator quality figures against hand-computed and published values."""

import math
import random

import pytest

from rlhf.quality.figures import Judgement, QualityConfig, alpha_by_kind, annotator_report, krippendorff_alpha

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the worked example:
# 4 observers, 12 units, values 1-5, missing entries None.
OBSERVERS = (
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
)
UNITS = {i: [o[i] for o in OBSERVERS if o[i] is not None] for i in range(12)}


@pytest.mark.parametrize("level, published", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_alpha_matches_the_published_example(level, published):
    assert krippendorff_alpha(UNITS, level) == pytest.approx(published, abs=5e-4)


def test_alpha_by_hand_on_a_small_case():
    # two coders, three units: (a,a) (a,b) (b,b). Coincidences: o_aa=2, o_ab=o_ba=1, o_bb=2; n=6
    # D_o = 2/6; D_e = (3*3*2)/(6*5) = 0.6; alpha = 1 - (1/3)/0.6 = 4/9
    assert krippendorff_alpha({1: ["a", "a"], 2: ["a", "b"], 3: ["b", "b"]}) == pytest.approx(4 / 9)
    assert krippendorff_alpha({1: ["a", "a"], 2: ["b", "b"]}) == pytest.approx(1.0)
    assert math.isnan(krippendorff_alpha({1: ["a"]}))  # nothing pairable


def test_alpha_per_kind():
    js = [Judgement(u, a, v, kind="preference") for u, a, v in [(1, "x", "c1"), (1, "y", "c1"), (2, "x", "c2"), (2, "y", "c2")]]
    js += [Judgement((1, "c1"), a, r, kind="ranking") for a, r in [("x", 1), ("y", 2)]]
    js += [Judgement((1, "c2"), a, r, kind="ranking") for a, r in [("x", 2), ("y", 1)]]
    alphas = alpha_by_kind(js)
    assert alphas["preference"] == pytest.approx(1.0)
    assert alphas["ranking"] < 0  # they disagree completely


def simulated(n_units=60, seed=0):
    rng = random.Random(seed)
    truth = {u: rng.choice(["c0", "c1"]) for u in range(n_units)}
    js = []
    for u, right in truth.items():
        for name in ("good1", "good2", "good3"):
            value = right if rng.random() > 0.1 else ("c1" if right == "c0" else "c0")
            js.append(Judgement(u, name, value, chose_left=value == "c0", lead_time_s=rng.uniform(8, 12)))
        value = rng.choice(["c0", "c1"])  # answers at random, always quickly, always the left one
        js.append(Judgement(u, "random", "c0", chose_left=True, lead_time_s=rng.uniform(0.4, 0.6)))
    return truth, js


def test_random_annotator_is_paused_and_down_weighted():
    truth, js = simulated()
    gold = {u: truth[u] for u in range(20)}
    report = annotator_report(js, gold, QualityConfig(min_gold=10, pause_below_gold_accuracy=0.7))
    rnd, good = report["random"], report["good1"]
    assert rnd.paused and not good.paused
    assert good.gold_accuracy > 0.8 and rnd.gold_accuracy < 0.7
    assert good.weight > 0.6 and rnd.weight < good.weight
    assert rnd.position_biased and rnd.left_rate == 1.0 and not good.position_biased
    assert rnd.lead_time_outlier and not good.lead_time_outlier
    assert good.consensus_agreement > 0.6 and good.consensus_agreement > rnd.consensus_agreement


def test_consensus_leaves_the_annotator_out():
    js = [Judgement(1, "a", "x"), Judgement(1, "b", "x"), Judgement(1, "c", "y")]
    report = annotator_report(js)
    # a's others are b and c; c, against everyone else, carries no weight in a's consensus
    assert report["a"].consensus_agreement == 1.0
    assert report["c"].consensus_agreement == 0.0
    js.append(Judgement(1, "d", "x"))
    report = annotator_report(js)
    assert report["a"].consensus_agreement == 1.0 and report["c"].consensus_agreement == 0.0


def test_invented_annotators_voting_many_times_do_not_outweigh_people():
    """Three people (right 90% of the time) and two invented ids that vote against them three
    times per unit: each id counts once per unit, the ids carry no weight in the people's
    consensus, and the people keep a weight above theirs (without any gold)."""
    rng = random.Random(3)
    js = []
    for u in range(40):
        for h in range(3):
            js.append(Judgement(u, f"person-{h}", "x" if rng.random() > 0.1 else "y"))
        for s in range(2):
            js.extend(Judgement(u, f"invented-{s}", "y") for _ in range(3))
    report = annotator_report(js, cfg=QualityConfig(min_consensus=5, prior_weight=0.5))
    people = [report[f"person-{h}"] for h in range(3)]
    invented = [report[f"invented-{s}"] for s in range(2)]
    assert min(p.weight for p in people) >= 0.4 and max(i.weight for i in invented) == 0.0
    assert min(p.consensus_agreement for p in people) >= 0.7 and max(i.consensus_agreement for i in invented) <= 0.1
    assert all(i.judgements == 40 and i.superseded == 80 for i in invented)
    assert all(p.superseded == 0 for p in people)


def test_an_annotator_nothing_has_measured_starts_at_the_prior():
    report = annotator_report([Judgement(1, "new", "x")], cfg=QualityConfig(prior_weight=0.5))
    assert report["new"].weight == 0.5 and report["new"].consensus_agreement is None


def test_a_later_answer_replaces_an_earlier_one():
    js = [Judgement(1, "a", "x"), Judgement(1, "a", "y"), Judgement(1, "b", "y"), Judgement(1, "c", "y")]
    report = annotator_report(js)
    assert report["a"].judgements == 1 and report["a"].superseded == 1
    assert report["a"].consensus_agreement == 1.0  # its answer is the last one, y
