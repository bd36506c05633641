"""Scoring batches of images with any detector: the one path from pixels to decisions.

Every caller - evaluation, the domain-shift report, the scoring actors of jobs.score and the
MLflow pyfunc model - turns its images into uint8 pixels at the model's input size and calls
`score_batch`, so a score means the same wherever it was computed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from padim_core.detector import Detector
from padim_core.errors import ImageDecodeError
from padim_core.images import ImageSource, ImageTransform
from padim_core.loader import iter_image_batches


@dataclass(frozen=True)
class BatchScores:
    """A scored batch: scores, maps and, when the model is calibrated, the decisions and (for a
    conformal calibration) the p-values they agree with."""

    scores: np.ndarray  # [B] float32
    maps: torch.Tensor  # [B, H, W] float32, on the CPU
    is_anomalous: np.ndarray | None  # [B] bool; None when the model has no threshold
    p_values: np.ndarray | None = None  # [B] float64; None unless the calibration is conformal

    def __len__(self) -> int:
        return len(self.scores)


def score_batch(detector: Detector, pixels: torch.Tensor) -> BatchScores:
    """Score uint8 pixels `[B, 3, H, W]` at the detector's input size."""
    scores, maps = detector.predict(pixels)
    values = scores.numpy()
    calibration = detector.calibration_
    flagged = None if calibration is None else calibration.is_anomalous(values)
    p_values = calibration.p_values(values) if calibration is not None and calibration.is_conformal else None
    return BatchScores(values, maps, flagged, p_values)


def decode_each(transform: ImageTransform, sources: Sequence[ImageSource], names: Sequence[str] | None = None
                ) -> tuple[torch.Tensor | None, list[int], dict[int, str]]:
    """Decode what can be decoded: (pixels of the decoded ones, their indices, index -> error)."""
    pixels, decoded, errors = [], [], {}
    for index, source in enumerate(sources):
        try:
            pixels.append(transform.to_pixels(source, name=names[index] if names else None))
            decoded.append(index)
        except ImageDecodeError as error:
            errors[index] = str(error)
        except (OSError, TypeError) as error:
            errors[index] = f"cannot decode image {names[index] if names else source!r}: {error}"
    return (torch.stack(pixels) if pixels else None), decoded, errors


def score_files(detector: Detector, sources: Sequence[ImageSource], batch_size: int = 32, workers: int = 2
                ) -> Iterator[tuple[list[ImageSource], BatchScores]]:
    """Decode in background threads and score, a batch at a time; a bad image raises."""
    for chunk, pixels in iter_image_batches(sources, detector.transform.to_pixels, batch_size, workers):
        yield chunk, score_batch(detector, pixels)


def score_all(detector: Detector, sources: Sequence[ImageSource], batch_size: int = 32, workers: int = 2
              ) -> tuple[np.ndarray, np.ndarray]:
    """Scores `[N]` and maps `[N, H, W]` of every source, in order."""
    scores, maps = [], []
    for _, batch in score_files(detector, sources, batch_size, workers):
        scores.append(batch.scores)
        maps.append(batch.maps.numpy())
    height, width = detector.image_size
    if not scores:
        return np.zeros(0, np.float32), np.zeros((0, height, width), np.float32)
    return np.concatenate(scores), np.concatenate(maps)
