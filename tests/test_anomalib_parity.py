"""Parity with the field's reference: anomalib's PadimModel, same weights, layers and channels."""

from __future__ import annotations

import pytest
import torch
from anomalib.models.image.padim.torch_model import PadimModel as AnomalibPadim

from padim_core.backbones import efficientnet_lite0_imagenet
from padim_core.datasets import MvtecCategory
from padim_core.model import PadimModel

LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
SIZE = 256
# anomalib adds 1e-5 * I on top of the paper's 0.01 * I "for stability"; match it exactly.
ANOMALIB_REGULARIZATION = 0.01 + 1e-5


def _anomalib_model(channel_index: torch.Tensor) -> AnomalibPadim:
    model = AnomalibPadim(backbone="tf_efficientnet_lite0", layers=list(LAYERS), pre_trained=False, n_features=100)
    extractor = model.feature_extractor.feature_extractor
    weights = efficientnet_lite0_imagenet().state_dict()
    missing, _ = extractor.load_state_dict({k: v for k, v in weights.items() if k in extractor.state_dict()}, strict=False)
    assert not missing, f"anomalib's extractor kept random weights for {missing}"
    model.idx = channel_index.clone()
    return model


@pytest.mark.slow
def test_anomaly_maps_agree_with_anomalib_on_real_images(mvtec_root):
    bottle = MvtecCategory.from_folder(mvtec_root / "bottle")
    ours = PadimModel("efficientnet_lite0", LAYERS, 100, SIZE, regularization=ANOMALIB_REGULARIZATION)
    train = torch.stack([ours.transform(path) for path in bottle.train_images[:24]])
    test_paths = [s.path for s in bottle.test_samples if s.defect in ("good", "broken_large")][::5]
    test = torch.stack([ours.transform(path) for path in test_paths])

    ours.fit([train[:10], train[10:]])
    our_scores, our_maps = ours.predict(test)

    reference = _anomalib_model(ours.channel_index).train()
    with torch.no_grad():
        reference(train)
    reference.fit()
    reference.eval()
    with torch.no_grad():
        output = reference(test)
    their_maps = output.anomaly_map.squeeze(1)

    assert their_maps.shape == our_maps.shape
    scale = float(their_maps.abs().max())
    torch.testing.assert_close(our_maps, their_maps, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(our_scores, output.pred_score.flatten(), rtol=1e-4, atol=1e-4 * scale)
