"""Issue 14 on real bottle images, small: the robustness options do what they claim, and the
default config reproduces the README's small-subset figures ("Robustness to light and noise").

Both fit on 40 of bottle's training images at 128 px (the README's `--image-size 128
--fit-images 40` command of `bench.bench_robustness`): a few CNN passes over small images, yet
minutes on a loaded 2-core machine, hence the slow marker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.common.config import JOB_SECTIONS
from padim_core.config import load_config
from padim_core.shifts import apply_shift

from support.robustness_runs import (
    Data,
    Group,
    evaluate_group,
    load_data,
    shifted_splits,
)

pytestmark = pytest.mark.slow

SIZE = 128
FIT_IMAGES = 40
README_FIGURES = {  # bench.bench_robustness --image-size 128 --fit-images 40 --shifts noise,brightness --severities 1
    "image_auroc": 0.998,
    "noise/1": 0.998,
    "brightness/1": 0.998,
}
"""The default config's small-subset figures in the README: unshifted image AUROC, and image
AUROC under noise and brightness at severity 1 (false alarms 0.00 at both)."""
TOLERANCE = 0.02


@pytest.fixture(scope="module")
def data(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Data:
    return load_data(mvtec_root / "bottle", SIZE, tmp_path_factory.mktemp("decoded"), fit_images=FIT_IMAGES)


def _config(*overrides: str):
    return load_config(None, [f"padim.image_size={SIZE}", *overrides], others=JOB_SECTIONS)


def test_the_default_config_reproduces_the_readmes_small_subset_figures(data: Data) -> None:
    torch.manual_seed(0)
    group = Group(["default"], [_config()])
    group.fit(data.fit, 16)
    variants = shifted_splits(data.split, ["noise", "brightness"], [1])
    (figures,) = evaluate_group(group, data, variants, 16, pixels=False)
    assert figures["image_auroc"] == pytest.approx(README_FIGURES["image_auroc"], abs=TOLERANCE)
    for key in ("noise/1", "brightness/1"):
        assert figures["shifts"][key]["image_auroc"] == pytest.approx(README_FIGURES[key], abs=TOLERANCE)
        assert figures["shifts"][key]["false_alarm_rate"] <= 0.2  # the README's 0.00, within issue 14's target


def _score(model, images: torch.Tensor) -> np.ndarray:
    scores, _ = model.predict(images)
    return scores.float().numpy()


def test_regularization_and_augmentation_keep_shifted_normal_images_below_the_threshold(data: Data) -> None:
    """The claim of issue 14: a normal image under a change of light or sensor noise no person
    would see rises above the threshold calibrated on clean held-out images with the paper's
    regularisation (0.01); regularisation 10 keeps it below for colour temperature, and one
    augmented copy per training image for noise too, where it also brings the shifted normal
    images' scores much closer to normal relative to the defects."""
    normal = data.split.images[torch.as_tensor(data.split.labels == 0)]
    defects = data.split.images[torch.as_tensor(data.split.labels == 1)]
    masks = torch.zeros(len(normal), SIZE, SIZE, dtype=torch.bool)
    seeds = list(range(len(normal)))
    shifted = {name: apply_shift(name, level, normal, masks, seeds)[0]
               for name, level in (("noise", 0.005), ("colour_temperature", 5500.0), ("brightness", 0.9))}

    paper, strong = (_config("padim.augmentation.copies=0", f"padim.regularization={value}").build_detector(device="cpu")
                     for value in (0.01, 10.0))
    batches = [data.fit[i : i + 16] for i in range(0, len(data.fit), 16)]
    accumulator = paper.accumulate(batches)
    paper.fit_accumulator(accumulator)
    strong.fit_accumulator(accumulator)  # the same running sums: only the regularisation differs
    default = _config().build_detector(device="cpu").fit(batches)  # regularisation 10, one augmented copy

    def false_alarms(model, images: torch.Tensor) -> float:
        threshold = _score(model, data.calibration).max()  # the bench's rule with 42 held-out images
        return float((_score(model, images) > threshold).mean())

    def relative(model, images: torch.Tensor) -> float:
        """Median score of the images over the median score of the defects."""
        return float(np.median(_score(model, images)) / np.median(_score(model, defects)))

    # Measured: 1.00 / 0.00 (colour temperature), 1.00 / 1.00 / 0.00 (noise), at most 0.05 for the default.
    assert false_alarms(paper, shifted["colour_temperature"]) >= 0.9
    assert false_alarms(strong, shifted["colour_temperature"]) <= 0.2
    assert false_alarms(paper, shifted["noise"]) >= 0.9 and false_alarms(strong, shifted["noise"]) >= 0.9
    for name, images in shifted.items():
        assert false_alarms(default, images) <= 0.2, name
    # Measured: 0.58 (paper), 0.61 (regularisation 10), 0.37 (default); clean normal images 0.29-0.36.
    assert relative(default, shifted["noise"]) < 0.8 * min(relative(paper, shifted["noise"]), relative(strong, shifted["noise"]))
