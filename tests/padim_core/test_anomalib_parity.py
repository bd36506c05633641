"""Parity with the field's reference: anomalib's PadimModel and PatchcoreModel, same weights and layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from padim_core import patchcore
from padim_core.anomaly_map import resize_and_blur_matrix
from padim_core.datasets import MvtecCategory
from padim_core.nearest import nearest
from padim_core.padim import PadimModel
from padim_core.patchcore import PatchcoreModel

from support.anomalib_reference import (
    ANOMALIB_REGULARIZATION,
    anomalib_fit,
    anomalib_padim,
    anomalib_patchcore,
    anomalib_patchcore_fit,
    anomalib_predict,
    upsample_bilinearly,
)

LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
PATCHCORE_LAYERS = ["blocks.2", "blocks.4"]


@pytest.mark.slow
def test_anomaly_maps_agree_with_anomalib_on_real_images(mvtec_root):
    bottle = MvtecCategory.from_folder(mvtec_root / "bottle")
    ours = PadimModel("efficientnet_lite0", LAYERS, 100, 256, regularization=ANOMALIB_REGULARIZATION)
    train = torch.stack([ours.transform(path) for path in bottle.train_images[:24]])
    test_paths = [s.path for s in bottle.test_samples if s.defect in ("good", "broken_large")][::5]
    test_pixels = torch.stack([ours.transform.to_pixels(path) for path in test_paths])
    test = ours.transform.normalize(test_pixels)

    ours.fit([train[:10], train[10:]])
    our_scores, our_maps = ours.predict(test_pixels)  # uint8: normalised inside, as anomalib's input below
    reference = anomalib_fit(anomalib_padim(LAYERS, ours.channel_index), [train])
    their_scores, their_maps = anomalib_predict(reference, test)

    assert their_maps.shape == our_maps.shape == (len(test_paths), 256, 256)
    scale = float(their_maps.abs().max())
    torch.testing.assert_close(our_maps, their_maps, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(our_scores, their_scores, rtol=1e-4, atol=1e-4 * scale)


@pytest.fixture(scope="module")
def patchcore_pair(mvtec_root):
    """Our PatchCore and anomalib 2.7's, both with every training patch as the bank, and the
    bottle test images they score (uint8 pixels for ours, normalised for anomalib's)."""
    bottle = MvtecCategory.from_folder(mvtec_root / "bottle")
    with pytest.MonkeyPatch.context() as patch:
        # Ours rounds its bank to float16 (the stored dtype; test_patchcore checks it): compared
        # number for number, both keep float32 patches.
        patch.setattr(patchcore, "BANK_DTYPE", torch.float32)
        ours = PatchcoreModel("efficientnet_lite0", PATCHCORE_LAYERS, 256, coreset_ratio=1.0, num_neighbors=9)
        train = torch.stack([ours.transform.to_pixels(path) for path in bottle.train_images[:8]])
        ours.fit([train[:5], train[5:]])
    test_paths = [s.path for s in bottle.test_samples if s.defect in ("good", "broken_large")][::5]
    test = torch.stack([ours.transform.to_pixels(path) for path in test_paths])
    # anomalib's ratio-1.0 coreset is a permutation of every patch: its bank is set to all of them
    # instead of running its quadratic greedy loop (the same nearest-neighbour distances).
    theirs = anomalib_patchcore_fit(anomalib_patchcore(PATCHCORE_LAYERS, num_neighbors=9),
                                    [ours.transform.normalize(train)], ratio=None)
    return ours, theirs, test


@pytest.mark.slow
def test_patchcore_scores_and_bank_agree_with_anomalib_on_real_images(patchcore_pair):
    ours, theirs, test = patchcore_pair
    torch.testing.assert_close(ours.memory_bank_, theirs.memory_bank, rtol=1e-4, atol=1e-4)  # the same patches, in order
    our_scores, _ = ours.predict(test)
    their_scores, _ = anomalib_predict(theirs, ours.transform.normalize(test))
    assert our_scores.shape == their_scores.shape == (len(test),)
    torch.testing.assert_close(our_scores, their_scores, rtol=1e-4, atol=1e-4 * float(their_scores.abs().max()))


@pytest.mark.slow
def test_patchcore_maps_differ_from_anomalib_only_by_bilinear_upsampling(patchcore_pair, monkeypatch):
    """anomalib upsamples patch distances with nearest-neighbour interpolation; ours bilinearly
    (the paper's, and our PaDiM's), then both blur with sigma 4. With anomalib switched to
    bilinear the maps are equal; with its own nearest upsampling, its maps are the blur of our
    patch distances upsampled by nearest neighbour."""
    ours, theirs, test = patchcore_pair
    normalised = ours.transform.normalize(test)
    _, our_maps = ours.predict(test)
    _, nearest_maps = anomalib_predict(theirs, normalised)
    upsample_bilinearly(monkeypatch)
    _, bilinear_maps = anomalib_predict(theirs, normalised)
    scale = float(bilinear_maps.abs().max())
    assert our_maps.shape == bilinear_maps.shape == (len(test), 256, 256)
    torch.testing.assert_close(our_maps, bilinear_maps, rtol=1e-4, atol=1e-4 * scale)

    features = ours.embed(test)
    distances = nearest(features.flatten(2).transpose(1, 2).reshape(-1, ours.embedding_size), ours.memory_bank_)[0]
    upsampled = F.interpolate(distances.reshape(len(test), 1, *ours.grid_shape_), size=(256, 256), mode="nearest")
    blur = resize_and_blur_matrix(256, 256, ours.blur_sigma)  # [256, 256]: the blur alone
    torch.testing.assert_close(nearest_maps, blur @ upsampled[:, 0] @ blur.t(), rtol=1e-4, atol=1e-4 * scale)
    assert float((our_maps - nearest_maps).abs().max()) > 0.01 * scale  # a real difference, and only that one
