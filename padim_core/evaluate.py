"""Fit one category on its normal images, calibrate on held-out ones, judge on its test split.

    padim-evaluate CATEGORY_DIR [--config FILE] [--detector KIND] [--backbone NAME]
                   [--image-size N] [--device cpu|cuda|auto] [--json OUT] [--manifest OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from padim_core import safe_write
from padim_core.calibration import Calibration, resolve_false_alarm_rate
from padim_core.command_line import command_parser
from padim_core.config import ExperimentConfig, config_from_dict, read_values
from padim_core.datasets import MvtecCategory
from padim_core.detector import Detector, detector_class
from padim_core.errors import PadimError
from padim_core.images import load_mask
from padim_core.loader import image_batches
from padim_core.manifest import SplitManifest
from padim_core.metrics import aupro, f1_threshold, image_auroc, pixel_auroc
from padim_core.scoring import score_all

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """A fitted, calibrated detector with its split, its test-split figures and per-image results."""

    model: Detector
    split: SplitManifest
    metrics: dict[str, float | int | str | None]
    sources: list[Path]
    defects: list[str]
    labels: np.ndarray
    scores: np.ndarray
    maps: np.ndarray  # [N, H, W] float32
    masks: np.ndarray  # [N, H, W] bool; all False where there is no mask


FitFunction = Callable[[Detector, list[Path]], None]
"""Fits a detector on image files in place (the fit job's is sharded over Ray tasks)."""


def fit_detector(model: Detector, images: Sequence[Path], batch_size: int, workers: int) -> None:
    """Fit on image files, decoded in background threads."""
    model.fit(image_batches(images, model.transform.to_pixels, batch_size, workers))


def evaluate_category(category: MvtecCategory, config: ExperimentConfig, device: str | None = None,
                      kind: str | None = None, split: SplitManifest | None = None, *,
                      model: Detector | None = None, fit: FitFunction | None = None) -> Evaluation:
    """Fit on the split's fit images, calibrate on its held-out normal images, judge on its test images.

    `split` defaults to the one the config's `calibration` section describes. `model` (default:
    a new one from the config) is fitted by `fit(model, fit_images)` (default: streamed in this
    process); a given `model` without `fit` is taken as fitted and only calibrated and judged.
    The test split plays no part in the model: the threshold is conformal on the calibration
    images, and the F1-optimal cut on the test split is reported as `oracle_f1_threshold` only.
    """
    reset_peak_rss()
    fitted = model is not None and fit is None
    model = model or config.build_detector(kind, device)
    split = split or config.calibration.split(category, model.min_fit_images)
    rate, warning = resolve_false_alarm_rate(config.calibration.false_alarm_rate, len(split.calibration))
    if warning:
        log.warning("%s: %s", category.name, warning)
    batch_size, workers = config.data.batch_size, config.data.num_workers
    fit_images = split.paths("fit")
    fit_seconds = None
    if not fitted:
        log.info("%s: fitting %s on %d images (%s)", category.name, model.kind, len(fit_images), split.method)
        started = time.perf_counter()
        (fit or (lambda model, images: fit_detector(model, images, batch_size, workers)))(model, fit_images)
        fit_seconds = time.perf_counter() - started
    normal, normal_maps = score_all(model, split.paths("calibration"), batch_size, workers)
    calibration = Calibration.conformal(normal, rate)
    model.calibrate(calibration, normal_score_mean=float(normal.mean()), normal_score_max=float(normal.max()),
                    map_min=float(normal_maps.min()), map_max=float(normal_maps.max()))
    samples = split.test_samples()
    sources = [sample.path for sample in samples]
    started = time.perf_counter()
    scores, maps = score_all(model, sources, batch_size, workers)
    predict_seconds = time.perf_counter() - started
    labels = np.array([sample.label for sample in samples], dtype=np.int64)
    masks = np.zeros(maps.shape, dtype=bool)
    for i, sample in enumerate(samples):
        masks[i] = load_mask(sample.mask_path, model.image_size)
    flagged = calibration.is_anomalous(scores)
    metrics: dict[str, float | int | str | None] = {
        "image_auroc": None,
        "pixel_auroc": None,
        "aupro": None,
        "threshold": calibration.threshold,
        "threshold_method": f"{calibration.method} on {calibration.count} held-out normal images",
        "false_alarm_rate": calibration.false_alarm_rate,
        "realised_false_alarm_rate": float(flagged[labels == 0].mean()) if (labels == 0).any() else None,
        "recall": float(flagged[labels == 1].mean()) if (labels == 1).any() else None,
        "oracle_f1_threshold": None,
        "n_train": len(fit_images),
        "n_calibration": calibration.count,
        "n_test": len(samples),
        "fit_seconds": fit_seconds,
        "fit_images_per_second": None if fit_seconds is None else len(fit_images) / fit_seconds,
        "predict_images_per_second": len(samples) / predict_seconds if samples else None,
        "model_size_mb": len(model.to_bytes()) / 1e6,
    }
    if (labels == 0).any() and (labels == 1).any():
        metrics["image_auroc"] = image_auroc(labels, scores)
        metrics["oracle_f1_threshold"] = f1_threshold(labels, scores)[0]
        # Defective images without a ground-truth mask cannot be judged pixel by pixel.
        judged = (labels == 0) | np.array([sample.mask_path is not None for sample in samples])
        if masks[judged].any():
            metrics["pixel_auroc"] = pixel_auroc(masks[judged], maps[judged])
            metrics["aupro"] = aupro(masks[judged], maps[judged])
    metrics["peak_rss_mb"] = peak_rss_mb()
    return Evaluation(model, split, metrics, sources, [s.defect for s in samples], labels, scores, maps, masks)


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
        "Fit one detector on a category's train/good images less the held-out calibration images (config section "
        "calibration), set the conformal threshold on those, score the test split, and print image AUROC, pixel "
        "AUROC, AUPRO, the threshold, the realised false-alarm rate and recall at it, and fit/predict speed. Runs in "
        "this process (no Ray, no MLflow); sections of the config that belong to the jobs are not read. Exit 0: "
        "done; 1: failed; 2: bad arguments or data.",
        "padim-evaluate ../shared/data/mvtec_ad/bottle --config configs/demo.yaml --image-size 256",
    )
    parser.add_argument("category_dir", type=Path, help="an MVTec AD category folder (train/good, test/<defect>)")
    parser.add_argument("--config", type=Path, help="experiment YAML (default: built-in defaults)")
    parser.add_argument("--detector", help="detector kind (overrides the config's detector)")
    parser.add_argument("--backbone", help="override the detector's backbone (its default layers are used)")
    parser.add_argument("--image-size", type=int, help="override the detector's image_size")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--manifest", type=Path, help="also write the split manifest (fit, calibration, test files) here")
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
        split = config.calibration.split(category, detector_class(config.detector).min_fit_images)
        resolve_false_alarm_rate(config.calibration.false_alarm_rate, len(split.calibration))
    except PadimError as error:
        print(f"padim-evaluate: error: {error}", file=sys.stderr)
        return 2
    try:
        evaluation = evaluate_category(category, config, args.device, split=split)
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
    if args.manifest:
        split.save(args.manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
