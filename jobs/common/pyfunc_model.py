"""The fitted detector behind MLflow's pyfunc interface: the code of every logged model.

MLflow runs this file to load a model (models-from-code, `jobs.common.pyfunc`), so nothing is
ever unpickled. It runs as a top-level module: imports are absolute.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd

from jobs.common.pyfunc import MODEL_ARTIFACT


class DetectorPyfuncModel(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a column `image` (or `path`) of image file paths or encoded image
    bytes. Output, one row per input row, in order: `image_score` (float32), `p_value` (float64,
    the conformal p-value against the model's calibration scores; NaN when the calibration is
    not conformal or the image could not be read), `is_anomalous` (nullable bool: missing when
    the model has no threshold or the image could not be read; for a conformal model exactly
    `p_value <= false_alarm_rate`) and `error` (None, or why the image could not be read). A bad image is a row with an
    error, never a failed call. `params={"batch_size": N}` sets how many images go through
    the network at once (default 32).
    """

    def load_context(self, context: Any) -> None:
        from padim_core.detector import load_detector

        self._detector = load_detector(context.artifacts[MODEL_ARTIFACT])

    # MLflow 3 reads the `model_input` hint: a DataFrame means "no schema, no conversion".
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from padim_core.scoring import decode_each, score_batch

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        column = next((name for name in ("image", "path") if name in frame.columns), None)
        if column is None:
            raise ValueError(f"expected a column 'image' or 'path' of image paths or bytes, got columns {list(frame.columns)}")
        batch_size = int((params or {}).get("batch_size", 32))
        sources = frame[column].tolist()
        scores = np.full(len(sources), np.nan, dtype=np.float32)
        p_values = np.full(len(sources), np.nan, dtype=np.float64)
        flagged = pd.array([None] * len(sources), dtype="boolean")
        errors: list[str | None] = [None] * len(sources)
        for start in range(0, len(sources), batch_size):  # decode a batch at a time: bounded memory
            chunk = sources[start : start + batch_size]
            pixels, decoded, failed = decode_each(self._detector.transform, chunk)
            for index, message in failed.items():
                errors[start + index] = message
            if pixels is None:
                continue
            rows = [start + index for index in decoded]
            batch = score_batch(self._detector, pixels)
            scores[rows] = batch.scores
            if batch.is_anomalous is not None:
                flagged[rows] = batch.is_anomalous
            if batch.p_values is not None:
                p_values[rows] = batch.p_values
        return pd.DataFrame({"image_score": scores, "p_value": p_values, "is_anomalous": flagged, "error": errors},
                            index=frame.index)


mlflow.models.set_model(DetectorPyfuncModel())
