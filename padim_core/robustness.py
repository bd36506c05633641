"""How a fitted model holds up under domain shift: its test split scored under every shift.

The test images are decoded and resized once, kept as uint8 at the model's input size, and
each shifted variant goes through `scoring.score_batch` as the unshifted images do in
`padim_core.evaluate`, so severity 0 gives the unshifted figures exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from padim_core.datasets import MvtecCategory
from padim_core.detector import Detector
from padim_core.errors import DatasetError
from padim_core.images import ImageTransform, load_mask
from padim_core.loader import iter_image_batches
from padim_core.metrics import classification_rates, image_auroc, pixel_auroc
from padim_core.scoring import score_batch
from padim_core.shifts import apply_shift, image_seed

FIGURES = ("image_auroc", "pixel_auroc", "false_positive_rate", "false_negative_rate")
"""What is measured for every shift and severity (None where the test split cannot tell)."""


@dataclass(frozen=True)
class TestSplit:
    """A category's test images at the model's input size, decoded once."""

    images: torch.Tensor  # [N, 3, H, W] uint8
    masks: torch.Tensor  # [N, H, W] bool; all False for normal images
    labels: np.ndarray  # [N] 0 normal, 1 defective
    judged: np.ndarray  # [N] bool: pixels can be judged (normal, or defective with a mask)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ShiftFigures:
    """The figures of one shift at one severity (severity 0: no shift, level None)."""

    shift: str
    severity: int
    level: float | None
    image_auroc: float | None
    pixel_auroc: float | None
    false_positive_rate: float | None
    false_negative_rate: float | None


def decode_images(paths: Sequence[Any], transform: ImageTransform, batch_size: int, workers: int) -> torch.Tensor:
    """`[N, 3, H, W]` uint8 pixels of `paths` as `transform` sizes them, decoded once to be shifted many times."""
    return torch.cat([batch for _, batch in iter_image_batches(paths, transform.to_pixels, batch_size, workers)])


def load_test_split(category: MvtecCategory, transform: ImageTransform, batch_size: int, workers: int) -> TestSplit:
    """The test split of `category` as `transform` sizes it, in `test_samples` order."""
    samples = list(category.test_samples)
    if not samples:
        raise DatasetError(f"category {category.name!r} has no test images under {category.root / 'test'}")
    images = decode_images([s.path for s in samples], transform, batch_size, workers)
    masks = torch.from_numpy(np.stack([load_mask(s.mask_path, transform.image_size) for s in samples]))
    labels = np.array([s.label for s in samples], dtype=np.int64)
    judged = (labels == 0) | np.array([s.mask_path is not None for s in samples])
    return TestSplit(images, masks, labels, judged)


def score_variant(
    model: Detector, split: TestSplit, batch_size: int, *,
    shift: str | None = None, level: float = 0.0, severity: int = 0, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Scores `[N]`, maps `[N, H, W]` and the (moved) masks of the split under one shift, or none."""
    scores, maps, masks = [], [], []
    for start in range(0, len(split), batch_size):
        images, batch_masks = split.images[start : start + batch_size], split.masks[start : start + batch_size]
        if shift is not None:
            seeds = [image_seed(seed, shift, severity, index) for index in range(start, start + len(images))]
            images, batch_masks = apply_shift(shift, level, images, batch_masks, seeds)
        scored = score_batch(model, images)
        scores.append(scored.scores)
        maps.append(scored.maps.numpy())
        masks.append(batch_masks)
    return np.concatenate(scores), np.concatenate(maps), torch.cat(masks)


def split_figures(
    split: TestSplit, scores: np.ndarray, maps: np.ndarray, masks: torch.Tensor, threshold: float | None
) -> dict[str, float | None]:
    """Image and pixel AUROC, and the error rates at `threshold`, as far as the split allows."""
    labels = split.labels
    both = bool((labels == 0).any() and (labels == 1).any())
    judged_masks = masks.numpy()[split.judged]
    figures: dict[str, float | None] = dict.fromkeys(FIGURES)
    if both:
        figures["image_auroc"] = image_auroc(labels, scores)
        if judged_masks.any():
            figures["pixel_auroc"] = pixel_auroc(judged_masks, maps[split.judged])
    if threshold is not None:
        rates = classification_rates(labels, scores, threshold)
        figures.update({key: None if np.isnan(value) else value for key, value in rates.items()})
    return figures


def evaluate_shifts(
    model: Detector,
    split: TestSplit,
    shifts: Mapping[str, Sequence[float]],
    seed: int,
    batch_size: int,
    progress: Callable[[ShiftFigures], None] | None = None,
) -> list[ShiftFigures]:
    """Every shift at severity 0 (unshifted, scored once) and at each of its levels."""
    threshold = model.threshold_
    baseline = split_figures(split, *score_variant(model, split, batch_size), threshold)
    results = [ShiftFigures(name, 0, None, **baseline) for name in shifts]
    if progress and results:
        progress(results[0])
    for name, levels in shifts.items():
        for severity, level in enumerate(levels, start=1):
            scores, maps, masks = score_variant(
                model, split, batch_size, shift=name, level=level, severity=severity, seed=seed
            )
            result = ShiftFigures(name, severity, float(level), **split_figures(split, scores, maps, masks, threshold))
            results.append(result)
            if progress:
                progress(result)
    return results


@dataclass(frozen=True)
class Verdict:
    """How one shift affects one category."""

    shift: str
    ranking_breaks_at: int | None  # first severity where an AUROC fell more than the tolerance
    threshold_breaks_at: int | None  # first severity where FPR or FNR rose more than the tolerance
    image_auroc_drop: float | None  # at ranking_breaks_at, else at the strongest level


def _drop(row: Mapping[str, Any], baseline: Mapping[str, Any], key: str) -> float | None:
    return None if row[key] is None or baseline[key] is None else baseline[key] - row[key]


def _exceeds(value: float | None, tolerance: float) -> bool:
    return value is not None and value > tolerance


def verdicts(rows: Sequence[Mapping[str, Any]], tolerance: float) -> list[Verdict]:
    """One verdict per shift in `rows` (one model's `ShiftFigures` as dicts), the first to break first.

    A shift breaks ranking at the first severity where the image or pixel AUROC falls more than
    `tolerance` below the unshifted figure, and breaks the threshold at the first severity where
    the false-positive or false-negative rate rises more than `tolerance` above it."""
    by_shift: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_shift.setdefault(row["shift"], []).append(row)
    found = []
    for shift, shift_rows in by_shift.items():
        ordered = sorted(shift_rows, key=lambda row: row["severity"])
        baseline, shifted = ordered[0], ordered[1:]
        ranking = next((row for row in shifted if any(
            _exceeds(_drop(row, baseline, key), tolerance) for key in ("image_auroc", "pixel_auroc"))), None)
        threshold = next((row for row in shifted if any(
            _exceeds(_drop(baseline, row, key), tolerance) for key in ("false_positive_rate", "false_negative_rate"))), None)
        judged = ranking or (shifted[-1] if shifted else baseline)
        found.append(Verdict(
            shift, ranking and ranking["severity"], threshold and threshold["severity"], _drop(judged, baseline, "image_auroc"),
        ))
    never = float("inf")
    return sorted(found, key=lambda v: (v.ranking_breaks_at or never, -(v.image_auroc_drop or 0.0), v.threshold_breaks_at or never))
