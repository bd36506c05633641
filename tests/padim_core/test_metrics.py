import math

import numpy as np
import pytest

from padim_core.metrics import (
    aupro,
    classification_rates,
    f1_threshold,
    image_auroc,
    pixel_auroc,
    roc_curve_points,
)


def test_image_auroc_perfect_reversed_and_half():
    labels = [0, 0, 1, 1]
    assert image_auroc(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc(labels, [0.9, 0.8, 0.2, 0.1]) == 0.0
    # one of the four (normal, anomalous) pairs is out of order
    assert image_auroc(labels, [0.1, 0.85, 0.8, 0.9]) == 0.75
    assert isinstance(image_auroc(np.array([False, True]), np.array([0.0, 1.0])), float)


def test_image_auroc_needs_both_classes_and_says_how_many():
    with pytest.raises(ValueError, match="3 normal and 0 anomalous images"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="2 values.*3"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])


def test_pixel_auroc_on_masks_and_maps():
    masks = np.zeros((3, 16, 16), bool)
    masks[1, 4:8, 4:8] = True
    assert pixel_auroc(masks, masks.astype(np.float32)) == 1.0
    assert pixel_auroc(masks, 1.0 - masks) == 0.0
    with pytest.raises(ValueError, match=r"\(3, 16, 16\).*\(3, 16, 8\)"):
        pixel_auroc(masks, np.zeros((3, 16, 8)))
    with pytest.raises(ValueError, match="0 anomalous pixels"):
        pixel_auroc(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)))


def _blobs(n_images: int = 6, size: int = 64) -> np.ndarray:
    masks = np.zeros((n_images, size, size), bool)
    masks[0, 5:15, 5:25] = True
    masks[0, 40:44, 40:44] = True  # a small second region on the same image
    masks[1, 20:40, 30:35] = True
    return masks  # the other images are defect-free


def test_aupro_perfect_map_is_one_and_random_map_is_low():
    masks = _blobs()
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=1e-6)
    noise = np.random.default_rng(0).random(masks.shape, dtype=np.float32)
    # a random map's PRO curve follows the diagonal: area fpr_limit / 2, normalised -> 0.15
    assert aupro(masks, noise) == pytest.approx(0.15, abs=0.05)
    assert isinstance(aupro(masks, noise, fpr_limit=0.1), float)


def test_aupro_needs_defects():
    with pytest.raises(ValueError, match="no anomalous pixel"):
        aupro(np.zeros((2, 8, 8), bool), np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(_blobs(), np.zeros((6, 64, 64)), fpr_limit=0)


def test_roc_curve_points_span_zero_to_one():
    fpr, tpr, thresholds = roc_curve_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert len(fpr) == len(tpr) == len(thresholds)


@pytest.mark.parametrize("seed", range(5))
def test_f1_threshold_reproduces_the_best_classification_with_strict_greater(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(40) < 0.4
    labels[:2] = [False, True]
    scores = np.round(rng.normal(labels * 1.0, 1.0), 1)  # rounding makes ties
    threshold, best_f1 = f1_threshold(labels, scores)

    def f1(predicted):
        tp = np.sum(predicted & labels)
        return 2 * tp / (predicted.sum() + labels.sum())

    brute_force = max(f1(scores >= cut) for cut in np.unique(scores))
    assert best_f1 == pytest.approx(brute_force)
    assert f1(scores > threshold) == pytest.approx(best_f1)


def test_f1_threshold_perfect_separation_sits_between_the_classes():
    threshold, f1 = f1_threshold([0, 0, 1, 1], [0.1, 0.2, 0.6, 0.9])
    assert f1 == 1.0
    assert threshold == pytest.approx(0.4)


def test_f1_threshold_below_the_lowest_score():
    # every image anomalous: the best cut keeps all of them, so the threshold is below the minimum
    threshold, f1 = f1_threshold([1, 1, 1, 0], [0.5, 0.6, 0.7, 0.8])
    assert threshold < 0.5 and (np.array([0.5, 0.6, 0.7, 0.8]) > threshold).all()
    assert f1 == pytest.approx(2 * 0.75 / 1.75)


def test_classification_rates():
    rates = classification_rates([0, 0, 0, 0, 1, 1], [0.1, 0.5, 0.6, 0.2, 0.5, 0.9], threshold=0.5)
    assert rates == {"false_positive_rate": 0.25, "false_negative_rate": 0.5}  # 0.5 is not > 0.5
    only_normal = classification_rates([0, 0], [0.1, 0.9], threshold=0.5)
    assert only_normal["false_positive_rate"] == 0.5
    assert math.isnan(only_normal["false_negative_rate"])
