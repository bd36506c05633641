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
    torch.testing.assert_close(merged.norm4, whole.norm4, rtol=1e-9, atol=1e-3)
    torch.testing.assert_close(merged.norm2_x, whole.norm2_x, rtol=1e-9, atol=1e-3)


def _size(accumulator: GaussianAccumulator) -> int:
    return sum(t.numel() for t in (accumulator.total, accumulator.outer, accumulator.norm4, accumulator.norm2_x))


def test_memory_does_not_grow_with_the_number_of_images():
    accumulator = GaussianAccumulator.empty((30, 25), 6)
    sizes = {_size(accumulator)}
    for _ in range(5):
        accumulator.update(_embeddings(8))
        sizes.add(_size(accumulator))
    assert sizes == {750 * 36 + 750 * 6 + 750 + 750 * 6}


def test_regularization_is_added_to_the_diagonal():
    x = _embeddings(5)
    _, small = GaussianAccumulator.empty((30, 25), 6).update(x).finalize(0.01)
    _, large = GaussianAccumulator.empty((30, 25), 6).update(x).finalize(1.0)
    # More regularization -> larger covariance -> smaller inverse.
    assert large.diagonal(dim1=1, dim2=2).max() <= 1.0 + 1e-6
    assert small.diagonal(dim1=1, dim2=2).max() > large.diagonal(dim1=1, dim2=2).max()


def _spread(n: int = 30, channels: int = 8, locations: int = 12) -> torch.Tensor:
    """Embeddings `[L, B, C]` with channels of very different spread, far from the origin."""
    generator = torch.Generator().manual_seed(3)
    return torch.randn(locations, n, channels, generator=generator, dtype=torch.float64) * torch.logspace(-2, 0.5, channels,
                                                                                                          dtype=torch.float64) + 20


@pytest.mark.parametrize("shrinkage", ["oas", "ledoit_wolf"])
def test_shrinkage_intensities_are_scikit_learns_from_the_streamed_sums(shrinkage):
    from sklearn.covariance import ledoit_wolf, oas

    x = _spread()
    accumulator = GaussianAccumulator.empty((3, 4), 8).update(x[:, :11]).update(x[:, 11:])
    reference = {"oas": oas, "ledoit_wolf": ledoit_wolf}[shrinkage]
    expected = torch.tensor([reference(location.numpy())[1] for location in x], dtype=torch.float64)
    intensity = accumulator.shrinkage_intensity(shrinkage)
    torch.testing.assert_close(intensity, expected, rtol=1e-6, atol=1e-9)
    assert ((intensity > 0.01) & (intensity < 1)).all()
    assert (accumulator.shrinkage_intensity("none") == 0).all()


def test_shrunk_covariance_pulls_towards_the_average_variance_then_adds_the_regularization():
    x = _spread()
    accumulator = GaussianAccumulator.empty((3, 4), 8).update(x)
    intensity = accumulator.shrinkage_intensity("oas")
    _, inverse = accumulator.finalize(0.05, shrinkage="oas")
    for location in (0, 7):
        covariance = torch.cov(x[location].T)
        mu = covariance.trace() / 8
        s = intensity[location]
        expected = (1 - s) * covariance + (s * mu + 0.05) * torch.eye(8, dtype=torch.float64)
        torch.testing.assert_close(inverse[location].double(), torch.linalg.inv(expected), rtol=1e-4, atol=1e-4)
    # Shrinkage lifts the smallest variances: the largest eigenvalue of the inverse falls.
    _, plain = accumulator.finalize(0.05)
    assert (torch.linalg.eigvalsh(inverse.double())[:, -1] < torch.linalg.eigvalsh(plain.double())[:, -1]).all()


def test_variance_scaled_regularization_follows_each_locations_spread():
    x = _spread()
    x[5] = (x[5] - 20) * 100 + 20  # one location spreads 100 times wider
    x[6] = 3.0  # and one never varies at all
    accumulator = GaussianAccumulator.empty((3, 4), 8).update(x)
    _, inverse = accumulator.finalize(0.1, regularization_scale="location_variance")
    for location in (0, 5):
        covariance = torch.cov(x[location].T)
        expected = covariance + 0.1 * covariance.trace() / 8 * torch.eye(8, dtype=torch.float64)
        torch.testing.assert_close(inverse[location].double(), torch.linalg.inv(expected), rtol=1e-4, atol=1e-6)
    # The flat location borrows a small share of the average variance and stays invertible.
    assert torch.isfinite(inverse[6]).all() and inverse[6].diagonal().min() > 0
    with pytest.raises(ValueError, match="not positive definite"):
        accumulator.finalize(0.0, regularization_scale="location_variance")


def test_global_variance_regularization_is_one_floor_in_the_features_own_units():
    x = _spread()
    accumulator = GaussianAccumulator.empty((3, 4), 8).update(x)
    overall = torch.stack([torch.cov(location.T).trace() / 8 for location in x]).mean()
    _, inverse = accumulator.finalize(0.5, regularization_scale="global_variance")
    for location in (0, 11):
        expected = torch.cov(x[location].T) + 0.5 * overall * torch.eye(8, dtype=torch.float64)
        torch.testing.assert_close(inverse[location].double(), torch.linalg.inv(expected), rtol=1e-4, atol=1e-6)
    # Features in other units (ten times larger) get the same distances: the floor scales with them.
    scaled = GaussianAccumulator.empty((3, 4), 8).update(x * 10)
    _, inverse_scaled = scaled.finalize(0.5, regularization_scale="global_variance")
    torch.testing.assert_close(inverse_scaled.double() * 100, inverse.double(), rtol=1e-3, atol=1e-6)


def test_bad_inputs_are_clear_errors():
    accumulator = GaussianAccumulator.empty((30, 25), 6)
    with pytest.raises(ValueError, match=r"do not fit an accumulator of 750 locations x 6 channels"):
        accumulator.update(torch.zeros(750, 2, 5))
    accumulator.update(_embeddings(1))
    with pytest.raises(ValueError, match="at least 2 training images, got 1"):
        accumulator.finalize()
    with pytest.raises(ValueError, match="regularization must be >= 0"):
        accumulator.update(_embeddings(3)).finalize(-1.0)
    with pytest.raises(ValueError, match=r"shrinkage 'lw' is not one of \['none', 'oas', 'ledoit_wolf'\]"):
        accumulator.finalize(shrinkage="lw")
    with pytest.raises(ValueError, match="regularization_scale 'relative' is not one of"):
        accumulator.finalize(regularization_scale="relative")
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
