"""Do a batch's images still look like the calibration images? A test on their conformal p-values.

Under no drift, a batch of m normal images is exchangeable with the n calibration images: every
arrangement of the batch's scores among all n + m is equally likely. The batch's p-values are
then fixed by how many batch scores fall in each of the n + 1 gaps between the sorted
calibration scores, and that composition is uniformly distributed over all compositions of m
into n + 1 parts (a Dirichlet-multinomial with all weights 1). Drawing from it gives the exact
null distribution of any statistic of the p-values, for any model, score distribution and batch
size, at a cost that depends on n and not on m.

The statistic is the mean of the batch's p-values after dropping the smallest `trim` share:
drift that makes normal images score higher pulls every p-value down and the mean with it,
while real defects only add small p-values, which are the ones dropped. The test is one-sided
(scores higher than calibrated is what floods a line with false alarms). Its p-value is
(1 + #{draws <= observed}) / (1 + draws), the usual valid Monte Carlo p-value.

Defects are allowed for exactly, not by hope: the null batch holds k = floor(defect_share * m)
images at the smallest p-value there is, 1 / (n + 1), and m - k exchangeable ones. The statistic
never rises when a p-value falls, so any batch with at most k defects (scored however high) and
normal images exchangeable with the calibration ones rings with probability at most alpha, at
any batch size. Without the allowance, dropping a share only roughly hides defects, and the more
calibration scores there are, the more precise the null and the more often defects alone ring.

Everything works on level counts: `counts[l]` images whose score has exactly l calibration
scores at or above it (p-value (1 + l) / (n + 1)), so a streaming job keeps n + 1 integers per
batch rather than its scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from padim_core.calibration import p_value_of

DEFAULT_TRIM = 0.5
DEFAULT_DEFECT_SHARE = 0.1
DEFAULT_ALPHA = 0.01
DEFAULT_DRAWS = 10_000
DEFAULT_MIN_IMAGES = 10
_CHUNK_VALUES = 4_000_000  # draws x levels simulated at a time: bounded memory for large n


@dataclass(frozen=True)
class DriftTest:
    """The verdict on one batch. `statistic`, `p_value` and `alarm` are None when not tested."""

    images: int
    calibration_count: int
    trim: float
    defect_share: float
    alpha: float
    statistic: float | None
    p_value: float | None
    alarm: bool | None
    note: str | None = None  # why it was not tested

    @property
    def verdict(self) -> str:
        if self.alarm is None:
            return f"not tested: {self.note}"
        return "ALARM" if self.alarm else "no alarm"

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "calibration_count": self.calibration_count, "trim": self.trim,
                "defect_share": self.defect_share, "alpha": self.alpha, "statistic": self.statistic,
                "p_value": self.p_value, "alarm": self.alarm, "verdict": self.verdict}


def level_counts(exceeding: Any, count: int) -> np.ndarray:
    """[count + 1] int64: how many images have each number of calibration scores at or above them
    (`Calibration.exceeding`)."""
    values = np.asarray(exceeding, dtype=np.int64).ravel()
    if values.size and (values.min() < 0 or values.max() > count):
        raise ValueError(f"exceeding counts must lie in [0, {count}]")
    return np.bincount(values, minlength=count + 1)


def levels_of_p_values(p_values: Any, count: int) -> np.ndarray:
    """The exceeding count behind each conformal p-value (1 + l) / (count + 1), exactly."""
    return np.rint(np.asarray(p_values, dtype=np.float64) * (count + 1)).astype(np.int64) - 1


def trimmed_mean(counts: np.ndarray, trim: float) -> np.ndarray:
    """The mean p-value after dropping the smallest `floor(trim * m)`, per row of level counts
    `[..., n + 1]` (every row holding the same m images)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = counts.shape[-1] - 1
    images = int(counts.sum(axis=-1).max(initial=0))
    dropped = int(np.floor(trim * images))
    below = np.cumsum(counts, axis=-1)
    before = below - counts
    kept = np.clip(below - np.maximum(before, dropped), 0, None)
    return (kept * p_value_of(np.arange(n + 1), n)).sum(axis=-1) / (images - dropped)


def null_draws(count: int, images: int, draws: int, rng: np.random.Generator, defects: int = 0) -> np.ndarray:
    """[draws, count + 1] level counts of `images - defects` exchangeable with `count` calibration
    scores plus `defects` at the lowest level (above every calibration score)."""
    weights = rng.dirichlet(np.ones(count + 1), size=draws)
    counts = rng.multinomial(images - defects, weights)
    counts[:, 0] += defects
    return counts


def drift_test(counts: Any, count: int, *, trim: float = DEFAULT_TRIM, defect_share: float = DEFAULT_DEFECT_SHARE,
               alpha: float = DEFAULT_ALPHA, draws: int = DEFAULT_DRAWS, seed: int = 0,
               min_images: int = DEFAULT_MIN_IMAGES) -> DriftTest:
    """Test a batch, given as level counts `[count + 1]`, against `count` calibration scores,
    allowing up to `defect_share` of it to be defects."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (count + 1,):
        raise ValueError(f"expected {count + 1} level counts, got shape {counts.shape}")
    if not 0 <= trim < 1:
        raise ValueError(f"trim must be in [0, 1), got {trim}")
    if not 0 <= defect_share < 1:
        raise ValueError(f"defect_share must be in [0, 1), got {defect_share}")
    images = int(counts.sum())
    if images < max(1, min_images):
        return DriftTest(images, count, trim, defect_share, alpha, None, None, None,
                         f"{images} images, fewer than {min_images}")
    defects = int(np.floor(defect_share * images))
    observed = float(trimmed_mean(counts, trim))
    at_or_below = 0
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_VALUES // (count + 1))
    for start in range(0, draws, per_chunk):
        size = min(per_chunk, draws - start)
        simulated = trimmed_mean(null_draws(count, images, size, rng, defects), trim)
        # a tolerance for the different summation order of equal p-value sets
        at_or_below += int((simulated <= observed + 1e-12).sum())
    p_value = (1 + at_or_below) / (1 + draws)
    return DriftTest(images, count, trim, defect_share, alpha, observed, p_value, p_value < alpha)
