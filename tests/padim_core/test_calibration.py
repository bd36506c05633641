"""The decision rule: anomalous strictly above the threshold, and what the threshold came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from padim_core.calibration import MAX_SCORES, Calibration
from padim_core.errors import ModelFileError


def test_anomalous_means_strictly_above_the_threshold() -> None:
    calibration = Calibration("fixed", 2.0, (1.0, 1.5, 2.0))
    assert calibration.is_anomalous([1.0, 2.0, 2.0001, 3.0]).tolist() == [False, False, True, True]
    assert calibration.is_anomalous(np.float32(2.5)).tolist() is True
    assert calibration.is_anomalous(torch.tensor([0.5, 2.5])).tolist() == [False, True]
    assert calibration.count == 3


def test_a_calibration_survives_its_dict_form() -> None:
    calibration = Calibration("quantile 0.99 of normal test scores", 1.25, (0.5, 1.0, 1.25), false_alarm_rate=0.01)
    plain = calibration.to_dict()
    assert plain == {"method": "quantile 0.99 of normal test scores", "threshold": 1.25, "false_alarm_rate": 0.01,
                     "count": 3, "scores": [0.5, 1.0, 1.25]}
    assert Calibration.from_dict(plain, "m.safetensors") == calibration
    assert Calibration.from_dict({**plain, "threshold": 2, "scores": [0, 1], "count": 2}, "m").scores == (0.0, 1.0)


def test_a_bad_calibration_names_the_file_and_the_value() -> None:
    good = Calibration("fixed", 1.0, (0.5,)).to_dict()
    with pytest.raises(ModelFileError, match="^m.safetensors: calibration.threshold must be a finite number, got True"):
        Calibration.from_dict({**good, "threshold": True}, "m.safetensors")
    with pytest.raises(ModelFileError, match=f"at most {MAX_SCORES} finite numbers"):
        Calibration.from_dict({**good, "scores": [0.0] * (MAX_SCORES + 1), "count": MAX_SCORES + 1}, "m")
    with pytest.raises(ModelFileError, match="calibration.count is None but it lists 1 scores"):
        Calibration.from_dict({key: value for key, value in good.items() if key != "count"}, "m")
