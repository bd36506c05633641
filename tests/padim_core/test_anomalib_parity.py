"""Parity with the field's reference: anomalib's PadimModel, same weights, layers and channels."""

from __future__ import annotations

import pytest
import torch

from padim_core.datasets import MvtecCategory
from padim_core.padim import PadimModel

from support.anomalib_reference import ANOMALIB_REGULARIZATION, anomalib_fit, anomalib_padim, anomalib_predict

LAYERS = ["blocks.1", "blocks.2", "blocks.4"]


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
