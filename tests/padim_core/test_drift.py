"""The drift test on conformal p-values: exact under exchangeability, deaf to a modest share of
defects, alarmed by scores that rose."""

from __future__ import annotations

import numpy as np
import pytest

from padim_core.calibration import Calibration
from padim_core.drift import (
    drift_test,
    level_counts,
    levels_of_p_values,
    null_draws,
    trimmed_mean,
)


def batch_counts(calibration: Calibration, scores: np.ndarray) -> np.ndarray:
    return level_counts(calibration.exceeding(scores), calibration.count)


def test_p_values_map_back_to_their_levels_exactly() -> None:
    for count in (1, 2, 42, 99, 1000, 99_999):
        levels = np.arange(count + 1)
        p_values = Calibration.conformal(np.arange(float(count)), 0.5).p_values(np.arange(float(count)))
        assert levels_of_p_values(p_values, count).tolist() == (count - np.arange(count)).tolist()
        assert levels_of_p_values((1 + levels) / (count + 1), count).tolist() == levels.tolist()


def test_the_statistic_is_the_trimmed_mean_of_the_p_values() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        count, images, trim = int(rng.integers(1, 60)), int(rng.integers(1, 80)), float(rng.uniform(0, 0.9))
        calibration = Calibration.conformal(rng.normal(size=count), 0.99)
        scores = rng.normal(size=images)
        p_values = np.sort(calibration.p_values(scores))
        expected = p_values[int(np.floor(trim * images)):].mean()
        assert trimmed_mean(batch_counts(calibration, scores), trim) == pytest.approx(expected, abs=1e-12)
    rows = np.array([[2, 0, 1], [0, 3, 0]])  # two batches of 3 against 2 calibration scores
    assert trimmed_mean(rows, 1 / 3).tolist() == pytest.approx([(1 / 3 + 1) / 2, 2 / 3])


def test_null_draws_are_uniform_over_the_arrangements() -> None:
    """With 1 calibration score and 2 batch scores the three arrangements (both below, one each
    side, both above) are equally likely; with 3 and 2 the ten are."""
    draws = null_draws(1, 2, 30_000, np.random.default_rng(1))
    assert (draws.sum(axis=1) == 2).all()
    _, frequency = np.unique(draws, axis=0, return_counts=True)
    assert frequency.size == 3 and np.allclose(frequency / 30_000, 1 / 3, atol=0.01)
    draws = null_draws(3, 2, 50_000, np.random.default_rng(2))
    _, frequency = np.unique(draws, axis=0, return_counts=True)
    assert frequency.size == 10 and np.allclose(frequency / 50_000, 0.1, atol=0.006)
    allowed = null_draws(3, 5, 1000, np.random.default_rng(2), defects=3)  # 3 defects above every calibration score
    assert (allowed.sum(axis=1) == 5).all() and (allowed[:, 0] >= 3).all()


def test_a_tenth_of_defects_rings_no_more_than_alpha_thanks_to_the_allowance() -> None:
    """Dropping the smallest half hides defects from the mean only roughly: against 2,000
    calibration scores (a precise null) with 5,000 images, 10% of them defects and no drift, a null
    without the allowance rings most of the time; with it, about alpha of the time or less, and a
    rise of the normal scores by 0.2 standard deviations still rings."""
    rng = np.random.default_rng(8)
    unallowed = allowed = risen = 0
    for trial in range(20):
        calibration = Calibration.conformal(rng.normal(size=2000), 0.05)
        normal, defects = rng.normal(size=4500), rng.normal(8, 1, size=500)
        counts = batch_counts(calibration, np.concatenate([normal, defects]))
        unallowed += drift_test(counts, 2000, defect_share=0.0, draws=500, seed=trial).alarm
        allowed += drift_test(counts, 2000, defect_share=0.1, draws=500, seed=trial).alarm
        risen += drift_test(batch_counts(calibration, np.concatenate([normal + 0.2, defects])), 2000, defect_share=0.1,
                            draws=500, seed=trial).alarm
    assert unallowed >= 12 and allowed <= 1 and risen >= 18


def test_without_drift_the_alarm_rings_about_as_often_as_its_alpha() -> None:
    rng = np.random.default_rng(3)
    p_values = []
    for trial in range(300):
        calibration = Calibration.conformal(rng.normal(size=42), 1 / 43)
        scores = rng.normal(size=int(rng.integers(10, 300)))
        counts = batch_counts(calibration, scores)
        p_values.append([drift_test(counts, 42, defect_share=share, draws=1000, seed=trial).p_value for share in (0, 0.1)])
    exact, allowing = np.array(p_values).T
    assert (exact < 0.01).mean() <= 0.025 and abs((exact < 0.1).mean() - 0.1) < 0.04
    assert abs((exact < 0.5).mean() - 0.5) < 0.08
    # allowing for defects that are not there only makes the test more cautious
    assert (allowing >= exact).all() and (allowing < 0.1).mean() < 0.05


def test_risen_scores_ring_the_alarm_and_a_tenth_of_defects_does_not() -> None:
    rng = np.random.default_rng(4)
    calibration = Calibration.conformal(rng.normal(size=42), 1 / 43)
    normal = rng.normal(size=90)
    defects = rng.normal(8, 1, size=10)
    quiet = drift_test(batch_counts(calibration, np.concatenate([normal, defects])), 42)
    assert quiet.alarm is False and quiet.p_value > 0.05 and quiet.verdict == "no alarm"
    risen = drift_test(batch_counts(calibration, normal + 1.0), 42)
    assert risen.alarm is True and risen.p_value < 0.001 and risen.verdict == "ALARM"
    assert risen.statistic < quiet.statistic
    lower = drift_test(batch_counts(calibration, normal - 2.0), 42)  # scores that fell do not flood a line with alarms
    assert lower.alarm is False and lower.p_value == 1.0
    # the Monte Carlo p-value is never 0, and a seed gives the same draws
    assert risen.p_value >= 1 / 10_001 and drift_test(batch_counts(calibration, normal), 42, seed=7) == \
        drift_test(batch_counts(calibration, normal), 42, seed=7)


def test_too_small_a_batch_is_not_tested_and_large_calibrations_are_simulated_in_chunks() -> None:
    calibration = Calibration.conformal(np.arange(50.0), 0.1)
    small = drift_test(batch_counts(calibration, np.arange(9.0)), 50, min_images=10)
    assert (small.statistic, small.p_value, small.alarm) == (None, None, None)
    assert small.verdict == "not tested: 9 images, fewer than 10"
    assert small.to_dict()["verdict"] == small.verdict and small.to_dict()["images"] == 9
    big = Calibration.conformal(np.random.default_rng(5).normal(size=20_000), 0.01)
    test = drift_test(batch_counts(big, np.random.default_rng(6).normal(size=500)), 20_000, draws=500)
    assert test.alarm is False and test.images == 500
    with pytest.raises(ValueError, match="expected 51 level counts"):
        drift_test(np.zeros(50), 50)
    with pytest.raises(ValueError, match="defect_share must be in"):
        drift_test(np.ones(51), 50, defect_share=1.0)
