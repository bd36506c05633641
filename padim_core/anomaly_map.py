"""From patch embeddings to anomaly maps and image scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def blur_kernel_size(sigma: float) -> int:
    """Odd kernel covering +-4 sigma, as in the paper's code and anomalib."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def whitening(mean: torch.Tensor, inv_covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(factor, shift)` with `inv_covariance = factor @ factor.T` (Cholesky) and `shift = mean @ factor`.

    Then the Mahalanobis distance of `x` is `|x @ factor - shift|`: one batched matrix product
    with the mean subtraction folded in, and a norm that cannot go negative through rounding.
    The factor is computed in float64, a slice of locations at a time.
    """
    factor = torch.empty_like(inv_covariance)
    for start in range(0, inv_covariance.shape[0], 512):
        part = slice(start, start + 512)
        lower, info = torch.linalg.cholesky_ex(inv_covariance[part].double())
        if bool((info > 0).any()):
            raise ValueError("inverse covariance is not positive definite at some grid locations")
        factor[part] = lower.to(factor.dtype)
    shift = torch.bmm(mean.unsqueeze(1).to(factor.dtype), factor).squeeze(1)
    return factor, shift


def mahalanobis_distance(embedding: torch.Tensor, factor: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Distance `[B, h, w]` of each patch of `embedding [h, w, B, C]` to its location's Gaussian.

    `factor` and `shift` come from `whitening`. One batched product per location
    (`[L, B, C] @ [L, C, C]`) reads the factor once per batch, not once per image.
    """
    height, width, batch, channels = embedding.shape
    patches = embedding.reshape(height * width, batch, channels)
    whitened = torch.baddbmm(shift.unsqueeze(1), patches, factor, beta=-1)  # x @ factor - shift
    return torch.linalg.vector_norm(whitened, dim=2).t().reshape(batch, height, width)


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


class MapResizer(nn.Module):
    """Patch distances `[B, h, w]` -> (image scores `[B]`, anomaly maps `[B, H, W]` at the input size).

    Every detector's map is made this way: bilinear upsampling, a Gaussian blur of `blur_sigma`
    pixels, and the map's maximum as the image score.
    """

    def __init__(self, grid_shape: tuple[int, int], image_size: tuple[int, int], blur_sigma: float) -> None:
        super().__init__()
        self.register_buffer("rows", resize_and_blur_matrix(grid_shape[0], image_size[0], blur_sigma))
        self.register_buffer("columns", resize_and_blur_matrix(grid_shape[1], image_size[1], blur_sigma).t())

    def forward(self, distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = torch.matmul(torch.matmul(self.rows, distances), self.columns)
        return maps.flatten(1).amax(dim=1), maps


class MahalanobisScorer(nn.Module):
    """PaDiM's embeddings `[h, w, B, C]` -> (image scores `[B]`, anomaly maps `[B, H, W]`)."""

    def __init__(
        self,
        mean: torch.Tensor,
        inv_covariance: torch.Tensor,
        grid_shape: tuple[int, int],
        image_size: tuple[int, int],
        blur_sigma: float,
    ) -> None:
        super().__init__()
        factor, shift = whitening(mean, inv_covariance)
        self.register_buffer("factor", factor)
        self.register_buffer("shift", shift)
        self.resize = MapResizer(grid_shape, image_size, blur_sigma)

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.resize(mahalanobis_distance(embedding, self.factor, self.shift))
