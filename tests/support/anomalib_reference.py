"""anomalib 2.x's PadimModel with exactly our backbone weights, layers and channel index."""

from __future__ import annotations

import torch
from anomalib.models.image.padim.torch_model import PadimModel as AnomalibPadim

from padim_core.backbones import efficientnet_lite0_imagenet

# anomalib adds 1e-5 * I on top of the paper's 0.01 * I "for stability"; ours must match it
# when the two are compared number for number.
ANOMALIB_REGULARIZATION = 0.01 + 1e-5


def anomalib_padim(layers: list[str], channel_index: torch.Tensor) -> AnomalibPadim:
    """anomalib's model on timm's tf_efficientnet_lite0, carrying the packaged ImageNet weights."""
    model = AnomalibPadim(
        backbone="tf_efficientnet_lite0", layers=list(layers), pre_trained=False, n_features=len(channel_index)
    )
    extractor = model.feature_extractor.feature_extractor
    weights = efficientnet_lite0_imagenet().state_dict()
    missing, _ = extractor.load_state_dict({k: v for k, v in weights.items() if k in extractor.state_dict()}, strict=False)
    if missing:
        raise RuntimeError(f"anomalib's extractor kept random weights for {missing}")
    model.idx = channel_index.clone()
    return model


def anomalib_fit(model: AnomalibPadim, batches) -> AnomalibPadim:
    """What anomalib's Lightning module does: keep every embedding, then fit the Gaussian."""
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    model.fit()
    return model.eval()


def anomalib_predict(model: AnomalibPadim, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        output = model(images)
    return output.pred_score.flatten(), output.anomaly_map.squeeze(1)
