"""Evaluation metrics and decision thresholds.

Convention used across the project: an image is anomalous when `score > threshold` (strictly
greater). `f1_threshold` returns a value that honours it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve


def _labels_and_scores(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.size != scores.size:
        raise ValueError(f"labels has {labels.size} values but scores has {scores.size}")
    if labels.size == 0:
        raise ValueError("labels and scores are empty")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0/1 or bool, got values {np.unique(labels)[:8].tolist()}")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores hold {int((~np.isfinite(scores)).sum())} NaN or infinite values")
    return labels.astype(bool), scores


def _require_both_classes(labels: np.ndarray, what: str, unit: str = "images") -> None:
    n_anomalous = int(labels.sum())
    n_normal = labels.size - n_anomalous
    if n_anomalous == 0 or n_normal == 0:
        raise ValueError(
            f"{what} needs both normal and anomalous {unit}; got {n_normal} normal and {n_anomalous} anomalous {unit}"
        )


def image_auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of image scores; labels: 1/True = anomalous."""
    labels, scores = _labels_and_scores(labels, scores)
    _require_both_classes(labels, "image AUROC")
    return float(roc_auc_score(labels, scores))


def _masks_and_maps(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    maps = np.asarray(maps, dtype=np.float32)  # float32: half the memory on millions of pixels
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks and maps must both be [N, H, W], got {masks.shape} and {maps.shape}")
    return masks.astype(bool, copy=False), maps


def pixel_auroc(masks: Any, maps: Any) -> float:
    """AUROC over every pixel of every image (masks [N, H, W] bool, maps [N, H, W] float)."""
    masks, maps = _masks_and_maps(masks, maps)
    _require_both_classes(masks.ravel(), "pixel AUROC", unit="pixels")
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit`, normalised to [0, 1].

    anomalib's implementation: each connected defect region counts equally however small it
    is, so AUPRO rewards finding small defects that pixel AUROC hardly notices. Regions come
    only from the masks; normal images add background pixels (false positives) only.
    """
    # Imported here: anomalib pulls in Lightning and takes seconds to import.
    from anomalib.metrics import AUPRO

    masks, maps = _masks_and_maps(masks, maps)
    if not masks.any():
        raise ValueError(f"masks ({masks.shape[0]} images) have no anomalous pixel; AUPRO needs defect regions")
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    metric = AUPRO(fields=("anomaly_map", "gt_mask"), fpr_limit=fpr_limit)
    # AnomalibMetric reads the named fields off any batch-like object.
    batch = SimpleNamespace(
        anomaly_map=torch.from_numpy(np.ascontiguousarray(maps)), gt_mask=torch.from_numpy(np.ascontiguousarray(masks))
    )
    metric.update(batch)
    return float(metric.compute())


def roc_curve_points(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the image-level ROC curve, for plotting."""
    labels, scores = _labels_and_scores(labels, scores)
    _require_both_classes(labels, "image ROC curve")
    fpr, tpr, thresholds = roc_curve(labels, scores)
    return fpr, tpr, thresholds


def f1_threshold(labels: Any, scores: Any) -> tuple[float, float]:
    """(threshold, F1) for the F1-optimal cut, such that `score > threshold` reproduces it.

    sklearn's curve classifies `score >= cut`; the returned threshold is the midpoint between
    that cut and the next lower score, so the strict convention gives the same labels and new
    images are split half way between the two. Ties in F1 go to the lower cut (higher recall).
    """
    labels, scores = _labels_and_scores(labels, scores)
    _require_both_classes(labels, "F1 threshold")
    precision, recall, cuts = precision_recall_curve(labels, scores)
    precision, recall = precision[: len(cuts)], recall[: len(cuts)]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = int(np.argmax(f1))
    cut = float(cuts[best])
    lower = scores[scores < cut]
    if lower.size == 0:
        return float(np.nextafter(cut, -np.inf)), float(f1[best])
    threshold = (float(lower.max()) + cut) / 2
    if threshold >= cut:  # adjacent floats: the midpoint rounds up to the cut itself
        threshold = float(np.nextafter(cut, -np.inf))
    return threshold, float(f1[best])


def classification_rates(labels: Any, scores: Any, threshold: float) -> dict[str, float]:
    """False positive and false negative rates of `score > threshold`.

    A rate whose class is absent (e.g. a folder of normal images only) is NaN rather than an
    error, so reports on one-class data still get the rate that exists.
    """
    labels, scores = _labels_and_scores(labels, scores)
    flagged = scores > threshold
    n_anomalous = int(labels.sum())
    n_normal = labels.size - n_anomalous
    false_positives = int((flagged & ~labels).sum())
    false_negatives = int((~flagged & labels).sum())
    return {
        "false_positive_rate": false_positives / n_normal if n_normal else float("nan"),
        "false_negative_rate": false_negatives / n_anomalous if n_anomalous else float("nan"),
    }
