"""The decision threshold, what it was computed from, and conformal p-values.

An image is anomalous when its score is strictly above the threshold. A `Calibration` keeps the
sorted normal scores the threshold came from, so the decision can be explained (and p-values
computed) wherever the model goes.

Conformal calibration (Vovk et al.; Bates, Candès et al., "Testing for outliers with conformal
p-values", 2023): with n held-out normal scores and a false-alarm rate alpha, the threshold is
the k-th smallest of them, k = ceil((n + 1)(1 - alpha)). A new normal image exchangeable with
the calibration images then scores above it with probability at most alpha, whatever the model
and the score distribution. Its p-value is (1 + #{calibration scores >= score}) / (n + 1), and
`p_value <= alpha` holds exactly when `score > threshold`: both are computed here from the same
count, so they cannot disagree.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from padim_core.errors import ConfigError, ModelFileError

MAX_SCORES = 100_000
"""Calibration scores kept in a model file at most: they travel in its JSON header."""

CONFORMAL = "conformal"
DEFAULT_FALSE_ALARM_RATE = 0.01


@dataclass(frozen=True)
class Calibration:
    """A threshold, how it was chosen and on which normal scores."""

    method: str
    threshold: float
    scores: tuple[float, ...]  # sorted ascending
    false_alarm_rate: float | None = None

    @classmethod
    def conformal(cls, scores: Any, false_alarm_rate: float) -> Calibration:
        """The conformal threshold of held-out normal `scores` for `false_alarm_rate` (alpha)."""
        ordered = np.sort(np.asarray(scores, dtype=np.float64).ravel())
        if not np.isfinite(ordered).all():
            raise ValueError(f"calibration scores hold {int((~np.isfinite(ordered)).sum())} NaN or infinite values")
        if len(ordered) > MAX_SCORES:
            raise ValueError(f"{len(ordered)} calibration scores; a model file keeps at most {MAX_SCORES}")
        rank = conformal_rank(len(ordered), false_alarm_rate)
        return cls(CONFORMAL, float(ordered[rank - 1]), tuple(map(float, ordered)), float(false_alarm_rate))

    @property
    def count(self) -> int:
        return len(self.scores)

    @property
    def is_conformal(self) -> bool:
        return self.method == CONFORMAL and self.false_alarm_rate is not None

    def is_anomalous(self, scores: Any) -> np.ndarray:
        return np.asarray(scores, dtype=np.float64) > self.threshold

    def exceeding(self, scores: Any) -> np.ndarray:
        """#{calibration scores >= score} for each score (int64): what a p-value counts."""
        values = np.asarray(scores, dtype=np.float64)
        return self.count - np.searchsorted(np.asarray(self.scores), values, side="left")

    def p_values(self, scores: Any) -> np.ndarray:
        """Conformal p-values (float64): small when a score is high among the calibration scores."""
        return p_value_of(self.exceeding(scores), self.count)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "threshold": self.threshold, "false_alarm_rate": self.false_alarm_rate,
            "count": self.count, "scores": list(self.scores),
        }

    @classmethod
    def from_dict(cls, values: Any, where: str) -> Calibration:
        """Validate a model file's `calibration` entry; `where` names the file in errors."""
        if not isinstance(values, Mapping):
            raise ModelFileError(f"{where}: calibration must be a mapping, got {values!r}")
        method, threshold, rate = values.get("method"), values.get("threshold"), values.get("false_alarm_rate")
        scores = values.get("scores")
        if not isinstance(method, str) or not method:
            raise ModelFileError(f"{where}: calibration.method must be a non-empty string, got {method!r}")
        if not _finite(threshold):
            raise ModelFileError(f"{where}: calibration.threshold must be a finite number, got {threshold!r}")
        if rate is not None and not (_finite(rate) and 0 < rate < 1):
            raise ModelFileError(f"{where}: calibration.false_alarm_rate must be null or in (0, 1), got {rate!r}")
        if not isinstance(scores, list) or not all(_finite(score) for score in scores) or len(scores) > MAX_SCORES:
            raise ModelFileError(f"{where}: calibration.scores must be a list of at most {MAX_SCORES} finite numbers")
        if any(a > b for a, b in itertools.pairwise(scores)):
            raise ModelFileError(f"{where}: calibration.scores must be sorted in ascending order")
        if values.get("count") != len(scores):
            raise ModelFileError(f"{where}: calibration.count is {values.get('count')!r} but it lists {len(scores)} scores")
        calibration = cls(method, float(threshold), tuple(float(score) for score in scores), None if rate is None else float(rate))
        if method == CONFORMAL:
            _check_conformal(calibration, where)
        return calibration


def p_value_of(exceeding: Any, count: int) -> np.ndarray:
    """(1 + exceeding) / (count + 1): the one formula every p-value comes from."""
    return (1.0 + np.asarray(exceeding, dtype=np.float64)) / (count + 1)


