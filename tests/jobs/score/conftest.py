"""Fixtures of the jobs.score tests: a small PaDiM model of bottle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from padim_core.calibration import Calibration
from padim_core.padim import PadimModel

from support.images import bottle_photos

SIZE = 64


@pytest.fixture(scope="package")
def bottle(mvtec_root: Path) -> Path:
    return mvtec_root / "bottle"


@pytest.fixture(scope="package")
def model_file(bottle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model fitted on 8 bottle photos, calibrated (conformal, alpha 0.5) on the test photos
    it then scores: the threshold splits them about in half."""
    model = PadimModel("efficientnet_lite0", ["blocks.1", "blocks.2"], n_features=20, image_size=SIZE)
    train = sorted((bottle / "train" / "good").glob("*.png"))[:8]
    model.fit([torch.stack([model.transform.to_pixels(path) for path in train])])
    scores, maps = model.predict(torch.stack([model.transform.to_pixels(path) for path in bottle_photos(bottle)]))
    model.calibrate(Calibration.conformal(scores, false_alarm_rate=0.5), map_min=float(maps.min()), map_max=float(maps.max()))
    return model.save(tmp_path_factory.mktemp("model") / "bottle.safetensors")
