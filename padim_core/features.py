"""PaDiM's multi-scale patch embedding with a fixed random subset of channels."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from padim_core.backbones import FeatureExtractor, get_backbone


def random_channel_index(embedding_size: int, n_features: int, seed: int) -> torch.Tensor:
    """A sorted, seeded random subset of `n_features` channels out of `embedding_size`."""
    if not 0 < n_features <= embedding_size:
        raise ValueError(f"n_features must be between 1 and the embedding size {embedding_size}, got {n_features}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(embedding_size, generator=generator)[:n_features].sort().values


class PatchEmbedder(nn.Module):
    """Images `[B, 3, H, W]` -> embeddings `[B, n_features, h, w]` on the first layer's grid.

    Channels are selected per layer before upsampling, so unused channels are never upsampled or
    concatenated. The result equals concatenating every layer (nearest-neighbour upsampled, as
    anomalib does) and then taking `channel_index`.
    """

    def __init__(
        self, backbone: str, layers: Sequence[str], channel_index: torch.Tensor, pretrained: bool = True
    ) -> None:
        super().__init__()
        spec = get_backbone(backbone)
        self.extractor = FeatureExtractor(backbone, layers, pretrained=pretrained)
        sizes = [spec.layer_channels[layer] for layer in self.extractor.layers]
        channel_index = torch.as_tensor(channel_index, dtype=torch.long)
        if channel_index.numel() == 0 or int(channel_index.max()) >= sum(sizes) or int(channel_index.min()) < 0:
            raise ValueError(f"channel index must lie in [0, {sum(sizes)}), got {channel_index.tolist()[:8]}...")
        if not torch.equal(channel_index, channel_index.sort().values):
            raise ValueError("channel index must be sorted in ascending order")
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        self.n_layers = len(sizes)
        for i, (layer_start, layer_end) in enumerate(zip(starts[:-1], starts[1:])):
            chosen = channel_index[(channel_index >= layer_start) & (channel_index < layer_end)] - layer_start
            self.register_buffer(f"index_{i}", chosen)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.extractor(images)
        grid = features[0].shape[-2:]
        parts = []
        for i, feature in enumerate(features):
            index = getattr(self, f"index_{i}")
            if index.numel() == 0:
                continue
            selected = feature.index_select(1, index)
            if selected.shape[-2:] != grid:
                selected = F.interpolate(selected, size=grid, mode="nearest")
            parts.append(selected)
        return torch.cat(parts, dim=1)