def conformal_rank(count: int, false_alarm_rate: float) -> int:
    """k such that the k-th smallest of `count` scores is the threshold for `false_alarm_rate`.

    Mathematically k = ceil((n + 1)(1 - alpha)). It is derived here from the largest count of
    calibration scores at or above a score whose p-value (`p_value_of`, in floating point) is
    still <= alpha, so that `score > threshold` and `p_value <= alpha` agree to the last bit. (An
    alpha whose float is within rounding of a level j / (n + 1), e.g. 1/43, counts as that level.)
    """
    if isinstance(false_alarm_rate, bool) or not isinstance(false_alarm_rate, (int, float)) \
            or not 0 < false_alarm_rate < 1:
        raise ConfigError(f"calibration.false_alarm_rate: {false_alarm_rate!r} is out of range; allowed: 0 < rate < 1")
    needed = images_needed(false_alarm_rate)
    if count < needed:
        supported = f"; {count} images support a false-alarm rate >= {smallest_rate(count):.4g}" if count else ""
        raise ConfigError(
            f"calibration.false_alarm_rate {false_alarm_rate:g} needs at least {needed} calibration images, got {count}"
            f"{supported}; hold out more normal images (calibration.fraction or calibration.folder) or allow a larger rate"
        )
    levels = p_value_of(np.arange(count + 1), count)
    most = int(np.searchsorted(levels, false_alarm_rate, side="right")) - 1  # largest exceeding count with p <= alpha
    return count - most


def random_splits(size: int, calibration_count: int, resplits: int, seed: int = 0
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`resplits` random splits of `size` exchangeable normal images: (calibration indices, test
    indices), `calibration_count` of them calibrating and the rest as test images. The same seed
    gives the same splits."""
    if not 0 < calibration_count < size:
        raise ValueError(f"calibration_count must leave test images among the {size} scores, got {calibration_count}")
    rng = np.random.default_rng(seed)
    for _ in range(resplits):
        order = rng.permutation(size)
        yield order[:calibration_count], order[calibration_count:]


def realised_false_alarm_rates(normal_scores: Any, calibration_count: int, false_alarm_rate: float, resplits: int,
                               seed: int = 0) -> np.ndarray:
    """What the guarantee promises, measured: per random split of `normal_scores` (normal images
    the fit never saw, so exchangeable) into `calibration_count` calibration scores and the rest as
    test images (`random_splits`), the share of test images above the conformal threshold. Their
    mean estimates the false-alarm rate, which the guarantee bounds by `false_alarm_rate`. The same
    seed gives the same splits whatever the rate."""
    scores = np.asarray(normal_scores, dtype=np.float64).ravel()
    rates = np.empty(resplits)
    for index, (calibrating, testing) in enumerate(random_splits(len(scores), calibration_count, resplits, seed)):
        rates[index] = Calibration.conformal(scores[calibrating], false_alarm_rate).is_anomalous(scores[testing]).mean()
    return rates


def images_needed(false_alarm_rate: float) -> int:
    """The fewest calibration images that support `false_alarm_rate`: 1 / (n + 1) <= alpha."""
    needed = max(1, math.ceil(1 / false_alarm_rate) - 1)
    while needed > 1 and smallest_rate(needed - 1) <= false_alarm_rate:  # floating point at exact fractions
        needed -= 1
    while smallest_rate(needed) > false_alarm_rate:
        needed += 1
    return needed


def smallest_rate(count: int) -> float:
    """The smallest false-alarm rate `count` calibration images support: 1 / (count + 1)."""
    return float(p_value_of(0, count))


def resolve_false_alarm_rate(requested: float | None, count: int) -> tuple[float, str | None]:
    """(alpha, warning): `requested`, or for None the default 0.01 when `count` supports it, else
    the smallest rate the count supports, with a warning naming both. A requested rate the count
    cannot support is a `ConfigError` saying how many images it needs."""
    if count < 1:
        raise ConfigError("no calibration images: hold out normal images with calibration.fraction, "
                          "calibration.folder or calibration.manifest")
    if requested is not None:
        conformal_rank(count, requested)  # raises when the count is too small
        return float(requested), None
    if count >= images_needed(DEFAULT_FALSE_ALARM_RATE):
        return DEFAULT_FALSE_ALARM_RATE, None
    rate = smallest_rate(count)
    return rate, (
        f"{count} calibration images support a false-alarm rate of at least 1/{count + 1} = {rate:.4g}, not the default "
        f"{DEFAULT_FALSE_ALARM_RATE:g} (which needs {images_needed(DEFAULT_FALSE_ALARM_RATE)}); using {rate:.4g}"
    )


def _check_conformal(calibration: Calibration, where: str) -> None:
    rate = calibration.false_alarm_rate
    if rate is None or calibration.count < images_needed(rate):
        raise ModelFileError(f"{where}: a conformal calibration needs a false_alarm_rate its {calibration.count} scores support")
    expected = calibration.scores[conformal_rank(calibration.count, rate) - 1]
    if calibration.threshold != expected:
        raise ModelFileError(
            f"{where}: calibration.threshold {calibration.threshold!r} is not the conformal threshold {expected!r} "
            f"of its {calibration.count} scores at false_alarm_rate {rate:g}"
        )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
