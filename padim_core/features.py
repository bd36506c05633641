"""PaDiM's multi-scale patch embedding, reduced to `n_features` dimensions one of two ways.

- `random_subset` (Defard et al., ICPR 2021): a fixed, seeded random subset of the channels.
- `semi_orthogonal` (Kim, Jeong, Kim & Hwang, "Semi-orthogonal Embedding for Efficient
  Unsupervised Anomaly Segmentation", arXiv 2105.14737, 2021): every channel, projected by a
  fixed random matrix W `[E, n_features]` with orthonormal columns (the Q of a seeded Gaussian
  matrix's QR). The Mahalanobis distance in W's span approximates the full embedding's better
  than a subset of the axes does, at the same width and cost of the covariance.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from padim_core.backbones import FeatureExtractor


def random_channel_index(embedding_size: int, n_features: int, seed: int) -> torch.Tensor:
    """A sorted, seeded random subset of `n_features` channels out of `embedding_size`."""
    if not 0 < n_features <= embedding_size:
        raise ValueError(f"n_features must be between 1 and the embedding size {embedding_size}, got {n_features}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(embedding_size, generator=generator)[:n_features].sort().values


EMBEDDINGS = ("random_subset", "semi_orthogonal")


def semi_orthogonal_matrix(embedding_size: int, n_features: int, seed: int) -> torch.Tensor:
    """A seeded `[embedding_size, n_features]` float32 matrix with orthonormal columns."""
    if not 0 < n_features <= embedding_size:
        raise ValueError(f"n_features must be between 1 and the embedding size {embedding_size}, got {n_features}")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(embedding_size, n_features, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # Fix the signs (QR is unique up to them) so the matrix does not depend on the LAPACK build.
    return (q * torch.sign(torch.diagonal(r))).float()


def nearest_index(source: int, target: int) -> torch.Tensor:
    """Source rows that nearest-neighbour resizing picks for each target row (as `interpolate` does)."""
    return (torch.arange(target, dtype=torch.float64) * (source / target)).floor().long().clamp_max(source - 1)


class PatchEmbedder(nn.Module):
    """Images `[B, 3, H, W]` -> patch embeddings `[h, w, B, n_features]` on the first layer's grid.

    With a `projection` `[len(channel_index), n_features]`, the selected channels are then
    projected (the semi-orthogonal embedding selects every channel).

    Patch-major output is the layout both the Gaussian fit and the Mahalanobis distance want
    (one `[B, C]` matrix per location), so it is produced directly: channels are selected and
    deeper layers nearest-upsampled (row and column gathers) per layer, then one concatenation
    writes the result. The numbers equal anomalib's - upsample every layer, concatenate, take
    `channel_index` - permuted to `[h, w, B, C]`.
    """

    def __init__(self, extractor: FeatureExtractor, channel_index: torch.Tensor,
                 projection: torch.Tensor | None = None) -> None:
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
        for i, (layer_start, layer_end) in enumerate(itertools.pairwise(starts)):
            chosen = channel_index[(channel_index >= layer_start) & (channel_index < layer_end)] - layer_start
            self.register_buffer(f"index_{i}", chosen)
        if projection is not None and (projection.ndim != 2 or projection.shape[0] != channel_index.numel()):
            raise ValueError(f"projection must be [{channel_index.numel()}, n_features], got {list(projection.shape)}")
        self.register_buffer("projection", None if projection is None else projection.float())
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
        embedding = torch.cat(parts, dim=3)
        return embedding if self.projection is None else torch.matmul(embedding, self.projection)
