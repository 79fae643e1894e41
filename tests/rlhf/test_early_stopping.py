"""rlhf.early_stopping.Patience: when a series has stopped improving, both directions."""

import math

import pytest

from rlhf.early_stopping import Patience, replay


def test_min_mode_counts_epochs_without_a_new_low():
    p = Patience(patience=2, mode="min")
    assert [p.update(v) for v in (1.0, 0.8, 0.9, 0.85)] == [False, False, False, True]
    assert (p.best, p.best_step, p.stale, p.steps) == (0.8, 1, 2, 4)
    assert p.reason("validation loss", "epoch") == (
        "validation loss not below its best 0.8 (epoch 2) by more than 0 for 2 epoch(s); stopped after epoch 4")


def test_min_delta_and_max_mode():
    p = replay([0.5, 0.52, 0.53], patience=2, min_delta=0.05, mode="max")
    assert p.stale == 2 and p.best == 0.5
    assert replay([0.5, 0.56], patience=1, min_delta=0.05, mode="max").stale == 0


def test_nan_never_improves():
    p = replay([math.nan, math.nan], patience=3, mode="max")
    assert math.isnan(p.best) and p.stale == 2
    assert replay([math.nan, 0.4], patience=3, mode="max").best == 0.4


@pytest.mark.parametrize("kwargs", [{"patience": 0}, {"patience": 1, "min_delta": -0.1}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Patience(**kwargs)
