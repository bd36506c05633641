"""Fit one category on its normal images, score its test split, report accuracy and speed.

    python -m padim_core.evaluate CATEGORY_DIR [--config FILE] [--backbone NAME]
                                  [--image-size N] [--json OUT]
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

from padim_core.config import ExperimentConfig, load_config
from padim_core.datasets import MvtecCategory
from padim_core.images import load_mask
from padim_core.loader import image_batches, iter_image_batches
from padim_core.metrics import aupro, f1_threshold, image_auroc, pixel_auroc, quantile_threshold
from padim_core.model import PadimModel

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """A fitted, calibrated model with its test-split figures and per-image results."""

    model: PadimModel
    metrics: dict[str, float | int | str | None]
    sources: list[Path]
    defects: list[str]
    labels: np.ndarray
    scores: np.ndarray
    maps: np.ndarray  # [N, H, W] float32
    masks: np.ndarray  # [N, H, W] bool; all False where there is no mask


def build_model(config: ExperimentConfig, device: str | None = None) -> PadimModel:
    padim = config.padim
    return PadimModel(
        backbone=padim.backbone,
        layers=padim.layers,
        n_features=padim.n_features,
        image_size=padim.image_size,
        seed=padim.seed,
        regularization=padim.regularization,
        blur_sigma=padim.blur_sigma,
        pretrained=padim.pretrained,
        device=device or config.fit.device,
    )


def fit_model(model: PadimModel, images: Sequence[Path], batch_size: int, workers: int) -> float:
    """Fit on image files (decoded in background threads); returns the seconds it took."""
    start = time.perf_counter()
    model.fit(image_batches(images, model.transform, batch_size, workers))
    return time.perf_counter() - start


def score_files(
    model: PadimModel, images: Sequence[Path], batch_size: int, workers: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Scores `[N]`, maps `[N, H, W]` and the seconds it took, decoding included."""
    start = time.perf_counter()
    scores, maps = [], []
    for _, batch in iter_image_batches(images, model.transform, batch_size, workers):
        batch_scores, batch_maps = model.predict(batch)
        scores.append(batch_scores.numpy())
        maps.append(batch_maps.numpy())
    seconds = time.perf_counter() - start
    height, width = model.image_size
    if not scores:
        return np.zeros(0, np.float32), np.zeros((0, height, width), np.float32), seconds
    return np.concatenate(scores), np.concatenate(maps), seconds


def evaluate_category(category: MvtecCategory, config: ExperimentConfig, device: str | None = None) -> Evaluation:
    """Fit on `train/good`, then score and calibrate on the test split when there is one."""
    model = build_model(config, device)
    batch_size, workers = config.data.batch_size, config.data.num_workers
    log.info("%s: fitting on %d images", category.name, len(category.train_images))
    fit_seconds = fit_model(model, category.train_images, batch_size, workers)
    samples = list(category.test_samples)
    sources = [sample.path for sample in samples]
    scores, maps, predict_seconds = score_files(model, sources, batch_size, workers)
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
    }
    normal = scores[labels == 0]
    if len(normal):
        quantile = quantile_threshold(normal, config.fit.threshold_quantile)
        metrics.update(threshold=quantile, threshold_method=f"quantile {config.fit.threshold_quantile} of normal test scores")
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
        model.calibrate(
            metrics["threshold"],
            normal_score_mean=float(normal.mean()),
            normal_score_max=float(normal.max()),
            map_min=float(maps.min()),
            map_max=float(maps.max()),
        )
    return Evaluation(model, metrics, sources, [s.defect for s in samples], labels, scores, maps, masks)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m padim_core.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("category_dir", type=Path, help="an MVTec AD category folder (train/good, test/<defect>)")
    parser.add_argument("--config", type=Path, help="experiment YAML (default: built-in defaults)")
    parser.add_argument("--backbone", help="override padim.backbone (its default layers are used)")
    parser.add_argument("--image-size", type=int, help="override padim.image_size")
    parser.add_argument("--device", help="cpu, cuda or auto (default: the config's fit.device)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = []
    if args.backbone:
        overrides += [f"padim.backbone={args.backbone}", "padim.layers=null"]
    if args.image_size:
        overrides.append(f"padim.image_size={args.image_size}")
    try:
        config = load_config(args.config, overrides)
        category = MvtecCategory.from_folder(args.category_dir)
        evaluation = evaluate_category(category, config, args.device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    figures = dict(evaluation.metrics, peak_rss_mb=peak_rss_mb())
    width = max(map(len, figures))
    for key, value in figures.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
