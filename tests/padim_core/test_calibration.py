"""The decision rule: anomalous strictly above the threshold, what the threshold came from, the
conformal threshold and its guarantee, and p-values that never disagree with the decisions."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from jobs.common.config import JOB_SECTIONS
from padim_core.calibration import (
    MAX_SCORES,
    Calibration,
    conformal_rank,
    images_needed,
    random_splits,
    realised_false_alarm_rates,
    resolve_false_alarm_rate,
)
from padim_core.config import load_config
from padim_core.datasets import MvtecCategory
from padim_core.demo_data import build_demo_dataset
from padim_core.errors import ConfigError, ModelFileError
from padim_core.evaluate import fit_detector
from padim_core.scoring import score_all

from support.paths import DEMO_CONFIG


def test_anomalous_means_strictly_above_the_threshold() -> None:
    calibration = Calibration("fixed", 2.0, (1.0, 1.5, 2.0))
    assert calibration.is_anomalous([1.0, 2.0, 2.0001, 3.0]).tolist() == [False, False, True, True]
    assert calibration.is_anomalous(np.float32(2.5)).tolist() is True
    assert calibration.is_anomalous(torch.tensor([0.5, 2.5])).tolist() == [False, True]
    assert calibration.count == 3


def test_a_calibration_survives_its_dict_form() -> None:
    calibration = Calibration("quantile 0.99 of normal test scores", 1.25, (0.5, 1.0, 1.25), false_alarm_rate=0.01)
    plain = calibration.to_dict()
    assert plain == {"method": "quantile 0.99 of normal test scores", "threshold": 1.25, "false_alarm_rate": 0.01,
                     "count": 3, "scores": [0.5, 1.0, 1.25]}
    assert Calibration.from_dict(plain, "m.safetensors") == calibration
    assert Calibration.from_dict({**plain, "threshold": 2, "scores": [0, 1], "count": 2}, "m").scores == (0.0, 1.0)


def test_a_bad_calibration_names_the_file_and_the_value() -> None:
    good = Calibration("fixed", 1.0, (0.5,)).to_dict()
    with pytest.raises(ModelFileError, match="^m.safetensors: calibration.threshold must be a finite number, got True"):
        Calibration.from_dict({**good, "threshold": True}, "m.safetensors")
    with pytest.raises(ModelFileError, match=f"at most {MAX_SCORES} finite numbers"):
        Calibration.from_dict({**good, "scores": [0.0] * (MAX_SCORES + 1), "count": MAX_SCORES + 1}, "m")
    with pytest.raises(ModelFileError, match="calibration.count is None but it lists 1 scores"):
        Calibration.from_dict({key: value for key, value in good.items() if key != "count"}, "m")


# ------------------------------------------------------------------------------- conformal
def test_conformal_threshold_is_the_kth_smallest_score() -> None:
    """k = ceil((n + 1)(1 - alpha)), checked in exact arithmetic away from the levels j / (n + 1)."""
    rng = np.random.default_rng(0)
    for count in range(1, 300, 7):
        for rate in rng.uniform(1 / (count + 1), 1, size=20):
            scores = rng.normal(size=count)
            calibration = Calibration.conformal(scores, rate)
            k = math.ceil((count + 1) * (1 - Fraction(float(rate))))
            assert calibration.threshold == np.sort(scores)[k - 1]
            assert calibration.method == "conformal" and calibration.false_alarm_rate == rate and calibration.count == count
    # a rate written as a level j / (n + 1) means that level, whichever way its float rounds
    assert conformal_rank(42, 1 / 43) == 42 and conformal_rank(99, 0.01) == 99 and conformal_rank(99, 0.05) == 95
    assert [conformal_rank(20, j / 21) for j in range(1, 21)] == list(range(20, 0, -1))


def test_p_values_and_decisions_never_disagree() -> None:
    """Over many random cases, ties included (scores drawn from few values, new scores equal to
    calibration scores), and rates exactly at the levels j / (n + 1): p <= alpha iff score > threshold."""
    rng = np.random.default_rng(1)
    cases = 0
    for _ in range(1000):
        count = int(rng.integers(1, 150))
        rates = [1 / (count + 1), float(rng.uniform(1 / (count + 1), 1)), int(rng.integers(1, count + 1)) / (count + 1)]
        scores = rng.integers(0, int(rng.integers(2, 40)), size=count).astype(np.float64)
        new = np.concatenate([scores, rng.integers(-2, 42, size=50).astype(np.float64), rng.normal(20, 10, size=50)])
        for rate in rates:
            if rate >= 1:
                continue
            calibration = Calibration.conformal(scores, rate)
            p_values = calibration.p_values(new)
            expected = (1 + (scores[None, :] >= new[:, None]).sum(axis=1)) / (count + 1)
            np.testing.assert_array_equal(p_values, expected)
            np.testing.assert_array_equal(p_values <= rate, calibration.is_anomalous(new))
            cases += len(new)
    assert cases > 150_000


def test_the_guarantee_holds_exactly_over_every_split() -> None:
    """For a fixed set of distinct normal scores, averaged over every way of choosing the
    calibration images, a test image is flagged with probability (n + 1 - k) / (n + 1) <= alpha."""
    scores = np.random.default_rng(2).normal(size=12)
    count = 9
    for rate in (0.1, 0.2, 0.25, 0.5):
        flagged = total = 0
        for chosen in itertools.combinations(range(len(scores)), count):
            calibration = Calibration.conformal(scores[list(chosen)], rate)
            rest = np.delete(scores, chosen)
            flagged += int(calibration.is_anomalous(rest).sum())
            total += len(rest)
        exact = Fraction(flagged, total)
        assert exact == Fraction(count + 1 - conformal_rank(count, rate), count + 1) and exact <= Fraction(rate)


def test_realised_rates_follow_the_same_splits_for_every_rate() -> None:
    scores = np.random.default_rng(3).normal(size=400)
    loose, strict = (realised_false_alarm_rates(scores, 199, rate, resplits=300, seed=4) for rate in (0.1, 0.01))
    assert (strict <= loose).all()  # same splits: a stricter rate never flags more
    assert abs(loose.mean() - 0.1) < 0.01 and strict.mean() <= 0.02
    with pytest.raises(ValueError, match="must leave test images"):
        realised_false_alarm_rates(scores, 400, 0.1, resplits=1)


def test_random_splits_partition_every_image_and_repeat_with_the_seed() -> None:
    splits = list(random_splits(10, 4, resplits=50, seed=7))
    assert len(splits) == 50
    for calibrating, testing in splits:
        assert len(calibrating) == 4 and sorted(np.concatenate([calibrating, testing]).tolist()) == list(range(10))
    assert len({tuple(calibrating) for calibrating, _ in splits}) > 1  # not one split over and over
    again = list(random_splits(10, 4, resplits=50, seed=7))
    assert all((a == b).all() and (c == d).all() for (a, c), (b, d) in zip(splits, again))
    with pytest.raises(ValueError, match="must leave test images"):
        next(random_splits(10, 0, resplits=1))


def test_the_default_rate_follows_the_calibration_count() -> None:
    assert resolve_false_alarm_rate(None, 99) == (0.01, None) and resolve_false_alarm_rate(None, 500) == (0.01, None)
    rate, warning = resolve_false_alarm_rate(None, 42)
    assert rate == 1 / 43 and Calibration.conformal(np.arange(42.0), rate).threshold == 41.0  # the largest score
    assert warning == ("42 calibration images support a false-alarm rate of at least 1/43 = 0.02326, not the default 0.01 "
                       "(which needs 99); using 0.02326")
    assert resolve_false_alarm_rate(0.05, 19) == (0.05, None)
    assert images_needed(0.01) == 99 and images_needed(0.05) == 19 and images_needed(0.1) == 9 and images_needed(0.5) == 1


def test_a_rate_the_count_cannot_support_says_how_many_images_it_needs() -> None:
    with pytest.raises(ConfigError, match=r"false_alarm_rate 0.01 needs at least 99 calibration images, got 42; "
                                          r"42 images support a false-alarm rate >= 0.02326"):
        resolve_false_alarm_rate(0.01, 42)
    with pytest.raises(ConfigError, match="needs at least 19 calibration images, got 18"):
        Calibration.conformal(np.arange(18.0), 0.05)
    with pytest.raises(ConfigError, match="no calibration images"):
        resolve_false_alarm_rate(None, 0)
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ConfigError, match="out of range; allowed: 0 < rate < 1"):
            conformal_rank(100, bad)


def test_a_conformal_calibration_must_match_its_own_scores() -> None:
    good = Calibration.conformal([3.0, 1.0, 2.0, 5.0, 4.0], 0.2).to_dict()
    assert good["threshold"] == 5.0 and Calibration.from_dict(good, "m").is_conformal
    with pytest.raises(ModelFileError, match=r"^m: calibration.threshold 4.0 is not the conformal threshold 5.0 of its 5 "
                                             r"scores at false_alarm_rate 0.2"):
        Calibration.from_dict({**good, "threshold": 4.0}, "m")
    with pytest.raises(ModelFileError, match="needs a false_alarm_rate its 5 scores support"):
        Calibration.from_dict({**good, "false_alarm_rate": 0.1}, "m")
    assert not Calibration.from_dict({**good, "method": "fixed", "threshold": 4.0}, "m").is_conformal


@pytest.mark.slow
def test_the_guarantee_holds_over_resplits_of_held_out_normal_images(tmp_path):
    """Fit once on 10 normal images; the other 130 normal images are exchangeable under that
    model, so re-splitting their scores into 99 calibration and 31 test images measures the
    guarantee: the mean realised false-alarm rate stays within alpha + 0.01."""
    root = build_demo_dataset(tmp_path / "data", train=50, test_good=90, test_defect=0, size=64) / "grass"
    config = load_config(DEMO_CONFIG, ["padim.image_size=64", "data.batch_size=16"], others=JOB_SECTIONS)
    model = config.build_detector()
    category = MvtecCategory.from_folder(root)
    fit_detector(model, category.train_images[:10], batch_size=16, workers=2)
    normal = [*category.train_images[10:], *(sample.path for sample in category.test_samples)]
    scores, _ = score_all(model, normal, batch_size=16, workers=2)
    assert len(scores) == 130 and len(np.unique(scores)) == 130
    for rate in (0.01, 0.05, 0.1):
        realised = realised_false_alarm_rates(scores, 99, rate, resplits=100, seed=0)
        assert realised.mean() <= rate + 0.01, (rate, realised.mean())
        assert realised.mean() >= rate - 0.03  # and the threshold is not needlessly high
