"""PadimModel: fit, predict, persistence, and the files it must refuse."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from padim_core.anomaly_map import mahalanobis_distance, whitening
from padim_core.model import ModelFileError, PadimModel

SIZE = 64


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fitted() -> PadimModel:
    model = PadimModel("resnet18", ["layer1", "layer2"], n_features=20, image_size=SIZE, pretrained=False, seed=1)
    return model.fit([_images(6), _images(5, seed=1)])


def test_fit_returns_the_model_with_explicit_state(fitted):
    assert fitted.is_fitted and fitted.n_train == 11
    assert fitted.grid_shape == (16, 16)
    assert fitted.mean.shape == (256, 20) and fitted.inv_covariance.shape == (256, 20, 20)


def test_predict_gives_scores_as_map_maxima(fitted):
    scores, maps = fitted.predict(_images(3, seed=5))
    assert scores.shape == (3,) and maps.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))
    assert (maps >= 0).all()


def test_batch_size_does_not_change_results(fitted):
    images = _images(5, seed=9)
    scores, maps = fitted.predict(images)
    single = torch.cat([fitted.predict(images[i : i + 1])[0] for i in range(5)])
    # oneDNN may pick another convolution algorithm per batch size: float rounding, ~1e-4 relative.
    torch.testing.assert_close(single, scores, rtol=1e-3, atol=1e-3)


def test_training_images_score_lower_than_noise(fitted):
    normal = fitted.predict(_images(6))[0]
    odd = fitted.predict(_images(6, seed=3) * 4 + 2)[0]
    assert normal.max() < odd.min()


def test_mahalanobis_distance_matches_the_definition():
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(3, 5, 2, 4, generator=generator)  # [h, w, B, C]
    mean = torch.randn(15, 4, generator=generator)
    root = torch.randn(15, 4, 4, generator=generator)
    inverse = root @ root.transpose(1, 2) + torch.eye(4)
    distances = mahalanobis_distance(embedding, *whitening(mean, inverse))
    for b in range(2):
        for location in range(15):
            delta = embedding[location // 5, location % 5, b] - mean[location]
            expected = torch.sqrt(delta @ inverse[location] @ delta)
            torch.testing.assert_close(distances[b, location // 5, location % 5], expected, rtol=1e-5, atol=1e-5)


def test_predict_one_accepts_paths_pil_images_and_arrays(fitted, tmp_path):
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
    with pytest.raises(RuntimeError, match="not fitted"):
        PadimModel("resnet18", ["layer1"], n_features=8, image_size=SIZE, pretrained=False).predict(_images(1))
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, 64, 64\], got \[1, 3, 32, 32\]"):
        fitted.predict(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="at least one batch"):
        PadimModel("resnet18", ["layer1"], n_features=8, image_size=SIZE, pretrained=False).fit([])
    with pytest.raises(ValueError, match="between 1 and the embedding size 192"):
        PadimModel("resnet18", ["layer1", "layer2"], n_features=500, pretrained=False)


def test_threshold_decides_anomalies_strictly_above(fitted, tmp_path):
    model = PadimModel.load(fitted.save(tmp_path / "m.safetensors"))
    with pytest.raises(RuntimeError, match="no threshold"):
        model.is_anomalous(np.array([1.0]))
    model.calibrate(2.0, normal_score_max=1.5)
    assert model.is_anomalous(np.array([1.0, 2.0, 2.5])).tolist() == [False, False, True]


def test_save_load_round_trip_reproduces_predictions(fitted, tmp_path):
    fitted.calibrate(3.5, map_max=9.0)
    path = fitted.save(tmp_path / "models" / "cat.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["cat.safetensors"]  # no temporary left behind
    loaded = PadimModel.load(path)
    assert loaded.metadata() == fitted.metadata()
    images = _images(2, seed=4)
    torch.testing.assert_close(loaded.predict(images)[1], fitted.predict(images)[1])


def test_saving_an_unfitted_model_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="unfitted"):
        PadimModel("resnet18", ["layer1"], n_features=8, pretrained=False).save(tmp_path / "m.safetensors")


def _saved(fitted, tmp_path) -> tuple:
    path = fitted.save(tmp_path / "good.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["padim"])
    return path, load_file(str(path)), meta


def test_a_missing_or_foreign_file_is_refused(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        PadimModel.load(tmp_path / "absent.safetensors")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not a model")
    with pytest.raises(ModelFileError, match=f"{text}: not a readable safetensors file"):
        PadimModel.load(text)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(ModelFileError, match="not a padim model"):
        PadimModel.load(foreign)


def test_a_truncated_file_is_refused(fitted, tmp_path):
    path, _, _ = _saved(fitted, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        PadimModel.load(path)


def test_a_file_with_another_layout_is_refused(fitted, tmp_path):
    path, tensors, meta = _saved(fitted, tmp_path)
    reshaped = dict(tensors, mean=tensors["mean"][:100])
    save_file(reshaped, str(path), metadata={"padim": json.dumps(meta)})
    with pytest.raises(ModelFileError, match=r"tensor mean has shape \(100, 20\), expected \(256, 20\)"):
        PadimModel.load(path)
    save_file(tensors, str(path), metadata={"padim": json.dumps(dict(meta, format_version=99))})
    with pytest.raises(ModelFileError, match="format version 99"):
        PadimModel.load(path)
    save_file(tensors, str(path), metadata={"padim": json.dumps(dict(meta, backbone="vgg16"))})
    with pytest.raises(ModelFileError, match="unknown backbone 'vgg16'"):
        PadimModel.load(path)
    incomplete = {key: value for key, value in meta.items() if key != "grid_shape"}
    save_file(tensors, str(path), metadata={"padim": json.dumps(incomplete)})
    with pytest.raises(ModelFileError, match=r"lacks \['grid_shape'\]"):
        PadimModel.load(path)


def test_model_files_hold_no_pickle(fitted, tmp_path):
    path, _, _ = _saved(fitted, tmp_path)
    header_size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8 : 8 + header_size])
    assert {key for key in header if key != "__metadata__"} == {"mean", "inv_covariance", "channel_index"}


@pytest.mark.parametrize("sigma", [0.0, 4.0])
def test_matrix_upsample_and_blur_equal_interpolate_then_torchvision_blur(sigma):
    from torchvision.transforms.v2.functional import gaussian_blur

    from padim_core.anomaly_map import blur_kernel_size, resize_and_blur_matrix

    distances = torch.rand(2, 1, 16, 12, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.interpolate(distances, size=(64, 48), mode="bilinear", align_corners=False)
    if sigma:
        expected = gaussian_blur(expected, kernel_size=[blur_kernel_size(sigma)] * 2, sigma=[sigma] * 2)
    rows, columns = resize_and_blur_matrix(16, 64, sigma), resize_and_blur_matrix(12, 48, sigma)
    torch.testing.assert_close(rows @ distances[:, 0] @ columns.t(), expected[:, 0], rtol=1e-5, atol=1e-6)


def test_saved_files_are_readable_like_any_new_file(fitted, tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        path = fitted.save(tmp_path / "shared.safetensors")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644
