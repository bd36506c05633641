"""From patch embeddings to anomaly maps and image scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def blur_kernel_size(sigma: float) -> int:
    """Odd kernel covering +-4 sigma, as in the paper's code and anomalib."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def mahalanobis_distance(embedding: torch.Tensor, mean: torch.Tensor, inv_covariance: torch.Tensor) -> torch.Tensor:
    """Distance `[B, h, w]` of each patch of `embedding [h, w, B, C]` to its location's Gaussian.

    One batched matrix product per location (`[L, B, C] @ [L, C, C]`): the inverse covariance is
    read once per batch, not once per image. Squared distances that rounding pushes below zero
    are clamped before the square root.
    """
    height, width, batch, channels = embedding.shape
    delta = embedding.reshape(height * width, batch, channels) - mean.unsqueeze(1)
    squared = torch.linalg.vecdot(torch.bmm(delta, inv_covariance), delta)  # [L, B]
    return squared.clamp_min(0).sqrt().t().reshape(batch, height, width)


def resize_and_blur_matrix(source: int, target: int, sigma: float) -> torch.Tensor:
    """`[target, source]` matrix: bilinear upsampling then Gaussian blur (reflect padding), on one axis.

    Both steps are linear and separable, so a whole map is `M_h @ map @ M_w.T`: two small matrix
    products instead of a 2-D convolution with a 33x33 kernel - the same numbers as
    `interpolate(bilinear, align_corners=False)` followed by torchvision's `gaussian_blur`.
    """
    identity = torch.eye(source, dtype=torch.float64).unsqueeze(0)
    upsample = F.interpolate(identity, size=target, mode="linear", align_corners=False)[0].t()  # [target, source]
    if sigma <= 0:
        return upsample.float()
    size = blur_kernel_size(sigma)
    half = size // 2
    if half >= target:
        raise ValueError(f"blur sigma {sigma} needs maps wider than {half} pixels, got {target}")
    offsets = torch.arange(size, dtype=torch.float64) - half
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    columns = F.pad(torch.eye(target, dtype=torch.float64).unsqueeze(1), (half, half), mode="reflect")
    blur = F.conv1d(columns, kernel.view(1, 1, size)).squeeze(1).t()  # [target, target]
    return (blur @ upsample).float()


class AnomalyScorer(nn.Module):
    """Embeddings -> (image scores `[B]`, anomaly maps `[B, H, W]` at the input image size)."""

    def __init__(
        self,
        mean: torch.Tensor,
        inv_covariance: torch.Tensor,
        grid_shape: tuple[int, int],
        image_size: tuple[int, int],
        blur_sigma: float,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("inv_covariance", inv_covariance)
        self.register_buffer("rows", resize_and_blur_matrix(grid_shape[0], image_size[0], blur_sigma))
        self.register_buffer("columns", resize_and_blur_matrix(grid_shape[1], image_size[1], blur_sigma).t())

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distances = mahalanobis_distance(embedding, self.mean, self.inv_covariance)
        maps = torch.matmul(torch.matmul(self.rows, distances), self.columns)
        return maps.flatten(1).amax(dim=1), maps
