"""The detector interface: the kind registry, loading any model file, and what every detector shares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from padim_core import detector as detector_module
from padim_core.calibration import Calibration
from padim_core.detector import (
    KINDS,
    Detector,
    detector_class,
    image_pair,
    load_detector,
)
from padim_core.errors import ModelFileError
from padim_core.padim import PadimModel

from support.models import SIZE, pixels, rewrite_model_file


class OtherKind(PadimModel):
    """A second kind for the registry tests: PaDiM's maths under another name."""

    kind = "other-kind-for-tests"


@pytest.fixture
def other_kind(monkeypatch: pytest.MonkeyPatch) -> str:
    """`OtherKind` registered for one test (the registry imports it by `module:class`)."""
    monkeypatch.setitem(KINDS, OtherKind.kind, f"{__name__}:OtherKind")
    return OtherKind.kind


def test_every_registered_kind_is_a_detector_named_by_its_key():
    assert "padim" in KINDS
    for kind in KINDS:
        cls = detector_class(kind)
        assert issubclass(cls, Detector) and cls.kind == kind


def test_an_unknown_kind_is_refused_listing_the_known_ones():
    with pytest.raises(ModelFileError, match=r"unknown detector kind 'nope'; known kinds: \[") as caught:
        detector_class("nope")
    assert all(repr(kind) in str(caught.value) for kind in KINDS)


def test_load_detector_returns_the_kind_the_file_names(tiny_padim_file, other_kind, tmp_path):
    assert type(load_detector(tiny_padim_file)) is PadimModel
    other = OtherKind.load(rewrite_model_file(tiny_padim_file, kind=other_kind))
    assert type(other) is OtherKind and other.metadata()["kind"] == other_kind
    data = other.to_bytes()
    assert type(load_detector(data)) is OtherKind
    assert type(Detector.load(data)) is OtherKind
    path = tmp_path / "other.safetensors"
    path.write_bytes(data)
    assert type(load_detector(path, device="cpu")) is OtherKind


def test_a_concrete_class_refuses_a_file_of_another_kind(tiny_padim_file, other_kind):
    data = rewrite_model_file(tiny_padim_file, kind=other_kind)
    with pytest.raises(ModelFileError, match=f"holds a {other_kind} model, not padim"):
        PadimModel.load(data)
    with pytest.raises(ModelFileError, match=f"holds a padim model, not {other_kind}"):
        OtherKind.load(tiny_padim_file)


def test_a_file_of_an_unregistered_kind_is_refused_listing_the_known_ones(tiny_padim_file):
    data = rewrite_model_file(tiny_padim_file, kind="gone")
    with pytest.raises(ModelFileError, match=r"unknown detector kind 'gone'; known kinds: \[.*'padim'"):
        load_detector(data)


def test_load_from_bytes_gives_the_model_saved(tiny_padim_file):
    model = PadimModel.load(tiny_padim_file, device="cpu")
    assert model.is_fitted and model.grid_shape_ == (16, 16) and model.n_train_ == 11
    assert model.device.type == "cpu" and model.to_bytes() == tiny_padim_file


def test_uint8_pixels_and_normalised_images_give_the_same_scores(tiny_padim_file):
    model = load_detector(tiny_padim_file)
    batch = pixels(3, seed=2)
    scores, maps = model.predict(batch)
    normalised = model.transform.normalize(batch)
    assert normalised.dtype == torch.float32
    same_scores, same_maps = model.predict(normalised)
    torch.testing.assert_close(scores, same_scores, rtol=0, atol=0)
    torch.testing.assert_close(maps, same_maps, rtol=0, atol=0)
    # ... and a uint8 batch is not mistaken for normalised values
    assert not torch.allclose(model.predict(batch.float())[0], scores)


def test_calibration_sets_the_threshold_and_decisions(tiny_padim_file):
    model = load_detector(tiny_padim_file)
    assert model.threshold_ is None
    scores = model.predict(pixels(4, seed=3))[0].numpy()
    middle = float(np.median(scores))
    model.calibrate(Calibration("median", middle, tuple(sorted(map(float, scores)))), map_max=1.0)
    assert model.threshold_ == middle and model.calibration_.count == 4
    assert model.is_anomalous(scores).tolist() == (scores > middle).tolist()
    assert model.metadata()["calibration"]["threshold"] == middle and model.metadata()["score_stats"] == {"map_max": 1.0}


@pytest.mark.parametrize(
    ("size", "expected"), [(64, (64, 64)), ([48, 80], (48, 80)), ((32, 16), (32, 16)), (np.int64(20), (20, 20))]
)
def test_image_size_is_a_side_or_height_and_width(size, expected):
    assert image_pair(size) == expected


@pytest.mark.parametrize("size", [0, -4, [64, 0], [64, 4096], True, [64, True], [64.0, 64]])
def test_bad_image_sizes_are_refused_naming_the_range(size):
    with pytest.raises(ValueError, match=f"image_size must be .* from 1 to {detector_module.MAX_IMAGE_SIDE}"):
        image_pair(size)


@pytest.mark.parametrize("sigma", [float("nan"), float("inf"), -1.0, True, "4"])
def test_bad_blur_is_refused(sigma):
    with pytest.raises(ValueError, match="blur_sigma must be a finite number >= 0"):
        PadimModel("resnet18", ["layer1"], n_features=8, image_size=SIZE, pretrained=False, blur_sigma=sigma)


def test_images_smaller_than_the_deepest_stride_are_refused():
    with pytest.raises(ValueError, match=r"image_size \[8, 8\] is smaller than the stride 16 of layer layer3"):
        PadimModel("resnet18", ["layer1", "layer3"], n_features=8, image_size=8, pretrained=False)
