"""Preference records: validation, rankings expanded into pairs, annotator weights, targets."""

from __future__ import annotations

import pytest

from rlhf.preferences import AnnotatorWeights, Choice, PreferencePair, Ranking, expand, soft_label


def _pair(choice: Choice, strength: float | None = None, **fields: str) -> PreferencePair:
    return PreferencePair(prompt="p", response_a="a", response_b="b", choice=choice,
                          strength=strength, **fields)


def test_targets_for_every_choice() -> None:
    assert soft_label(_pair(Choice.A)) == 1.0
    assert soft_label(_pair(Choice.B)) == 0.0
    assert soft_label(_pair(Choice.A, strength=0.5)) == 0.75
    assert soft_label(_pair(Choice.B, strength=0.5)) == 0.25
    assert soft_label(_pair(Choice.A), unstated_strength=0.6) == pytest.approx(0.8)
    assert soft_label(_pair(Choice.TIE)) == 0.5
    assert soft_label(_pair(Choice.TIE), ties="exclude") is None
    assert soft_label(_pair(Choice.BOTH_BAD)) is None
    assert soft_label(_pair(Choice.BOTH_BAD), both_bad="tie") == 0.5
    assert soft_label(_pair(Choice.A), label_smoothing=0.1) == pytest.approx(0.95)
    assert soft_label(_pair(Choice.TIE), label_smoothing=0.1) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("choice", "strength", "weight", "message"),
    [
        (Choice.TIE, 0.5, 1.0, "only meaningful for A or B"),
        (Choice.A, 0.0, 1.0, r"must lie in \(0, 1\]"),
        (Choice.B, 1.5, 1.0, r"must lie in \(0, 1\]"),
        (Choice.A, None, -1.0, "weight must be >= 0"),
    ],
)
def test_invalid_pairs_are_rejected(choice: Choice, strength: float | None, weight: float,
                                    message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreferencePair(prompt="p", response_a="a", response_b="b", choice=choice,
                       strength=strength, weight=weight)


def test_swapped_mirrors_the_judgement() -> None:
    pair = _pair(Choice.A, strength=0.4)
    swapped = pair.swapped()
    assert (swapped.response_a, swapped.response_b, swapped.choice) == ("b", "a", Choice.B)
    assert soft_label(swapped) == pytest.approx(1.0 - soft_label(pair))
    assert _pair(Choice.TIE).swapped().choice is Choice.TIE


def test_ranking_expands_into_all_pairs_with_shared_weight() -> None:
    ranking = Ranking.ordered("p", ["best", "middle", "worst"], annotator_id="ann", weight=3.0)
    pairs = ranking.to_pairs()
    assert [(p.response_a, p.response_b) for p in pairs] == [
        ("best", "middle"), ("best", "worst"), ("middle", "worst")]
    assert all(p.choice is Choice.A and p.weight == 1.0 and p.annotator_id == "ann" for p in pairs)


def test_ranking_with_equal_ranks_gives_ties_and_orders_by_rank() -> None:
    ranking = Ranking(prompt="p", responses=("x", "y", "z"), ranks=(3, 1, 1))
    pairs = ranking.to_pairs()
    as_tuples = {(p.response_a, p.response_b, p.choice) for p in pairs}
    assert as_tuples == {("y", "x", Choice.A), ("z", "x", Choice.A), ("y", "z", Choice.TIE)}
    assert sum(p.weight for p in pairs) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("responses", "ranks", "message"),
    [(("a",), (1,), "at least 2"), (("a", "b"), (1,), "1 ranks for 2"),
     (("a", "b"), (1, 3), r"ranks must lie in \[1, 2\]")],
)
def test_invalid_rankings_are_rejected(responses: tuple[str, ...], ranks: tuple[int, ...],
                                       message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Ranking(prompt="p", responses=responses, ranks=ranks)


def test_expand_and_annotator_weights() -> None:
    records = [_pair(Choice.A, annotator_id="alice"),
               Ranking.ordered("q", ["1", "2"], annotator_id="bob"),
               _pair(Choice.B, annotator_id="carol")]
    pairs = AnnotatorWeights({"alice": 2.0, "bob": 0.5}, default=0.0).apply(expand(records))
    assert [p.weight for p in pairs] == [2.0, 0.5, 0.0]
    assert pairs[1].prompt == "q" and pairs[1].response_a == "1"


def test_group_key_prefers_prompt_id() -> None:
    assert _pair(Choice.A, prompt_id="task-7").group_key == "task-7"
    assert _pair(Choice.A).group_key == _pair(Choice.B).group_key != ""
