"""Fit one category on its normal images, score its test split, report accuracy and speed.

    padim-evaluate CATEGORY_DIR [--config FILE] [--detector KIND] [--backbone NAME]
                   [--image-size N] [--device cpu|cuda|auto] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from padim_core import safe_write
from padim_core.calibration import Calibration
from padim_core.command_line import command_parser
from padim_core.config import ExperimentConfig, config_from_dict, read_values
from padim_core.datasets import MvtecCategory
from padim_core.detector import Detector
from padim_core.errors import PadimError
from padim_core.images import load_mask
from padim_core.loader import image_batches
from padim_core.metrics import (
    aupro,
    f1_threshold,
    image_auroc,
    pixel_auroc,
    quantile_threshold,
)
from padim_core.scoring import score_all

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """A fitted, calibrated detector with its test-split figures and per-image results."""

    model: Detector
    metrics: dict[str, float | int | str | None]
    sources: list[Path]
    defects: list[str]
    labels: np.ndarray
    scores: np.ndarray
    maps: np.ndarray  # [N, H, W] float32
    masks: np.ndarray  # [N, H, W] bool; all False where there is no mask


def fit_detector(model: Detector, images: Sequence[Path], batch_size: int, workers: int) -> float:
    """Fit on image files (decoded in background threads); returns the seconds it took."""
    start = time.perf_counter()
    model.fit(image_batches(images, model.transform.to_pixels, batch_size, workers))
    return time.perf_counter() - start


def evaluate_category(category: MvtecCategory, config: ExperimentConfig, device: str | None = None,
                      kind: str | None = None) -> Evaluation:
    """Fit on `train/good`, then score and calibrate on the test split when there is one."""
    reset_peak_rss()
    model = config.build_detector(kind, device)
    batch_size, workers = config.data.batch_size, config.data.num_workers
    log.info("%s: fitting %s on %d images", category.name, model.kind, len(category.train_images))
    fit_seconds = fit_detector(model, category.train_images, batch_size, workers)
    samples = list(category.test_samples)
    sources = [sample.path for sample in samples]
    started = time.perf_counter()
    scores, maps = score_all(model, sources, batch_size, workers)
    predict_seconds = time.perf_counter() - started
    labels = np.array([sample.label for sample in samples], dtype=np.int64)
    masks = np.zeros(maps.shape, dtype=bool)
    for i, sample in enumerate(samples):
        masks[i] = load_mask(sample.mask_path, model.image_size)
    metrics: dict[str, float | int | str | None] = {
        "image_auroc": None,
        "pixel_auroc": None,
        "aupro": None,
        "threshold": None,
        "threshold_method": None,
        "n_train": len(category.train_images),
        "n_test": len(samples),
        "fit_seconds": fit_seconds,
        "fit_images_per_second": len(category.train_images) / fit_seconds,
        "predict_images_per_second": len(samples) / predict_seconds if samples else None,
        "model_size_mb": len(model.to_bytes()) / 1e6,
    }
    normal = scores[labels == 0]
    if len(normal):
        quantile = config.calibration.threshold_quantile
        metrics.update(threshold=quantile_threshold(normal, quantile), threshold_method=f"quantile {quantile} of normal test scores")
    if len(normal) and (labels == 1).any():
        metrics["image_auroc"] = image_auroc(labels, scores)
        threshold, _ = f1_threshold(labels, scores)
        metrics.update(threshold=threshold, threshold_method="F1-optimal on the test split")
        # Defective images without a ground-truth mask cannot be judged pixel by pixel.
        judged = (labels == 0) | np.array([sample.mask_path is not None for sample in samples])
        if masks[judged].any():
            metrics["pixel_auroc"] = pixel_auroc(masks[judged], maps[judged])
            metrics["aupro"] = aupro(masks[judged], maps[judged])
    if metrics["threshold"] is not None:
        calibration = Calibration(str(metrics["threshold_method"]), float(metrics["threshold"]), tuple(sorted(map(float, normal))))
        model.calibrate(
            calibration,
            normal_score_mean=float(normal.mean()),
            normal_score_max=float(normal.max()),
            map_min=float(maps.min()),
            map_max=float(maps.max()),
        )
    metrics["peak_rss_mb"] = peak_rss_mb()
    return Evaluation(model, metrics, sources, [s.defect for s in samples], labels, scores, maps, masks)


def reset_peak_rss() -> None:
    """Start the peak below from now (Linux: clear_refs 5 resets VmHWM), so a long-lived worker
    process reports the peak of its current task; elsewhere the peak stays the process's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (since `reset_peak_rss`, where it works).

    Read from /proc's VmHWM where there is one: unlike `ru_maxrss`, it is not inherited from the
    parent across fork and exec, so a benchmark's child process reports only its own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = command_parser(
        "padim-evaluate",
        "Fit one detector on a category's train/good images, score its test split, and print image AUROC, pixel "
        "AUROC, AUPRO, the threshold and fit/predict speed. Runs in this process (no Ray, no MLflow); sections of "
        "the config that belong to the jobs are not read. Exit 0: done; 1: failed; 2: bad arguments or data.",
        "padim-evaluate ../shared/data/mvtec_ad/bottle --config configs/demo.yaml --image-size 256",
    )
    parser.add_argument("category_dir", type=Path, help="an MVTec AD category folder (train/good, test/<defect>)")
    parser.add_argument("--config", type=Path, help="experiment YAML (default: built-in defaults)")
    parser.add_argument("--detector", help="detector kind (overrides the config's detector)")
    parser.add_argument("--backbone", help="override the detector's backbone (its default layers are used)")
    parser.add_argument("--image-size", type=int, help="override the detector's image_size")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        overrides = [f"detector={args.detector}"] if args.detector else []
        values = read_values(args.config, overrides)
        kind = values.get("detector", "padim")
        if args.backbone:
            overrides += [f"{kind}.backbone={args.backbone}", f"{kind}.layers=null"]
        if args.image_size:
            overrides.append(f"{kind}.image_size={args.image_size}")
        values = read_values(args.config, overrides)
        core = {name for name in ExperimentConfig.__dataclass_fields__}
        others = sorted(set(values) - core)
        if others:
            log.info("not read by padim-evaluate (they configure the jobs): %s", ", ".join(others))
        config = config_from_dict(values, ExperimentConfig, others=others)
        category = MvtecCategory.from_folder(args.category_dir)
    except PadimError as error:
        print(f"padim-evaluate: error: {error}", file=sys.stderr)
        return 2
    try:
        evaluation = evaluate_category(category, config, args.device)
    except PadimError as error:
        print(f"padim-evaluate: failed: {error}", file=sys.stderr)
        return 1
    figures = evaluation.metrics
    width = max(map(len, figures))
    for key, value in figures.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if args.json:
        safe_write.write_file(args.json, json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
