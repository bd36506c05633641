"""Exact nearest neighbours: equal to a brute-force torch.cdist search, chunk by chunk."""

from __future__ import annotations

import pytest
import torch

from padim_core import nearest as nearest_module
from padim_core.nearest import nearest, pairwise_distances, squared_norms


def points(rows: int, columns: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) * 3


def brute_force(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every distance at once, in float64, sorted: the reference."""
    distances = torch.cdist(queries.double(), bank.double())
    values, indices = distances.sort(dim=1)
    return values[:, :k].float(), indices[:, :k]


def test_pairwise_distances_are_euclidean():
    queries, bank = points(50), points(70, seed=1)
    torch.testing.assert_close(pairwise_distances(queries, bank), torch.cdist(queries.double(), bank.double()).float(),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pairwise_distances(queries, bank, squared_norms(bank)), pairwise_distances(queries, bank))
    # A row's distance to itself is 0 up to float32 cancellation (about sqrt(eps) * |row|),
    # never the NaN of a slightly negative square.
    itself = pairwise_distances(bank, bank).diagonal()
    assert not itself.isnan().any() and (itself < 1e-3 * bank.norm(dim=1)).all()


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("chunk_elements", [1 << 25, 7 * 300])  # one chunk; chunks of 7 queries
def test_nearest_equals_brute_force(monkeypatch, k, chunk_elements):
    monkeypatch.setattr(nearest_module, "QUERY_CHUNK_ELEMENTS", chunk_elements)
    queries, bank = points(123), points(300, seed=1)
    distances, indices = nearest(queries, bank, k)
    expected_distances, expected_indices = brute_force(queries, bank, k)
    assert distances.shape == indices.shape == (123, k) and indices.dtype == torch.long
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(distances, expected_distances, rtol=1e-5, atol=1e-4)


def test_given_bank_norms_are_used_as_they_are():
    queries, bank = points(10), points(40, seed=1)
    norms = squared_norms(bank)
    assert torch.equal(nearest(queries, bank, 3, norms)[1], nearest(queries, bank, 3)[1])


def test_a_bank_row_is_its_own_nearest_neighbour():
    bank = points(64)
    distances, indices = nearest(bank, bank, 1)
    assert torch.equal(indices[:, 0], torch.arange(64))
    assert (distances[:, 0] < 1e-3 * bank.norm(dim=1)).all()


@pytest.mark.parametrize("k", [0, 41])
def test_k_must_fit_the_bank(k):
    with pytest.raises(ValueError, match=rf"k must be between 1 and the bank size 40, got {k}"):
        nearest(points(3), points(40, seed=1), k)
