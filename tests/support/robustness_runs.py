"""Detector variants fitted on a category's seeded fit split, calibrated on its held-out normal
images and scored unshifted and under shifts: what `bench.bench_robustness` measures and what
`tests/padim_core/test_robustness_defaults.py` checks on a small subset."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from padim_core.anomaly_map import MahalanobisScorer
from padim_core.calibration import Calibration, resolve_false_alarm_rate
from padim_core.config import ExperimentConfig
from padim_core.datasets import MvtecCategory
from padim_core.detector import Detector
from padim_core.images import ImageTransform, load_mask
from padim_core.loader import iter_image_batches
from padim_core.metrics import aupro, classification_rates, image_auroc
from padim_core.padim import PadimModel
from padim_core.robustness import TestSplit, split_figures
from padim_core.shifts import SHIFTS, apply_shift, image_seed

ALPHA = 0.01
HOLD_OUT = 0.2
COVARIANCE_KEYS = ("shrinkage", "regularization", "regularization_scale")
"""PaDiM settings that change only the finalisation: variants differing in these share a fit."""


# ------------------------------------------------------------------------------ data
@dataclass
class Data:
    fit: torch.Tensor  # [n, 3, H, W] uint8
    calibration: torch.Tensor
    split: TestSplit


def decoded(category: MvtecCategory, size: int, cache: Path) -> dict[str, torch.Tensor]:
    """train, test images and masks at `size`, decoded once and cached."""
    path = cache / f"{category.name}-{size}.safetensors"
    if path.is_file():
        return load_file(path)
    transform = ImageTransform((size, size), (0.5,) * 3, (0.5,) * 3)  # only to_pixels is used
    samples = list(category.test_samples)

    def stack(paths: list[Path]) -> torch.Tensor:
        return torch.cat([batch for _, batch in iter_image_batches(paths, transform.to_pixels, 32, 2)])

    tensors = {
        "train": stack(list(category.train_images)),
        "test": stack([s.path for s in samples]),
        "masks": torch.from_numpy(np.stack([load_mask(s.mask_path, (size, size)) for s in samples])),
        "labels": torch.tensor([s.label for s in samples]),
        "has_mask": torch.tensor([s.mask_path is not None for s in samples]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return tensors


def load_data(folder: Path, size: int, cache: Path, seed: int = 0, fit_images: int | None = None) -> Data:
    """The seeded fit / held-out split of `train/good` (the first `fit_images` of the fit part
    only, when given) and the test split."""
    tensors = decoded(MvtecCategory.from_folder(folder), size, cache)
    train = tensors["train"]
    order = np.random.default_rng(seed).permutation(len(train))
    held = round(HOLD_OUT * len(train))
    labels = tensors["labels"].numpy().astype(np.int64)
    judged = (labels == 0) | tensors["has_mask"].numpy().astype(bool)
    split = TestSplit(tensors["test"], tensors["masks"].bool(), labels, judged)
    return Data(train[np.sort(order[held:])[:fit_images]], train[np.sort(order[:held])], split)


def conformal_threshold(scores: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    """(threshold, alpha) of `padim_core.calibration`'s conformal rule: alpha, or the smallest rate
    the count of held-out scores supports when it cannot support alpha (as the fit does)."""
    rate, _ = resolve_false_alarm_rate(None if alpha == ALPHA else alpha, len(scores))
    calibration = Calibration.conformal(scores, rate)
    return calibration.threshold, calibration.false_alarm_rate


# ---------------------------------------------------------------------------- models
@dataclass
class Group:
    """Variants fitted together: one detector, or PaDiM variants sharing their running sums."""

    names: list[str]
    configs: list[ExperimentConfig]
    models: list[Detector] = field(default_factory=list)
    scorers: list[Any] = field(default_factory=list)
    fit_seconds: list[float] = field(default_factory=list)

    def fit(self, images: torch.Tensor, batch_size: int) -> None:
        batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        first = self.configs[0].build_detector(device="cpu")
        started = time.perf_counter()
        if isinstance(first, PadimModel):
            accumulator = first.accumulate(batches)
            shared = time.perf_counter() - started
            for config in self.configs:
                began = time.perf_counter()
                model = first if config is self.configs[0] else config.build_detector(device="cpu")
                model.fit_accumulator(accumulator)
                self.models.append(model)
                self.fit_seconds.append(shared + time.perf_counter() - began)
                self.scorers.append(MahalanobisScorer(model.mean_, model.inv_covariance_, model.grid_shape_,
                                                      model.image_size, model.blur_sigma))
        else:
            self.models.append(first.fit(batches))
            self.fit_seconds.append(time.perf_counter() - started)

    def score(self, images: torch.Tensor, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per variant: scores `[N]` and maps `[N, H, W]`."""
        outputs: list[tuple[list, list]] = [([], []) for _ in self.models]
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            if self.scorers:
                embedding = self.models[0].embed(batch)
                with torch.inference_mode():
                    results = [scorer(embedding) for scorer in self.scorers]
            else:
                results = [model.predict(batch) for model in self.models]
            for (scores, maps), (s, m) in zip(outputs, results):
                scores.append(s.float().numpy())
                maps.append(m.float().numpy())
        return [(np.concatenate(s), np.concatenate(m)) for s, m in outputs]


