"""How an evaluated (category, detector) is reported, the same way by padim-fit and padim-update:
its MLflow metric names, what it leaves in its child run (the per-image scores, the ROC curve, a
score histogram and heatmaps of a sample of test images) and its line in the summary table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jobs.common.runner import TaskResult
from padim_core.evaluate import Evaluation
from padim_core.safe_write import write_file

METRICS = {
    "image_auroc": "image_auroc", "pixel_auroc": "pixel_auroc", "aupro": "aupro", "threshold": "threshold",
    "false_alarm_rate": "false_alarm_rate", "realised_false_alarm_rate": "realised_false_alarm_rate",
    "recall": "recall", "oracle_f1_threshold": "oracle_f1_threshold",
    "fit_seconds": "fit_seconds", "images_per_second": "fit_images_per_second",
    "predict_images_per_second": "predict_images_per_second", "model_size_mb": "model_size_mb",
    "peak_rss_mb": "peak_rss_mb",
}
"""MLflow metric name -> evaluation figure: the same names for every category and detector."""


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


def format_table(results: Sequence[TaskResult]) -> str:
    """One line per (category, detector), then the failure reasons, so it fits one screen: the
    threshold with the false-alarm rate it was calibrated for (alpha), the rate realised on the
    normal test images and the recall at it."""
    columns = [
        ("category", "category", "<", None), ("detector", "detector", "<", None), ("status", "status", "<", None),
        ("fit", "n_train", ">", "d"), ("test", "n_test", ">", "d"),
        ("img AUROC", "image_auroc", ">", ".3f"), ("px AUROC", "pixel_auroc", ">", ".3f"),
        ("AUPRO", "aupro", ">", ".3f"), ("threshold", "threshold", ">", ".4g"), ("alpha", "false_alarm_rate", ">", ".3g"),
        ("FA rate", "realised_false_alarm_rate", ">", ".3f"), ("recall", "recall", ">", ".3f"),
        ("img/s", "fit_images_per_second", ">", ".1f"),
    ]

    def cell(result: TaskResult, key: str, spec: str | None) -> str:
        value = getattr(result, key) if key in ("category", "detector", "status") else result.values.get(key)
        if value is None:
            return "-"
        return format(value, spec) if spec else str(value)

    rows = [[cell(result, key, spec) for _, key, _, spec in columns] for result in results]
    widths = [max(len(title), *(len(row[i]) for row in rows)) for i, (title, *_) in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{text:{align}{width}}" for text, width, (_, _, align, _) in zip(cells, widths, columns)).rstrip()

    lines = [line([title for title, *_ in columns]), line(["-" * width for width in widths])]
    lines += [line(row) for row in rows]
    failures = [result for result in results if not result.ok]
    if failures:
        lines.append("")
        lines += [f"{result.label} failed: {result.error}" for result in failures]
    return "\n".join(lines)
