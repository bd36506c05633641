"""The decision threshold and what it was computed from.

An image is anomalous when its score is strictly above the threshold. A `Calibration` keeps the
sorted normal scores the threshold came from, so the decision can be explained (and p-values
computed) wherever the model goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from padim_core.errors import ModelFileError

MAX_SCORES = 100_000
"""Calibration scores kept in a model file at most: they travel in its JSON header."""


@dataclass(frozen=True)
class Calibration:
    """A threshold, how it was chosen and on which normal scores."""

    method: str
    threshold: float
    scores: tuple[float, ...]  # sorted ascending
    false_alarm_rate: float | None = None

    @property
    def count(self) -> int:
        return len(self.scores)

    def is_anomalous(self, scores: Any) -> np.ndarray:
        return np.asarray(scores, dtype=np.float64) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "threshold": self.threshold, "false_alarm_rate": self.false_alarm_rate,
            "count": self.count, "scores": list(self.scores),
        }

    @classmethod
    def from_dict(cls, values: Any, where: str) -> "Calibration":
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
        if any(a > b for a, b in zip(scores, scores[1:])):
            raise ModelFileError(f"{where}: calibration.scores must be sorted in ascending order")
        if values.get("count") != len(scores):
            raise ModelFileError(f"{where}: calibration.count is {values.get('count')!r} but it lists {len(scores)} scores")
        return cls(method, float(threshold), tuple(float(score) for score in scores), None if rate is None else float(rate))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
