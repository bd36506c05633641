"""What a fit leaves in its MLflow child run: the per-image scores, the ROC curve, a score
histogram and heatmaps of a sample of test images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from padim_core.evaluate import Evaluation
from padim_core.safe_write import write_file


def write_category_artifacts(evaluation: Evaluation, category: str, folder: Path, heatmap_examples: int) -> None:
    """The child run's pictures and table: `scores.parquet`, `roc_curve.png`,
    `score_histogram.png` and `heatmaps/<defect>_<image>.png` for a sample of normal and
    defective test images, all on one colour scale."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from padim_core.metrics import roc_curve_points
    from padim_core.viz import (
        heatmap_overlay,
        roc_curve_figure,
        save_png,
        score_histogram_figure,
    )

    folder.mkdir(parents=True, exist_ok=True)
    model, labels, scores = evaluation.model, evaluation.labels, evaluation.scores
    threshold = model.threshold_
    flagged = model.is_anomalous(scores).tolist() if threshold is not None else [None] * len(scores)
    calibration = model.calibration_
    conformal = calibration is not None and calibration.is_conformal
    p_values = calibration.p_values(scores).tolist() if conformal else [None] * len(scores)
    table = pa.table({
        "source": pa.array([str(path) for path in evaluation.sources], pa.string()),
        "category": pa.array([category] * len(scores), pa.string()),
        "detector": pa.array([model.kind] * len(scores), pa.string()),
        "defect": pa.array(evaluation.defects, pa.string()),
        "label": pa.array(labels.astype(np.int8), pa.int8()),
        "image_score": pa.array(scores.astype(np.float32), pa.float32()),
        "p_value": pa.array(p_values, pa.float64()),
        "is_anomalous": pa.array(flagged, pa.bool_()),
        "threshold": pa.array([threshold] * len(scores), pa.float64()),
    })
    write_file(folder / "scores.parquet", lambda path: pq.write_table(table, path))
    if len(scores) == 0:
        return
    if evaluation.metrics["image_auroc"] is not None:
        fpr, tpr, _ = roc_curve_points(labels, scores)
        save_png(folder / "roc_curve.png", roc_curve_figure(fpr, tpr, evaluation.metrics["image_auroc"], f"{category}: image ROC"))
    groups = {defect: scores[[d == defect for d in evaluation.defects]] for defect in dict.fromkeys(evaluation.defects)}
    save_png(folder / "score_histogram.png", score_histogram_figure(groups, threshold, f"{category}: test image scores"))
    vmin = model.score_stats_.get("map_min", float(evaluation.maps.min()))
    vmax = model.score_stats_.get("map_max", float(evaluation.maps.max()))
    for index in heatmap_sample(labels, heatmap_examples):
        source = evaluation.sources[index]
        overlay = heatmap_overlay(
            model.transform.to_array(source), evaluation.maps[index],
            evaluation.masks[index] if labels[index] else None, vmin=vmin, vmax=vmax,
        )
        save_png(folder / "heatmaps" / f"{evaluation.defects[index]}_{Path(source).stem}.png", overlay)


def heatmap_sample(labels: np.ndarray, count: int) -> list[int]:
    """Indices of up to `count` test images, half normal and half defective (the rest from
    whichever group has more), evenly spread over each group so several defect types show."""
    groups = [np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)]
    wanted = [min(count // 2, len(groups[0])), 0]
    wanted[1] = min(count - wanted[0], len(groups[1]))
    wanted[0] = min(count - wanted[1], len(groups[0]))
    chosen = []
    for group, n in zip(groups, wanted):
        if n:
            chosen.extend(int(group[i]) for i in np.linspace(0, len(group) - 1, n).round().astype(int))
    return sorted(set(chosen))
