"""anomalib 2.x's PadimModel and PatchcoreModel with exactly our backbone weights and layers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from anomalib.models.image.padim.torch_model import PadimModel as AnomalibPadim
from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator
from anomalib.models.image.patchcore.torch_model import (
    PatchcoreModel as AnomalibPatchcore,
)

from padim_core.backbones import efficientnet_lite0_imagenet

if TYPE_CHECKING:
    import pytest

# anomalib adds 1e-5 * I on top of the paper's 0.01 * I "for stability"; ours must match it
# when the two are compared number for number.
ANOMALIB_REGULARIZATION = 0.01 + 1e-5


def _load_lite0_weights(extractor: torch.nn.Module) -> None:
    """Our packaged ImageNet weights into anomalib's timm tf_efficientnet_lite0 extractor."""
    weights = efficientnet_lite0_imagenet().state_dict()
    missing, _ = extractor.load_state_dict({k: v for k, v in weights.items() if k in extractor.state_dict()}, strict=False)
    if missing:
        raise RuntimeError(f"anomalib's extractor kept random weights for {missing}")


def anomalib_padim(layers: list[str], channel_index: torch.Tensor) -> AnomalibPadim:
    """anomalib's model on timm's tf_efficientnet_lite0, carrying the packaged ImageNet weights."""
    model = AnomalibPadim(
        backbone="tf_efficientnet_lite0", layers=list(layers), pre_trained=False, n_features=len(channel_index)
    )
    _load_lite0_weights(model.feature_extractor.feature_extractor)
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


def anomalib_predict(model: AnomalibPadim | AnomalibPatchcore, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores `[B]` and maps `[B, H, W]` of normalised images."""
    with torch.no_grad():
        output = model(images)
    return output.pred_score.flatten(), output.anomaly_map.squeeze(1)


def anomalib_patchcore(layers: list[str], num_neighbors: int = 9) -> AnomalibPatchcore:
    """anomalib's PatchCore on timm's tf_efficientnet_lite0, carrying the packaged ImageNet weights."""
    model = AnomalibPatchcore(layers=list(layers), backbone="tf_efficientnet_lite0", pre_trained=False,
                              num_neighbors=num_neighbors)
    _load_lite0_weights(model.feature_extractor.feature_extractor)
    return model


def anomalib_patchcore_fit(model: AnomalibPatchcore, batches: Iterable[torch.Tensor], ratio: float | None) -> AnomalibPatchcore:
    """What anomalib's Lightning module does: keep every training patch, then subsample them with
    its KCenterGreedy at `ratio`. `ratio=None` keeps every patch as the bank without running the
    greedy loop: anomalib's ratio-1.0 coreset is a permutation of all patches, which gives the
    same nearest-neighbour distances, and its loop is quadratic in the patches."""
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    if ratio is None:
        model.memory_bank = torch.vstack(model.embedding_store)
        model.embedding_store.clear()
    else:
        model.subsample_embedding(ratio)
    return model.eval()


def upsample_bilinearly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make anomalib's PatchCore maps upsample the patch scores bilinearly (the paper's and ours)
    instead of with its nearest-neighbour `F.interpolate` default; the blur is unchanged."""
    def compute_anomaly_map(self, patch_scores: torch.Tensor, image_size=None) -> torch.Tensor:
        if image_size is not None:
            patch_scores = F.interpolate(patch_scores, size=tuple(image_size), mode="bilinear", align_corners=False)
        return self.blur(patch_scores)

    monkeypatch.setattr(AnomalyMapGenerator, "compute_anomaly_map", compute_anomaly_map)
