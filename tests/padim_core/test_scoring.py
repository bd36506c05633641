"""The one path from images to scores and decisions, whoever calls it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from padim_core.calibration import Calibration
from padim_core.detector import load_detector
from padim_core.errors import ImageDecodeError
from padim_core.scoring import (
    BatchScores,
    decode_each,
    score_all,
    score_batch,
    score_files,
)

from support.images import encode, noise_png
from support.models import SIZE, pixels


@pytest.fixture(scope="module")
def model(tiny_padim_file):
    """Calibrated between the scores of `pixels(6, seed=5)`; read it, never change it."""
    detector = load_detector(tiny_padim_file)
    scores = detector.predict(pixels(6, seed=5))[0].numpy()
    threshold = float(np.median(scores))
    return detector.calibrate(Calibration("median", threshold, tuple(sorted(map(float, scores)))))


def test_score_batch_decides_with_the_threshold(model) -> None:
    batch = score_batch(model, pixels(6, seed=5))
    assert isinstance(batch, BatchScores) and len(batch) == 6
    assert batch.scores.dtype == np.float32 and batch.maps.shape == (6, SIZE, SIZE)
    assert batch.is_anomalous.dtype == bool
    assert batch.is_anomalous.tolist() == (batch.scores > model.threshold_).tolist()
    assert 0 < batch.is_anomalous.sum() < 6  # the median threshold splits the batch
    scores, maps = model.predict(pixels(6, seed=5))
    np.testing.assert_array_equal(batch.scores, scores.numpy())
    torch.testing.assert_close(batch.maps, maps)


def test_an_uncalibrated_model_scores_without_decisions(tiny_padim_file) -> None:
    batch = score_batch(load_detector(tiny_padim_file), pixels(2))
    assert batch.is_anomalous is None and batch.scores.shape == (2,)


def test_decode_each_reports_bad_sources_by_index(model, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(noise_png(80))
    sources = [good.read_bytes(), b"not an image", good, tmp_path / "missing.png", Image.new("RGB", (30, 20)), 42]
    decoded_pixels, decoded, errors = decode_each(model.transform, sources)
    assert decoded == [0, 2, 4] and sorted(errors) == [1, 3, 5]
    assert decoded_pixels.dtype == torch.uint8 and decoded_pixels.shape == (3, 3, SIZE, SIZE)
    assert torch.equal(decoded_pixels[0], decoded_pixels[1])  # the same image as bytes and as a path
    assert torch.equal(decoded_pixels[1], model.transform.to_pixels(good))
    assert "missing.png" in errors[3] and "expected a path, bytes" in errors[5]


def test_decode_each_names_sources_by_the_given_names(model) -> None:
    pixels_, decoded, errors = decode_each(model.transform, [b"junk", b""], names=["a.tar::x.png", "a.tar::y.png"])
    assert pixels_ is None and decoded == []
    assert "a.tar::x.png" in errors[0] and "a.tar::y.png" in errors[1]


def test_score_files_and_score_all_keep_the_order_of_the_sources(model, tmp_path: Path) -> None:
    paths = []
    for index in range(5):
        paths.append(tmp_path / f"{index}.png")
        paths[-1].write_bytes(noise_png(70, seed=index))
    chunks = list(score_files(model, paths, batch_size=2, workers=2))
    assert [chunk for chunk, _ in chunks] == [paths[:2], paths[2:4], paths[4:]]
    scores, maps = score_all(model, paths, batch_size=2, workers=2)
    assert scores.shape == (5,) and maps.shape == (5, SIZE, SIZE)
    expected = model.predict(torch.stack([model.transform.to_pixels(path) for path in paths]))[0].numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(np.concatenate([batch.scores for _, batch in chunks]), scores)


def test_score_all_of_nothing_and_of_a_bad_image(model, tmp_path: Path) -> None:
    scores, maps = score_all(model, [])
    assert scores.shape == (0,) and maps.shape == (0, SIZE, SIZE)
    bad = tmp_path / "bad.png"
    bad.write_bytes(encode(Image.new("RGB", (8, 8)))[:20])
    with pytest.raises(ImageDecodeError, match="bad.png"):
        score_all(model, [bad])
