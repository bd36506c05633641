"""The streaming Gaussian against a direct computation, merging, and its bad inputs."""

from __future__ import annotations

import pytest
import torch

from padim_core.gaussian import GaussianAccumulator


def _embeddings(n: int = 40, channels: int = 6, locations: int = 750) -> torch.Tensor:
    """Patch embeddings `[L, B, C]`."""
    generator = torch.Generator().manual_seed(0)
    # A large offset makes naive one-pass variance formulas lose precision; ours must not.
    return torch.randn(locations, n, channels, generator=generator) * 2 + 50


def _direct(x: torch.Tensor, regularization: float) -> tuple[torch.Tensor, torch.Tensor]:
    vectors = x.double()
    covariance = torch.stack([torch.cov(v.T) for v in vectors])
    covariance += regularization * torch.eye(x.shape[2], dtype=torch.float64)
    return vectors.mean(1), torch.linalg.inv(covariance)


def test_batches_of_any_size_give_the_direct_mean_and_inverse_covariance():
    x = _embeddings()
    accumulator = GaussianAccumulator.empty((30, 25), 6)
    for part in (x[:, :1], x[:, 1:17], x[:, 17:]):
        accumulator.update(part)
    mean, inverse = accumulator.finalize(0.01)
    expected_mean, expected_inverse = _direct(x, 0.01)
    assert accumulator.count == 40
    assert mean.dtype == inverse.dtype == torch.float32
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(inverse.double(), expected_inverse, rtol=1e-4, atol=1e-5)


def test_accumulators_merge_by_addition():
    x = _embeddings()
    whole = GaussianAccumulator.empty((30, 25), 6).update(x)
    merged = GaussianAccumulator.empty((30, 25), 6).update(x[:, :13]) + GaussianAccumulator.empty((30, 25), 6).update(x[:, 13:])
    assert merged.count == whole.count and merged.grid_shape == whole.grid_shape == (30, 25)
    torch.testing.assert_close(merged.total, whole.total)
    torch.testing.assert_close(merged.outer, whole.outer, rtol=1e-9, atol=1e-6)


def test_memory_does_not_grow_with_the_number_of_images():
    accumulator = GaussianAccumulator.empty((30, 25), 6)
    sizes = {accumulator.outer.numel() + accumulator.total.numel()}
    for _ in range(5):
        accumulator.update(_embeddings(8))
        sizes.add(accumulator.outer.numel() + accumulator.total.numel())
    assert sizes == {750 * 36 + 750 * 6}


def test_regularization_is_added_to_the_diagonal():
    x = _embeddings(5)
    _, small = GaussianAccumulator.empty((30, 25), 6).update(x).finalize(0.01)
    _, large = GaussianAccumulator.empty((30, 25), 6).update(x).finalize(1.0)
    # More regularization -> larger covariance -> smaller inverse.
    assert large.diagonal(dim1=1, dim2=2).max() <= 1.0 + 1e-6
    assert small.diagonal(dim1=1, dim2=2).max() > large.diagonal(dim1=1, dim2=2).max()


def test_bad_inputs_are_clear_errors():
    accumulator = GaussianAccumulator.empty((30, 25), 6)
    with pytest.raises(ValueError, match=r"do not fit an accumulator of 750 locations x 6 channels"):
        accumulator.update(torch.zeros(750, 2, 5))
    accumulator.update(_embeddings(1))
    with pytest.raises(ValueError, match="at least 2 training images, got 1"):
        accumulator.finalize()
    with pytest.raises(ValueError, match="regularization must be >= 0"):
        accumulator.update(_embeddings(3)).finalize(-1.0)
    with pytest.raises(ValueError, match=r"cannot merge accumulators of grid \[30, 25\] x 6 channels and grid \[2, 5\] x 6"):
        accumulator + GaussianAccumulator.empty((2, 5), 6)
    # as many locations, on another grid: the sums would be added location by location, wrongly
    with pytest.raises(ValueError, match=r"grid \[30, 25\] x 6 channels and grid \[25, 30\] x 6 channels"):
        accumulator + GaussianAccumulator.empty((25, 30), 6)
    with pytest.raises(ValueError, match=r"grid \[30, 25\] x 6 channels and grid \[30, 25\] x 5 channels"):
        accumulator + GaussianAccumulator.empty((30, 25), 5)


def test_singular_covariance_without_regularization_is_reported():
    x = _embeddings(3)  # 3 images, 6 channels: rank-deficient covariance
    with pytest.raises(ValueError, match="not positive definite"):
        GaussianAccumulator.empty((30, 25), 6).update(x).finalize(0.0)
