"""PatchcoreModel: locally aware features, the memory bank, the paper's image score, persistence,
and the inputs it must refuse."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F

from padim_core.anomaly_map import MapResizer
from padim_core.detector import load_detector
from padim_core.errors import ModelFileError
from padim_core.padim import PadimModel
from padim_core.patchcore import BANK_DTYPE, PatchcoreModel

from support.models import (
    SIZE,
    fit_tiny_patchcore,
    images,
    model_metadata,
    pixels,
    rewrite_model_file,
    tiny_patchcore,
)

CHANNELS = 128 + 256
"""resnet18's layer2 and layer3."""
GRID = (SIZE // 8, SIZE // 8)


@pytest.fixture(scope="module")
def fitted() -> PatchcoreModel:
    """Shared by the tests of this module: read it, never change it (change a loaded copy)."""
    return fit_tiny_patchcore()


@pytest.fixture(scope="module")
def fitted_file(fitted) -> bytes:
    return fitted.to_bytes()


# ------------------------------------------------------------------ references
def neighbourhood_mean(maps: torch.Tensor) -> torch.Tensor:
    """The mean of each cell's 3x3 neighbourhood, zeros beyond the border counted (as the paper's code)."""
    padded = F.pad(maps, (1, 1, 1, 1))
    height, width = maps.shape[-2:]
    return sum(padded[..., dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)) / 9


def bilinear_matrix(source: int, target: int) -> torch.Tensor:
    """`[target, source]` weights of bilinear resizing with half-pixel centres (align_corners=False)."""
    matrix = torch.zeros(target, source)
    for out in range(target):
        position = max((out + 0.5) * source / target - 0.5, 0.0)
        low = min(int(position), source - 1)
        high = min(low + 1, source - 1)
        matrix[out, low] += 1 - (position - low)
        matrix[out, high] += position - low
    return matrix


def patch_rows(model: PatchcoreModel, batch: torch.Tensor) -> torch.Tensor:
    """Patch features `[B, h*w, C]`, row-major over the grid."""
    features = model.embed(batch)
    return features.flatten(2).transpose(1, 2)


def reference_scores(patches: torch.Tensor, bank: torch.Tensor, neighbours: int) -> torch.Tensor:
    """The paper's eq. 7 by brute force in float64: s = (1 - exp|f* - m*| / sum over the
    `neighbours` bank rows nearest m* of exp|f* - m|) * s*."""
    patches, bank = patches.double(), bank.double()
    scores = []
    for image in patches:
        distances = torch.cdist(image, bank)
        patch_scores, nearest_rows = distances.min(dim=1)
        worst = int(patch_scores.argmax())
        worst_score = patch_scores[worst]
        if neighbours == 1:
            scores.append(worst_score)
            continue
        support = torch.cdist(bank[nearest_rows[worst]][None], bank)[0].argsort()[:neighbours]
        to_support = torch.linalg.vector_norm(bank[support] - image[worst], dim=1)
        scores.append((1 - torch.exp(to_support[0]) / torch.exp(to_support).sum()) * worst_score)
    return torch.stack(scores).float()


# ------------------------------------------------------------------ features
def test_features_are_3x3_means_resized_bilinearly_to_the_first_grid_and_concatenated():
    model = tiny_patchcore()
    batch = images(2, seed=3)
    with torch.no_grad():
        second, third = model.embedder.extractor(model.prepare(batch))
    assert second.shape[-2:] == GRID and third.shape[-2:] == (GRID[0] // 2, GRID[1] // 2)
    rows, columns = bilinear_matrix(third.shape[-2], GRID[0]), bilinear_matrix(third.shape[-1], GRID[1])
    resized = rows @ neighbourhood_mean(third) @ columns.t()
    expected = torch.cat([neighbourhood_mean(second), resized], dim=1)
    features = model.embed(batch)
    assert features.shape == (2, CHANNELS, *GRID) and model.embedding_size == CHANNELS
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_border_cells_average_over_nine_with_zeros_beyond_the_border():
    ones = torch.ones(1, 1, 4, 4)
    edge = torch.tensor([4, 6, 6, 4]) / 9
    expected = torch.stack([edge, torch.tensor([6 / 9, 1, 1, 6 / 9]), torch.tensor([6 / 9, 1, 1, 6 / 9]), edge])
    torch.testing.assert_close(neighbourhood_mean(ones)[0, 0], expected)
    torch.testing.assert_close(F.avg_pool2d(ones, 3, stride=1, padding=1)[0, 0], expected)


# ------------------------------------------------------------------ fitting
def test_fit_keeps_a_coreset_of_the_patches_as_the_bank(fitted):
    model = tiny_patchcore()
    assert not model.is_fitted and model.memory_bank_ is None and model.grid_shape_ is None
    batches = [images(6), images(5, seed=1)]
    assert model.fit(batches) is model
    assert model.is_fitted and model.n_train_ == 11 and model.grid_shape_ == GRID
    patches = torch.cat([patch_rows(model, batch) for batch in batches]).reshape(-1, CHANNELS)
    # 704 patches in chunks of 256, 256 and 192, a quarter of each kept.
    assert model.memory_bank_.shape == (64 + 64 + 48, CHANNELS) and model.memory_bank_.dtype == torch.float32
    rounded = patches.to(BANK_DTYPE).float()
    assert all((rounded == row).all(dim=1).any() for row in model.memory_bank_)  # training patches, rounded
    assert (model.coreset_ratio, model.num_neighbors, model.chunk_patches) == (0.25, 9, 256)
    assert model.threshold_ is None and model.calibration_ is None and model.score_stats_ == {}
    assert torch.equal(model.memory_bank_, fitted.memory_bank_)  # the same settings give the same bank
    other = tiny_patchcore(seed=5).fit(batches)
    assert not torch.equal(other.memory_bank_, fitted.memory_bank_)


def test_ratio_one_keeps_every_training_patch():
    batches = [images(3), images(2, seed=1)]
    model = tiny_patchcore(coreset_ratio=1.0).fit(batches)
    patches = torch.cat([patch_rows(model, batch) for batch in batches]).reshape(-1, CHANNELS)
    assert torch.equal(model.memory_bank_, patches.to(BANK_DTYPE).float())


def test_shards_accumulated_apart_merge_by_concatenation():
    """Each shard reduces its own chunks; their banks together are a bank of all the images
    (another draw of starting points than one fit's, the same size when the chunks line up)."""
    model = tiny_patchcore(chunk_patches=64)
    first, grid = model.accumulate([images(6)])
    second, _ = model.accumulate([images(5, seed=1)])
    model.set_memory_bank(torch.cat([first.bank(), second.bank()]), grid, first.seen // 64 + second.seen // 64)
    whole = tiny_patchcore(chunk_patches=64).fit([images(6), images(5, seed=1)])
    assert model.memory_bank_.shape == whole.memory_bank_.shape == (11 * 16, CHANNELS)
    assert model.n_train_ == 11 and model.grid_shape_ == GRID


# ------------------------------------------------------------------ prediction
def test_predict_gives_scores_and_blurred_upsampled_patch_distances(fitted):
    batch = images(3, seed=5)
    scores, maps = fitted.predict(batch)
    assert scores.shape == (3,) and maps.shape == (3, SIZE, SIZE)
    assert scores.dtype == maps.dtype == torch.float32 and scores.device.type == "cpu"
    distances = torch.cdist(patch_rows(fitted, batch).double(), fitted.memory_bank_.double()).min(dim=2).values
    expected = MapResizer(GRID, (SIZE, SIZE), fitted.blur_sigma)(distances.float().reshape(3, *GRID))[1]
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-4)


def test_image_scores_follow_the_papers_reweighting(fitted):
    batch = images(4, seed=6)
    expected = reference_scores(patch_rows(fitted, batch), fitted.memory_bank_, fitted.num_neighbors)
    torch.testing.assert_close(fitted.predict(batch)[0], expected, rtol=1e-4, atol=1e-4)


def test_one_neighbour_gives_the_largest_patch_score(fitted):
    model = PatchcoreModel.load(rewrite_model_file(fitted.to_bytes(), settings={
        **model_metadata(fitted.to_bytes())["settings"], "num_neighbors": 1}))
    batch = images(3, seed=7)
    largest = torch.cdist(patch_rows(model, batch).double(), model.memory_bank_.double()).min(dim=2).values.amax(dim=1)
    torch.testing.assert_close(model.predict(batch)[0], largest.float(), rtol=1e-4, atol=1e-4)
    assert (fitted.predict(batch)[0] < model.predict(batch)[0]).all()  # the weight is below 1


def hand_built(num_neighbors: int) -> PatchcoreModel:
    """A bank of four points in the first two of 384 dimensions: (0,0), (1,0), (0,2), (5,5), and a
    model whose 'features' are two hand-made 8x8 grids: every patch at (0,0) but one, at (3,0) in
    the first image and at (0,4) in the second."""
    def point(x: float, y: float) -> torch.Tensor:
        row = torch.zeros(CHANNELS)
        row[:2] = torch.tensor([x, y])
        return row

    model = tiny_patchcore(num_neighbors=num_neighbors)
    model.set_memory_bank(torch.stack([point(0, 0), point(1, 0), point(0, 2), point(5, 5)]), GRID, 1)
    features = torch.zeros(2, CHANNELS, *GRID)
    features[0, :, 2, 5] = point(3, 0)
    features[1, :, 6, 1] = point(0, 4)
    model.embed = lambda _: features
    return model


def test_image_score_on_a_hand_built_bank_is_the_papers_eq_7():
    scores, maps = hand_built(num_neighbors=3).predict(images(2))
    # Image 1: f* = (3,0); its nearest bank point m* = (1,0) at s* = 2. The 3 bank points nearest
    # m* are (1,0), (0,0), (0,2), at 2, 3 and sqrt(13) from f*.
    # Image 2: f* = (0,4); m* = (0,2) at s* = 2; nearest m*: (0,2), (0,0), (1,0), at 2, 4, sqrt(17).
    first = (1 - math.exp(2) / (math.exp(2) + math.exp(3) + math.exp(math.sqrt(13)))) * 2
    second = (1 - math.exp(2) / (math.exp(2) + math.exp(4) + math.exp(math.sqrt(17)))) * 2
    assert first == pytest.approx(1.7701, abs=1e-4) and second == pytest.approx(1.8806, abs=1e-4)
    torch.testing.assert_close(scores, torch.tensor([first, second]), rtol=1e-6, atol=1e-6)
    distances = torch.zeros(2, *GRID)
    distances[0, 2, 5] = distances[1, 6, 1] = 2
    torch.testing.assert_close(maps, MapResizer(GRID, (SIZE, SIZE), 4.0)(distances)[1])


def test_one_neighbour_on_a_hand_built_bank_is_the_largest_patch_distance():
    scores, _ = hand_built(num_neighbors=1).predict(images(2))
    torch.testing.assert_close(scores, torch.tensor([2.0, 2.0]))


def test_uint8_pixels_and_normalised_images_agree(fitted):
    batch = pixels(3, seed=2)
    from_pixels = fitted.predict(batch)
    from_normalised = fitted.predict(fitted.transform.normalize(batch))
    torch.testing.assert_close(from_pixels[0], from_normalised[0])
    torch.testing.assert_close(from_pixels[1], from_normalised[1])


def test_batch_size_does_not_change_results(fitted):
    batch = images(4, seed=9)
    scores = fitted.predict(batch)[0]
    single = torch.cat([fitted.predict(batch[i : i + 1])[0] for i in range(4)])
    torch.testing.assert_close(single, scores, rtol=1e-3, atol=1e-3)


def test_training_images_score_lower_than_distorted_ones(fitted):
    assert fitted.predict(images(6))[0].max() < fitted.predict(images(6, seed=3) * 4 + 2)[0].min()


# ------------------------------------------------------------------ persistence
def test_save_load_round_trip_reproduces_the_model(fitted, fitted_file, tmp_path):
    path = PatchcoreModel.load(fitted_file).save(tmp_path / "bottle.safetensors")
    loaded = load_detector(path)
    assert type(loaded) is PatchcoreModel and loaded.metadata() == fitted.metadata()
    assert torch.equal(loaded.memory_bank_, fitted.memory_bank_) and loaded.memory_bank_.dtype == torch.float32
    assert loaded.grid_shape_ == GRID and loaded.n_train_ == 11
    batch = images(2, seed=4)
    for ours, theirs in zip(loaded.predict(batch), fitted.predict(batch)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_the_file_holds_the_bank_in_half_precision_and_the_settings(fitted, fitted_file):
    header = json.loads(fitted_file[8 : 8 + struct.unpack("<Q", fitted_file[:8])[0]])
    assert {key for key in header if key != "__metadata__"} == {"memory_bank"}
    assert header["memory_bank"]["dtype"] == "F16" and header["memory_bank"]["shape"] == [176, CHANNELS]
    metadata = json.loads(header["__metadata__"]["padim"])
    assert metadata["kind"] == "patchcore" and metadata["grid_shape"] == list(GRID)
    settings = dict(metadata["settings"])
    assert settings.pop("augmentation")["copies"] == 0  # none asked for
    assert settings == {
        "coreset_ratio": 0.25, "num_neighbors": 9, "seed": 0, "projection_dim": 128, "chunk_patches": 256,
        "embedding_size": CHANNELS,
    }


def test_a_patchcore_file_is_not_a_padim_model(fitted_file):
    with pytest.raises(ModelFileError, match="holds a patchcore model, not padim"):
        PadimModel.load(fitted_file)


# ------------------------------------------------------------------ bad input
def test_settings_out_of_range_are_refused():
    for ratio in (0, 0.0, -0.1, 1.5, math.nan, "0.5", True):
        with pytest.raises(ValueError, match=rf"coreset_ratio must be in \(0, 1\], got {ratio!r}"):
            tiny_patchcore(coreset_ratio=ratio)
    for count in (0, 2.5, True):
        with pytest.raises(ValueError, match=rf"num_neighbors must be an integer >= 1, got {count!r}"):
            tiny_patchcore(num_neighbors=count)
    with pytest.raises(ValueError, match="chunk_patches must be an integer >= 1, got 0"):
        tiny_patchcore(chunk_patches=0)


@pytest.mark.parametrize(("change", "reason"), [
    ({"coreset_ratio": 0}, r"coreset_ratio must be in \(0, 1\], got 0"),
    ({"coreset_ratio": 1.5}, r"coreset_ratio must be in \(0, 1\], got 1.5"),
    ({"coreset_ratio": "all"}, r"coreset_ratio must be in \(0, 1\], got 'all'"),
    ({"num_neighbors": 0}, "num_neighbors must be an integer >= 1, got 0"),
])
def test_a_file_with_settings_out_of_range_is_refused(fitted_file, change, reason):
    settings = {**model_metadata(fitted_file)["settings"], **change}
    with pytest.raises(ModelFileError, match=rf"settings do not describe a usable patchcore model \({reason}\)"):
        load_detector(rewrite_model_file(fitted_file, settings=settings))


def test_more_neighbours_than_bank_rows_is_refused_at_fit():
    # 704 patches, 1% of each 256-patch chunk: a bank of 3 + 3 + 2 rows.
    model = tiny_patchcore(coreset_ratio=0.01, num_neighbors=9)
    with pytest.raises(ValueError, match=r"num_neighbors 9 is larger than the memory bank \(8 patches\); "
                                         "lower num_neighbors or raise coreset_ratio"):
        model.fit([images(6), images(5, seed=1)])


def test_more_neighbours_than_bank_rows_is_refused_at_load(fitted_file):
    settings = {**model_metadata(fitted_file)["settings"], "num_neighbors": 177}
    with pytest.raises(ModelFileError, match=r"num_neighbors 177 is larger than the memory bank \(176 patches\)"):
        load_detector(rewrite_model_file(fitted_file, settings=settings))


def test_a_bank_whose_width_does_not_fit_the_layers_is_refused(fitted_file):
    narrow = torch.zeros(176, 100, dtype=BANK_DTYPE)
    with pytest.raises(ModelFileError, match=rf"tensor memory_bank has shape \(176, 100\), expected \(176, {CHANNELS}\)"):
        load_detector(rewrite_model_file(fitted_file, tensors={"memory_bank": narrow}))
    # The metadata names other layers (or another backbone) than the bank was made of.
    with pytest.raises(ModelFileError, match=rf"embedding_size {CHANNELS} but layers \['layer2'\] give 128"):
        load_detector(rewrite_model_file(fitted_file, layers=["layer2"]))
    with pytest.raises(ModelFileError, match=rf"embedding_size {CHANNELS} but layers \['layer2', 'layer3'\] give 1536"):
        load_detector(rewrite_model_file(fitted_file, backbone="resnet50"))
    settings = {**model_metadata(fitted_file)["settings"], "embedding_size": 1536}
    with pytest.raises(ModelFileError, match="tensor memory_bank has shape"):
        load_detector(rewrite_model_file(fitted_file, backbone="resnet50", settings=settings))


def test_a_bank_of_another_dtype_or_with_nan_is_refused(fitted_file):
    bank = PatchcoreModel.load(fitted_file).memory_bank_
    with pytest.raises(ModelFileError, match="tensor memory_bank is torch.float32, expected torch.float16"):
        load_detector(rewrite_model_file(fitted_file, tensors={"memory_bank": bank}))
    broken = bank.to(BANK_DTYPE)
    broken[3, 7] = float("nan")
    with pytest.raises(ModelFileError, match="memory_bank holds NaN"):
        load_detector(rewrite_model_file(fitted_file, tensors={"memory_bank": broken}))


def test_a_bank_beyond_half_precision_is_refused():
    bank = torch.zeros(10, CHANNELS)
    bank[2, 5] = 1e6
    with pytest.raises(ValueError, match="beyond torch.float16's range"):
        tiny_patchcore().set_memory_bank(bank, GRID, 1)


def test_unfitted_and_empty_fits_are_clear_errors(fitted):
    with pytest.raises(RuntimeError, match="not fitted"):
        tiny_patchcore().predict(images(1))
    with pytest.raises(ValueError, match="at least one batch"):
        tiny_patchcore().fit([])
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, 64, 64\], got \[1, 3, 32, 32\]"):
        fitted.predict(torch.zeros(1, 3, 32, 32))
