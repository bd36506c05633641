"""Shifted test splits on the demo data: severity 0 is the unshifted evaluation exactly, the
figures repeat, and a strong blur blurs the maps' view of the defects."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.common.config import JOB_SECTIONS
from padim_core.config import load_config
from padim_core.datasets import MvtecCategory
from padim_core.demo_data import build_demo_dataset
from padim_core.evaluate import evaluate_category
from padim_core.robustness import (
    ShiftFigures,
    evaluate_shifts,
    load_test_split,
    split_figures,
)

from support.paths import DEMO_CONFIG


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory):
    root = build_demo_dataset(tmp_path_factory.mktemp("demo") / "data", train=16, test_good=6, test_defect=3, size=96)
    overrides = ["padim.image_size=96", "padim.n_features=40", "data.batch_size=8", "data.num_workers=1"]
    config = load_config(DEMO_CONFIG, overrides, others=JOB_SECTIONS)
    category = MvtecCategory.from_folder(root / "brick")
    evaluation = evaluate_category(category, config, "cpu")
    split = load_test_split(category, evaluation.model.transform, batch_size=8, workers=1)
    return evaluation, split


def test_the_split_is_what_evaluate_scored(evaluated) -> None:
    evaluation, split = evaluated
    assert len(split) == len(evaluation.labels) and np.array_equal(split.labels, evaluation.labels)
    assert np.array_equal(split.masks.numpy(), evaluation.masks)
    assert split.judged.all()  # the demo set has a mask for every defect


def test_severity_zero_is_the_unshifted_evaluation_exactly(evaluated) -> None:
    evaluation, split = evaluated
    results = evaluate_shifts(evaluation.model, split, {"blur": [8.0], "noise": [0.05]}, seed=0, batch_size=8)
    unshifted = [row for row in results if row.severity == 0]
    assert [row.shift for row in unshifted] == ["blur", "noise"]
    for row in unshifted:
        assert row.level is None
        assert row.image_auroc == evaluation.metrics["image_auroc"]
        assert row.pixel_auroc == evaluation.metrics["pixel_auroc"]
        assert row.false_positive_rate == evaluation.metrics["realised_false_alarm_rate"]
        assert 1 - row.false_negative_rate == evaluation.metrics["recall"]
    assert [(row.shift, row.severity, row.level) for row in results[2:]] == [("blur", 1, 8.0), ("noise", 1, 0.05)]


def test_figures_repeat_with_the_seed_and_a_strong_blur_lowers_pixel_auroc(evaluated) -> None:
    evaluation, split = evaluated
    shifts = {"blur": [12.0], "noise": [0.1], "translation": [0.1]}
    first = evaluate_shifts(evaluation.model, split, shifts, seed=4, batch_size=8)
    seen: list[ShiftFigures] = []
    again = evaluate_shifts(evaluation.model, split, shifts, seed=4, batch_size=8, progress=seen.append)
    assert first == again
    assert seen == [again[0], *(row for row in again if row.severity > 0)]  # the unshifted split is scored once
    # Another batch size draws the same shifts; only the CNN's float rounding may differ.
    rebatched = evaluate_shifts(evaluation.model, split, shifts, seed=4, batch_size=5)
    for ours, theirs in zip(first, rebatched):
        assert ours.image_auroc == pytest.approx(theirs.image_auroc, abs=1e-6)
        assert ours.pixel_auroc == pytest.approx(theirs.pixel_auroc, abs=1e-6)
    other_seed = evaluate_shifts(evaluation.model, split, {"noise": [0.1]}, seed=5, batch_size=8)
    assert other_seed[1] != first[4]
    blurred = first[3]
    assert blurred.shift == "blur" and blurred.pixel_auroc < first[0].pixel_auroc - 0.02


def test_error_rates_come_from_the_models_threshold(evaluated) -> None:
    evaluation, split = evaluated
    labels, scores = evaluation.labels, evaluation.scores
    threshold = evaluation.model.threshold_
    assert threshold is not None
    figures = split_figures(split, scores, evaluation.maps, split.masks, threshold)
    flagged = scores > threshold
    assert figures["false_positive_rate"] == pytest.approx((flagged & (labels == 0)).sum() / (labels == 0).sum())
    assert figures["false_negative_rate"] == pytest.approx((~flagged & (labels == 1)).sum() / (labels == 1).sum())
    without = split_figures(split, scores, evaluation.maps, split.masks, None)
    assert without["false_positive_rate"] is None and without["image_auroc"] == figures["image_auroc"]
