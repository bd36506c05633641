"""PadimModel: fit, predict, calibrate, persistence, and the calls it must refuse."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from padim_core.augmentation import PhotometricAugmentation
from padim_core.calibration import Calibration
from padim_core.gaussian import GaussianAccumulator
from padim_core.padim import PadimModel

from support.models import SIZE, fit_tiny_padim, images


@pytest.fixture(scope="module")
def fitted() -> PadimModel:
    """Shared by the tests of this module: read it, never change it (calibrate a loaded copy)."""
    return fit_tiny_padim()


def copy_of(model: PadimModel) -> PadimModel:
    return PadimModel.load(model.to_bytes())


def test_fit_returns_the_model_with_learned_state_apart_from_settings(fitted):
    model = PadimModel("resnet18", ["layer1", "layer2"], n_features=20, image_size=SIZE, pretrained=False, seed=1)
    assert not model.is_fitted and model.mean_ is None and model.grid_shape_ is None
    assert model.fit([images(6), images(5, seed=1)]) is model
    assert model.is_fitted and model.n_train_ == 11
    assert model.grid_shape_ == (16, 16)
    assert model.mean_.shape == (256, 20) and model.inv_covariance_.shape == (256, 20, 20)
    assert (model.n_features, model.seed, model.regularization, model.image_size) == (20, 1, 0.01, (SIZE, SIZE))
    assert model.threshold_ is None and model.calibration_ is None and model.score_stats_ == {}
    torch.testing.assert_close(model.mean_, fitted.mean_)  # the same seed gives the same model


def test_merged_accumulators_give_the_model_of_all_images(fitted):
    """Shards fitted apart and merged by `+` equal one fit on every image."""
    model = PadimModel("resnet18", ["layer1", "layer2"], n_features=20, image_size=SIZE, pretrained=False, seed=1)
    first, second = model.accumulate([images(6)]), model.accumulate([images(5, seed=1)])
    assert first.grid_shape == second.grid_shape == (16, 16) and (first.count, second.count) == (6, 5)
    model.fit_accumulator(first + second)
    assert model.n_train_ == 11 and model.grid_shape_ == (16, 16)
    torch.testing.assert_close(model.mean_, fitted.mean_, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.inv_covariance_, fitted.inv_covariance_, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"cannot merge accumulators of grid \[16, 16\]"):
        first + GaussianAccumulator.empty((8, 8), 20)


def test_predict_gives_scores_as_map_maxima(fitted):
    scores, maps = fitted.predict(images(3, seed=5))
    assert scores.shape == (3,) and maps.shape == (3, SIZE, SIZE)
    assert scores.dtype == maps.dtype == torch.float32 and scores.device.type == "cpu"
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))
    assert (maps >= 0).all()


def test_batch_size_does_not_change_results(fitted):
    batch = images(5, seed=9)
    scores, _ = fitted.predict(batch)
    single = torch.cat([fitted.predict(batch[i : i + 1])[0] for i in range(5)])
    # oneDNN may pick another convolution algorithm per batch size: float rounding, ~1e-4 relative.
    torch.testing.assert_close(single, scores, rtol=1e-3, atol=1e-3)


def test_training_images_score_lower_than_noise(fitted):
    normal = fitted.predict(images(6))[0]
    odd = fitted.predict(images(6, seed=3) * 4 + 2)[0]
    assert normal.max() < odd.min()


def test_predict_one_accepts_paths_bytes_pil_images_and_arrays(fitted, tmp_path):
    array = (np.random.default_rng(0).random((80, 90, 3)) * 255).astype(np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    from_path = fitted.predict_one(path)
    from_pil = fitted.predict_one(Image.fromarray(array))
    from_array = fitted.predict_one(array)
    assert isinstance(from_path[0], float) and from_path[1].shape == (SIZE, SIZE)
    assert from_pil[0] == from_array[0]
    assert fitted.predict_one(path.read_bytes())[0] == from_path[0]
    # PNG files decode through libpng, PIL images through PIL: within a grey level of each other.
    assert from_path[0] == pytest.approx(from_pil[0], rel=1e-2)


def test_bad_calls_are_clear_errors(fitted):
    unfitted = PadimModel("resnet18", ["layer1"], n_features=8, image_size=SIZE, pretrained=False)
    with pytest.raises(RuntimeError, match="not fitted"):
        unfitted.predict(images(1))
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, 64, 64\], got \[1, 3, 32, 32\]"):
        fitted.predict(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="at least one batch"):
        unfitted.fit([])
    with pytest.raises(ValueError, match="between 1 and the embedding size 192"):
        PadimModel("resnet18", ["layer1", "layer2"], n_features=500, pretrained=False)
    with pytest.raises(ValueError, match="distance_metric 'euclidean'.*mahalanobis"):
        PadimModel("resnet18", ["layer1"], n_features=8, pretrained=False, distance_metric="euclidean")
    with pytest.raises(ValueError, match="regularization must be >= 0"):
        PadimModel("resnet18", ["layer1"], n_features=8, pretrained=False, regularization=-1.0)
    for name, value in (("shrinkage", "lw"), ("regularization_scale", "relative"), ("embedding", "pca")):
        with pytest.raises(ValueError, match=f"{name} '{value}' is not one PaDiM defines here"):
            PadimModel("resnet18", ["layer1"], n_features=8, pretrained=False, **{name: value})
    with pytest.raises(ValueError, match="augmentation works on uint8 pixels"):
        PadimModel("resnet18", ["layer1"], n_features=8, image_size=SIZE, pretrained=False,
                   augmentation={"copies": 1}).fit([images(2)])


def test_threshold_decides_anomalies_strictly_above(fitted):
    model = copy_of(fitted)
    with pytest.raises(RuntimeError, match="no calibrated threshold"):
        model.is_anomalous(np.array([1.0]))
    assert model.calibrate(Calibration("fixed", 2.0, (1.0, 1.5)), normal_score_max=1.5) is model
    assert model.threshold_ == 2.0 and model.score_stats_ == {"normal_score_max": 1.5}
    assert model.is_anomalous(np.array([1.0, 2.0, 2.5])).tolist() == [False, False, True]
    assert model.is_anomalous(torch.tensor([2.0001])).tolist() == [True]
    assert fitted.calibration_ is None  # the copy, not the shared model, was calibrated


def test_save_load_round_trip_reproduces_the_model(fitted, tmp_path):
    model = copy_of(fitted)
    model.calibrate(Calibration("quantile 0.99", 3.5, (1.0, 2.0, 3.0), false_alarm_rate=0.01), map_max=9.0)
    path = model.save(tmp_path / "models" / "cat.safetensors")
    assert path == tmp_path / "models" / "cat.safetensors"
    assert [p.name for p in path.parent.iterdir()] == ["cat.safetensors"]  # no temporary left behind
    loaded = PadimModel.load(path)
    assert loaded.metadata() == model.metadata()
    assert loaded.calibration_ == model.calibration_ and loaded.threshold_ == 3.5
    assert loaded.score_stats_ == {"map_max": 9.0} and loaded.n_train_ == 11
    assert torch.equal(loaded.channel_index, fitted.channel_index)
    batch = images(2, seed=4)
    torch.testing.assert_close(loaded.predict(batch)[1], fitted.predict(batch)[1])


def test_saving_an_unfitted_model_is_refused(tmp_path):
    unfitted = PadimModel("resnet18", ["layer1"], n_features=8, pretrained=False)
    with pytest.raises(RuntimeError, match="unfitted"):
        unfitted.save(tmp_path / "m.safetensors")
    with pytest.raises(RuntimeError, match="unfitted"):
        unfitted.to_bytes()
    assert list(tmp_path.iterdir()) == []


def test_the_file_holds_the_gaussians_and_channels_and_no_pickle(fitted):
    data = fitted.to_bytes()
    header_size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_size])
    assert {key for key in header if key != "__metadata__"} == {"mean", "inv_covariance", "channel_index"}
    assert header["mean"]["dtype"] == "F32" and header["channel_index"]["dtype"] == "I64"
    metadata = json.loads(header["__metadata__"]["padim"])
    assert metadata["kind"] == "padim" and metadata["settings"] == {
        "n_features": 20, "embedding_size": 192, "embedding": "random_subset", "seed": 1, "regularization": 0.01,
        "regularization_scale": "absolute", "shrinkage": "none", "distance_metric": "mahalanobis",
        "augmentation": PhotometricAugmentation().to_dict(),  # copies 0: none
    }
    assert metadata["settings"]["augmentation"]["copies"] == 0


def test_semi_orthogonal_embedding_saves_its_matrix_and_loads_back_the_same_model():
    model = PadimModel("resnet18", ["layer1", "layer2"], n_features=20, image_size=SIZE, pretrained=False, seed=1,
                       embedding="semi_orthogonal", shrinkage="oas", regularization_scale="location_variance")
    assert model.channel_index.tolist() == list(range(192)) and model.projection.shape == (192, 20)
    model.fit([images(6), images(5, seed=1)])
    data = model.to_bytes()
    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    assert {key for key in header if key != "__metadata__"} == {"mean", "inv_covariance", "projection"}
    loaded = PadimModel.load(data)
    assert (loaded.embedding, loaded.shrinkage, loaded.regularization_scale) == ("semi_orthogonal", "oas", "location_variance")
    assert torch.equal(loaded.projection, model.projection)
    batch = images(2, seed=4)
    torch.testing.assert_close(loaded.predict(batch)[1], model.predict(batch)[1])


def test_augmented_fit_counts_the_real_images_and_records_its_augmentation():
    from support.models import pixels

    model = PadimModel("resnet18", ["layer1"], n_features=8, image_size=SIZE, pretrained=False,
                       augmentation={"copies": 2, "seed": 3})
    accumulator = model.accumulate([pixels(4), pixels(3, seed=1)])
    assert accumulator.count == 7 * 3  # every image and two copies of it, in the same sums
    model.fit_accumulator(accumulator)
    assert model.n_train_ == 7
    loaded = PadimModel.load(model.to_bytes())
    assert loaded.augmentation == PhotometricAugmentation(copies=2, seed=3)