def groups_of(variants: dict[str, ExperimentConfig]) -> list[Group]:
    found: dict[str, Group] = {}
    for name, config in variants.items():
        values = config.to_dict()
        if config.detector == "padim":
            for key in COVARIANCE_KEYS:
                values["padim"].pop(key)
        key = json.dumps({"detector": config.detector, config.detector: values[config.detector]}, sort_keys=True)
        group = found.setdefault(key, Group([], []))
        group.names.append(name)
        group.configs.append(config)
    return list(found.values())


# ---------------------------------------------------------------------------- figures
def shifted_splits(split: TestSplit, shifts: list[str], severities: list[int], seed: int = 0
                   ) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    variants = {}
    for name in shifts:
        levels = SHIFTS[name].default_levels
        for severity in severities:
            seeds = [image_seed(seed, name, severity, index) for index in range(len(split))]
            variants[name, severity] = apply_shift(name, levels[severity - 1], split.images, split.masks, seeds)
    return variants


def evaluate_group(group: Group, data: Data, variants: dict, batch_size: int, pixels: bool) -> list[dict[str, Any]]:
    """Every variant's figures; pixel AUROC under shift only with `pixels` (it costs more than the scoring)."""
    split = data.split
    normal = split.labels == 0
    results = []
    for i, ((calibration, _), (scores, maps)) in enumerate(zip(group.score(data.calibration, batch_size),
                                                              group.score(split.images, batch_size))):
        threshold, alpha = conformal_threshold(calibration)
        base = split_figures(split, scores, maps, split.masks, threshold)
        results.append({
            "variant": group.names[i], "fit_seconds": group.fit_seconds[i], "threshold": threshold, "alpha": alpha,
            "calibration_count": len(calibration),
            "image_auroc": base["image_auroc"], "pixel_auroc": base["pixel_auroc"],
            "aupro": aupro(split.masks.numpy()[split.judged], maps[split.judged]),
            "false_alarm_rate": base["false_positive_rate"], "recall": 1 - base["false_negative_rate"],
            "normal_score_median": float(np.median(scores[normal])), "shifts": {},
        })
    for (shift, severity), (images, masks) in variants.items():
        for figures, (scores, maps) in zip(results, group.score(images, batch_size)):
            if pixels:
                row = split_figures(split, scores, maps, masks, figures["threshold"])
            else:
                row = {"image_auroc": image_auroc(split.labels, scores), "pixel_auroc": None,
                       **classification_rates(split.labels, scores, figures["threshold"])}
            figures["shifts"][f"{shift}/{severity}"] = {
                "image_auroc": row["image_auroc"], "pixel_auroc": row["pixel_auroc"],
                "false_alarm_rate": row["false_positive_rate"],
            }
    return results


