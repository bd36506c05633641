"""From patch embeddings to anomaly maps and image scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur


def blur_kernel_size(sigma: float) -> int:
    """Odd kernel covering +-4 sigma, as in the paper's code and anomalib."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def mahalanobis_distance(embedding: torch.Tensor, mean: torch.Tensor, inv_covariance: torch.Tensor) -> torch.Tensor:
    """Distance `[B, h, w]` of each patch of `embedding [B, C, h, w]` to its location's Gaussian.

    One batched matrix product per location (`[L, B, C] @ [L, C, C]`): the inverse covariance is
    read once per batch, not once per image. Squared distances that rounding pushes below zero
    are clamped before the square root.
    """
    batch, channels, height, width = embedding.shape
    delta = embedding.reshape(batch, channels, height * width).permute(2, 0, 1) - mean.unsqueeze(1)
    squared = (torch.bmm(delta, inv_covariance) * delta).sum(dim=2)  # [L, B]
    return squared.clamp_min(0).sqrt().t().reshape(batch, height, width)


class AnomalyScorer(nn.Module):
    """Embeddings -> (image scores `[B]`, anomaly maps `[B, H, W]` at the input image size)."""

    def __init__(
        self, mean: torch.Tensor, inv_covariance: torch.Tensor, image_size: tuple[int, int], blur_sigma: float
    ) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("inv_covariance", inv_covariance)
        self.image_size = tuple(image_size)
        self.blur_sigma = float(blur_sigma)
        self.kernel_size = blur_kernel_size(blur_sigma)

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distances = mahalanobis_distance(embedding, self.mean, self.inv_covariance).unsqueeze(1)
        maps = F.interpolate(distances, size=self.image_size, mode="bilinear", align_corners=False)
        if self.blur_sigma > 0:
            maps = gaussian_blur(maps, kernel_size=[self.kernel_size] * 2, sigma=[self.blur_sigma] * 2)
        maps = maps.squeeze(1)
        return maps.flatten(1).amax(dim=1), maps
