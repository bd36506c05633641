"""Streaming multivariate Gaussians, one per grid location.

Fitting keeps running sums per location - count, sum, sum of outer products, and the two
fourth-moment sums Ledoit-Wolf shrinkage needs, all in float64 - so memory is fixed by the grid
and channel count, never by the number of training images, and partial fits from several
workers combine by plain addition.

Finalising turns the sums into a covariance per location and regularises it:

- `shrinkage` pulls the covariance S towards its own average variance mu = tr(S)/p
  (`(1 - s) S + s mu I`) by an intensity s computed for each location from its statistics:
  Oracle Approximating Shrinkage (Chen, Wiesel, Eldar & Hero, IEEE TSP 2010) from tr(S) and
  tr(S^2) alone; Ledoit-Wolf (J. Multivariate Anal. 2004) also from the fourth moments. The
  intensities are scikit-learn's formulas (`oas`, `ledoit_wolf_shrinkage`) on the biased S.
  Where a few training photos barely differ, S is nearly singular and its smallest directions
  are estimation noise; shrinkage lifts them in proportion to the location's own spread.
- `regularization` is then added to the diagonal: as is (`absolute`, PaDiM's 0.01), times the
  location's own average variance mu (`location_variance`), or times the average of mu over all
  locations (`global_variance`). The last is Tikhonov regularisation in the features' own units:
  a floor under every direction's variance that does not depend on the backbone's scale, and
  that lets a direction count only as far as it varies more than that floor.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

# Locations folded per step in `update`: bounds its temporaries to a few tens of MB.
_LOCATIONS_PER_STEP = 512

SHRINKAGE = ("none", "oas", "ledoit_wolf")
REGULARIZATION_SCALES = ("absolute", "location_variance", "global_variance")

_FLAT_LOCATION_SHARE = 1e-3
"""A `location_variance`-scaled regularisation where a location's features never vary (tr(S) = 0)
uses this share of the average variance over all locations instead, so the covariance stays invertible."""


@dataclass
class GaussianAccumulator:
    """Running sums for the Gaussians of a `grid_shape` grid of locations over `channels` dimensions."""

    grid_shape: tuple[int, int]
    count: int
    total: torch.Tensor  # [L, C] float64, L = height * width, row-major
    outer: torch.Tensor  # [L, C, C] float64
    norm4: torch.Tensor  # [L] float64: sum of |x|^4
    norm2_x: torch.Tensor  # [L, C] float64: sum of |x|^2 x

    @classmethod
    def empty(cls, grid_shape: tuple[int, int], channels: int, device: torch.device | str = "cpu") -> GaussianAccumulator:
        locations = grid_shape[0] * grid_shape[1]

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(locations, *shape, dtype=torch.float64, device=device)

        return cls(grid_shape=tuple(grid_shape), count=0, total=zeros(channels), outer=zeros(channels, channels),
                   norm4=zeros(), norm2_x=zeros(channels))

    @property
    def locations(self) -> int:
        return self.total.shape[0]

    @property
    def channels(self) -> int:
        return self.total.shape[1]

    def update(self, patches: torch.Tensor) -> GaussianAccumulator:
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
        for start in range(0, self.locations, _LOCATIONS_PER_STEP):
            rows = slice(start, start + _LOCATIONS_PER_STEP)
            part = patches[rows].to(torch.float64, memory_format=torch.contiguous_format)
            self.outer[rows].baddbmm_(part.transpose(1, 2), part)
            squared = part.square().sum(dim=2, keepdim=True)  # [l, B, 1]
            self.norm4[rows] += squared.square().sum(dim=(1, 2))
            self.norm2_x[rows] += torch.bmm(squared.transpose(1, 2), part).squeeze(1)
        self.total += patches.sum(dim=1, dtype=torch.float64)
        self.count += batch
        return self

    def __add__(self, other: GaussianAccumulator) -> GaussianAccumulator:
        merged = GaussianAccumulator(self.grid_shape, self.count, **{name: value.clone() for name, value in self.tensors().items()})
        merged += other
        return merged

    def __iadd__(self, other: GaussianAccumulator) -> GaussianAccumulator:
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

    def tensors(self) -> dict[str, torch.Tensor]:
        """The running sums by name (all but the grid shape and the count)."""
        return {item.name: getattr(self, item.name) for item in fields(self)
                if isinstance(getattr(self, item.name), torch.Tensor)}

    def finalize(self, regularization: float = 0.01, *, shrinkage: str = "none",
                 regularization_scale: str = "absolute") -> tuple[torch.Tensor, torch.Tensor]:
        """Mean `[L, C]` and inverse covariance `[L, C, C]`, both float32.

        The covariance is the unbiased one (divides by n - 1, as the paper and anomalib do),
        shrunk by `shrinkage`, plus `regularization` on the diagonal (times the location's average
        variance with `regularization_scale="location_variance"`, times its mean over all locations
        with `"global_variance"`).
        """
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 training images, got {self.count}")
        if regularization < 0:
            raise ValueError(f"regularization must be >= 0, got {regularization}")
        if shrinkage not in SHRINKAGE:
            raise ValueError(f"shrinkage {shrinkage!r} is not one of {list(SHRINKAGE)}")
        if regularization_scale not in REGULARIZATION_SCALES:
            raise ValueError(f"regularization_scale {regularization_scale!r} is not one of {list(REGULARIZATION_SCALES)}")
        n, p = self.count, self.channels
        mean = self.total / n
        # The average variance over every location and channel: the global scale, and the floor of flat locations.
        traces = self.outer.diagonal(dim1=1, dim2=2).sum(dim=1) - n * mean.square().sum(dim=1)
        overall = float(traces.clamp_min(0).mean()) / (n - 1) / p
        floor = _FLAT_LOCATION_SHARE * overall
        inverse = torch.empty(self.outer.shape, dtype=torch.float32, device=self.outer.device)
        identity = torch.eye(p, dtype=torch.float64, device=self.outer.device)
        for start in range(0, self.locations, _LOCATIONS_PER_STEP):
            rows = slice(start, start + _LOCATIONS_PER_STEP)
            centred = torch.baddbmm(self.outer[rows], mean[rows].unsqueeze(2), mean[rows].unsqueeze(1), alpha=-n)
            covariance = centred / (n - 1)
            average = (covariance.diagonal(dim1=1, dim2=2).sum(dim=1) / p).clamp_min(0)  # mu per location
            if shrinkage != "none":
                intensity = self._intensity(shrinkage, centred / n, rows, mean[rows])
                covariance = (1 - intensity)[:, None, None] * covariance + (intensity * average)[:, None, None] * identity
            scale = {"absolute": torch.ones_like(average), "global_variance": torch.full_like(average, overall),
                     "location_variance": average.where(average > 0, torch.full_like(average, floor))}[regularization_scale]
            covariance = covariance + (regularization * scale)[:, None, None] * identity
            factor, info = torch.linalg.cholesky_ex(covariance)
            if bool((info > 0).any()):
                raise ValueError(
                    "covariance is not positive definite at some grid locations; "
                    f"raise regularization above {regularization}"
                )
            inverse[rows] = torch.cholesky_inverse(factor)
        return mean.float(), inverse

    def shrinkage_intensity(self, shrinkage: str) -> torch.Tensor:
        """The intensity `[L]` in [0, 1] that `finalize` would use at each location."""
        if shrinkage not in SHRINKAGE:
            raise ValueError(f"shrinkage {shrinkage!r} is not one of {list(SHRINKAGE)}")
        n = self.count
        mean = self.total / n
        if shrinkage == "none":
            return torch.zeros(self.locations, dtype=torch.float64, device=self.total.device)
        parts = []
        for start in range(0, self.locations, _LOCATIONS_PER_STEP):
            rows = slice(start, start + _LOCATIONS_PER_STEP)
            centred = torch.baddbmm(self.outer[rows], mean[rows].unsqueeze(2), mean[rows].unsqueeze(1), alpha=-n)
            parts.append(self._intensity(shrinkage, centred / n, rows, mean[rows]))
        return torch.cat(parts)

    def _intensity(self, shrinkage: str, biased: torch.Tensor, rows: slice, mean: torch.Tensor) -> torch.Tensor:
        """Shrinkage intensity per location of a slice, from its biased covariance `[l, C, C]`."""
        n, p = self.count, self.channels
        trace = biased.diagonal(dim1=1, dim2=2).sum(dim=1)
        mu = trace / p
        frobenius = biased.square().sum(dim=(1, 2))  # tr(S^2)
        if shrinkage == "oas":
            alpha = frobenius / p**2
            denominator = (n + 1) * (alpha - mu.square() / p)
            ratio = (alpha + mu.square()) / denominator.where(denominator > 0, torch.ones_like(denominator))
            return ratio.clamp(max=1.0).where(denominator > 0, torch.ones_like(denominator))
        # Ledoit-Wolf: sum over images of |x - m|^4 from the raw sums, |x - m|^2 = a - 2b + c with
        # a = |x|^2, b = x.m, c = |m|^2 (the sums of a^2, a x, x x^T and x are kept).
        a2 = self.norm4[rows]
        ab = (self.norm2_x[rows] * mean).sum(dim=1)
        b2 = torch.bmm(torch.bmm(mean.unsqueeze(1), self.outer[rows]), mean.unsqueeze(2)).reshape(-1)
        a = self.outer[rows].diagonal(dim1=1, dim2=2).sum(dim=1)
        b = (self.total[rows] * mean).sum(dim=1)
        c = mean.square().sum(dim=1)
        fourth = a2 - 4 * ab + 4 * b2 + 2 * c * a - 4 * c * b + n * c.square()
        beta = ((fourth / n - frobenius) / (p * n)).clamp_min(0)
        delta = (frobenius - trace.square() / p) / p  # |S - mu I|_F^2 / p
        beta = torch.minimum(beta, delta)
        return (beta / delta.where(delta > 0, torch.ones_like(delta))).where(delta > 0, torch.zeros_like(delta))
