"""PaDiM's multi-scale patch embedding with a fixed random subset of channels."""

from __future__ import annotations

import torch
from torch import nn

from padim_core.backbones import FeatureExtractor


def random_channel_index(embedding_size: int, n_features: int, seed: int) -> torch.Tensor:
    """A sorted, seeded random subset of `n_features` channels out of `embedding_size`."""
    if not 0 < n_features <= embedding_size:
        raise ValueError(f"n_features must be between 1 and the embedding size {embedding_size}, got {n_features}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(embedding_size, generator=generator)[:n_features].sort().values


def nearest_index(source: int, target: int) -> torch.Tensor:
    """Source rows that nearest-neighbour resizing picks for each target row (as `interpolate` does)."""
    return (torch.arange(target, dtype=torch.float64) * (source / target)).floor().long().clamp_max(source - 1)


class PatchEmbedder(nn.Module):
    """Images `[B, 3, H, W]` -> patch embeddings `[h, w, B, n_features]` on the first layer's grid.

    Patch-major output is the layout both the Gaussian fit and the Mahalanobis distance want
    (one `[B, C]` matrix per location), so it is produced directly: channels are selected and
    deeper layers nearest-upsampled (row and column gathers) per layer, then one concatenation
    writes the result. The numbers equal anomalib's - upsample every layer, concatenate, take
    `channel_index` - permuted to `[h, w, B, C]`.
    """

    def __init__(self, extractor: FeatureExtractor, channel_index: torch.Tensor) -> None:
        super().__init__()
        self.extractor = extractor
        sizes = extractor.channels
        channel_index = torch.as_tensor(channel_index, dtype=torch.long)
        if channel_index.numel() == 0 or int(channel_index.max()) >= sum(sizes) or int(channel_index.min()) < 0:
            raise ValueError(f"channel index must lie in [0, {sum(sizes)}), got {channel_index.tolist()[:8]}...")
        if not torch.equal(channel_index, channel_index.sort().values):
            raise ValueError("channel index must be sorted in ascending order")
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        for i, (layer_start, layer_end) in enumerate(zip(starts[:-1], starts[1:])):
            chosen = channel_index[(channel_index >= layer_start) & (channel_index < layer_end)] - layer_start
            self.register_buffer(f"index_{i}", chosen)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.extractor(images)
        height, width = features[0].shape[-2:]
        parts = []
        for i, feature in enumerate(features):
            index = getattr(self, f"index_{i}")
            if index.numel() == 0:
                continue
            selected = feature.index_select(1, index).permute(2, 3, 0, 1)  # [h_i, w_i, B, c_i]
            if selected.shape[0] != height:
                selected = selected.index_select(0, nearest_index(selected.shape[0], height).to(selected.device))
            if selected.shape[1] != width:
                selected = selected.index_select(1, nearest_index(selected.shape[1], width).to(selected.device))
            parts.append(selected)
        return torch.cat(parts, dim=3)
