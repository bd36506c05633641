"""Streaming multivariate Gaussians, one per grid location.

Fitting keeps three running sums per location - count, sum and sum of outer products, all in
float64 - so memory is fixed by the grid and channel count, never by the number of training
images, and partial fits from several workers combine by plain addition.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

# Locations folded per step in `update`: bounds its temporaries to a few tens of MB.
_LOCATIONS_PER_STEP = 512


@dataclass
class GaussianAccumulator:
    """Running sums for the Gaussians of a `grid_shape` grid of locations over `channels` dimensions."""

    grid_shape: tuple[int, int]
    count: int
    total: torch.Tensor  # [L, C] float64, L = height * width, row-major
    outer: torch.Tensor  # [L, C, C] float64

    @classmethod
    def empty(cls, grid_shape: tuple[int, int], channels: int, device: torch.device | str = "cpu") -> "GaussianAccumulator":
        locations = grid_shape[0] * grid_shape[1]
        return cls(
            grid_shape=tuple(grid_shape),
            count=0,
            total=torch.zeros(locations, channels, dtype=torch.float64, device=device),
            outer=torch.zeros(locations, channels, channels, dtype=torch.float64, device=device),
        )

    @property
    def locations(self) -> int:
        return self.total.shape[0]

    @property
    def channels(self) -> int:
        return self.total.shape[1]

    def update(self, patches: torch.Tensor) -> "GaussianAccumulator":
        """Add a batch of patch embeddings `[L, B, C]` (one `[B, C]` matrix per location)."""
        if patches.ndim != 3 or patches.shape[0] != self.locations or patches.shape[2] != self.channels:
            raise ValueError(
                f"patches of shape {tuple(patches.shape)} do not fit an accumulator of "
                f"{self.locations} locations x {self.channels} channels ([L, B, C] expected)"
            )
        batch = patches.shape[1]
        # Raw float64 sums, as the accumulator promises; one in-place batched product per slice
        # of locations (float64 baddbmm runs as fast as a float32 bmm followed by a mixed-type
        # add, and the slices keep temporaries to a few tens of MB).
        x = patches
        for start in range(0, self.locations, _LOCATIONS_PER_STEP):
            part = x[start : start + _LOCATIONS_PER_STEP].to(torch.float64, memory_format=torch.contiguous_format)
            self.outer[start : start + _LOCATIONS_PER_STEP].baddbmm_(part.transpose(1, 2), part)
        self.total += x.sum(dim=1, dtype=torch.float64)
        self.count += batch
        return self

    def __add__(self, other: "GaussianAccumulator") -> "GaussianAccumulator":
        merged = GaussianAccumulator(self.grid_shape, self.count, **{name: value.clone() for name, value in self.tensors().items()})
        merged += other
        return merged

    def __iadd__(self, other: "GaussianAccumulator") -> "GaussianAccumulator":
        """Merge `other` into these sums in place (a driver merging shards then holds one set, not two)."""
        if (self.grid_shape, self.channels) != (other.grid_shape, other.channels):
            raise ValueError(
                f"cannot merge accumulators of grid {list(self.grid_shape)} x {self.channels} channels and "
                f"grid {list(other.grid_shape)} x {other.channels} channels"
            )
        for name, value in other.tensors().items():
            getattr(self, name).add_(value.to(getattr(self, name).device))
        self.count += other.count
        return self

    def to_cpu(self) -> "GaussianAccumulator":
        """These sums on the CPU (to send them to another process)."""
        return GaussianAccumulator(self.grid_shape, self.count, **{name: value.cpu() for name, value in self.tensors().items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        """The running sums by name (all but the grid shape and the count)."""
        return {item.name: getattr(self, item.name) for item in fields(self)
                if isinstance(getattr(self, item.name), torch.Tensor)}

    def finalize(self, regularization: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean `[L, C]` and inverse covariance `[L, C, C]`, both float32.

        The covariance is the unbiased one (divides by n - 1, as the paper and anomalib do)
        plus `regularization * I`.
        """
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 training images, got {self.count}")
        if regularization < 0:
            raise ValueError(f"regularization must be >= 0, got {regularization}")
        mean = self.total / self.count
        inverse = torch.empty(self.outer.shape, dtype=torch.float32, device=self.outer.device)
        identity = regularization * torch.eye(self.channels, dtype=torch.float64, device=self.outer.device)
        for start in range(0, self.locations, _LOCATIONS_PER_STEP):
            part = slice(start, start + _LOCATIONS_PER_STEP)
            centred_outer = torch.baddbmm(self.outer[part], mean[part].unsqueeze(2), mean[part].unsqueeze(1), alpha=-self.count)
            covariance = centred_outer / (self.count - 1) + identity
            factor, info = torch.linalg.cholesky_ex(covariance)
            if bool((info > 0).any()):
                raise ValueError(
                    "covariance is not positive definite at some grid locations; "
                    f"raise regularization above {regularization}"
                )
            inverse[part] = torch.cholesky_inverse(factor)
        return mean.float(), inverse
