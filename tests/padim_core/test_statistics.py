"""padim_core.statistics: the running sums kept beside a PaDiM model, and exact updates from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from padim_core.errors import ModelFileError
from padim_core.loader import image_batches
from padim_core.padim import PadimModel
from padim_core.patchcore import PatchcoreModel
from padim_core.scoring import score_batch
from padim_core.statistics import (
    check_compatible,
    embedding_differences,
    fingerprint,
    read_statistics,
    write_statistics,
)

SETTINGS = {"backbone": "efficientnet_lite0", "layers": ["blocks.1", "blocks.2"], "n_features": 24, "image_size": 64,
            "device": "cpu"}


def batches(model: PadimModel, images: list[Path]):
    return image_batches(images, model.transform.to_pixels, 2)


@pytest.fixture(scope="module")
def bottle(mvtec_root: Path) -> dict[str, list[Path]]:
    train = sorted((mvtec_root / "bottle" / "train" / "good").glob("*.png"))
    return {"a": train[:8], "b": train[8:14], "test": sorted((mvtec_root / "bottle" / "test" / "broken_large").glob("*.png"))[:3]
            + sorted((mvtec_root / "bottle" / "test" / "good").glob("*.png"))[:2]}


def test_statistics_round_trip_through_a_file(bottle: dict[str, list[Path]], tmp_path: Path) -> None:
    model = PadimModel(**SETTINGS)
    sums = model.accumulate(batches(model, bottle["a"]))
    model.fit_accumulator(sums)
    path = write_statistics(tmp_path / "bottle.safetensors", sums, model, {"category": "bottle"})
    read, meta, channel_index = read_statistics(path)
    assert read.count == sums.count == 8 and read.grid_shape == sums.grid_shape
    for name, value in sums.tensors().items():
        torch.testing.assert_close(read.tensors()[name], value.cpu(), rtol=0, atol=0)
    assert meta["manifest"] == {"category": "bottle"} and {**meta, **fingerprint(model)} == meta
    check_compatible(meta, channel_index, model, str(path))
    assert read_statistics(path.read_bytes())[0].count == 8
    # upper triangle only: the file is about half the size of the full sums of outer products
    full = sum(value.numel() * value.element_size() for value in sums.tensors().values())
    assert path.stat().st_size < 0.6 * full


def test_statistics_of_other_embeddings_are_refused_naming_the_difference(bottle: dict[str, list[Path]], tmp_path: Path) -> None:
    model = PadimModel(**SETTINGS)
    sums = model.accumulate(batches(model, bottle["a"][:2]))
    path = write_statistics(tmp_path / "s.safetensors", sums, model)
    _, meta, channel_index = read_statistics(path)
    for other, named in ((PadimModel(**{**SETTINGS, "image_size": 96}), "image_size [64, 64] (expected [96, 96])"),
                         (PadimModel(**{**SETTINGS, "seed": 1}), "the channel index"),
                         (PadimModel(**{**SETTINGS, "layers": ["blocks.1", "blocks.3"]}), "layers")):
        with pytest.raises(ModelFileError, match="other embeddings") as error:
            check_compatible(meta, channel_index, other, str(path))
        assert named in str(error.value) and str(path) in str(error.value)
    patchcore = PatchcoreModel(backbone="efficientnet_lite0", image_size=64, device="cpu")
    assert embedding_differences(fingerprint(patchcore), None, patchcore) == []
    assert "backbone" in " ".join(embedding_differences({**fingerprint(patchcore), "backbone": "resnet18"}, None, patchcore))
    with pytest.raises(ModelFileError, match="not a padim statistics file"):
        read_statistics(b"not safetensors at all")


@pytest.mark.slow
def test_fit_on_a_then_update_with_b_is_the_fit_on_a_and_b(bottle: dict[str, list[Path]], tmp_path: Path) -> None:
    """Exactness on real bottle images, through the statistics file as padim-update goes."""
    first = PadimModel(**SETTINGS)
    sums = first.accumulate(batches(first, bottle["a"]))
    first.fit_accumulator(sums)
    path = write_statistics(tmp_path / "bottle.safetensors", sums, first)
    kept, _, _ = read_statistics(path)
    first.update(batches(first, bottle["b"]), kept)
    whole = PadimModel(**SETTINGS).fit(batches(first, bottle["a"] + bottle["b"]))
    assert first.n_train_ == whole.n_train_ == 14 and kept.count == 14
    torch.testing.assert_close(first.mean_, whole.mean_, rtol=1e-5, atol=1e-6 * float(whole.mean_.abs().max()))
    scale = float(whole.inv_covariance_.abs().max())
    torch.testing.assert_close(first.inv_covariance_, whole.inv_covariance_, rtol=0, atol=1e-5 * scale)
    pixels = torch.stack([whole.transform.to_pixels(image) for image in bottle["test"]])
    torch.testing.assert_close(torch.from_numpy(score_batch(first, pixels).scores),
                               torch.from_numpy(score_batch(whole, pixels).scores), rtol=1e-4, atol=0)
