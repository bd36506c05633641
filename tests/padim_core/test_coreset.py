"""Greedy k-center coresets: the farthest point each step, seeded, and streamed in bounded memory."""

from __future__ import annotations

import pytest
import torch

from padim_core.coreset import StreamingCoreset, greedy_k_center, random_projection


def points(rows: int, columns: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


def brute_force_k_center(points: torch.Tensor, count: int, start: int) -> list[int]:
    """The greedy k-center rule from its definition: every distance in float64, the farthest
    point from the chosen ones added at each step."""
    distances = torch.cdist(points.double(), points.double())
    chosen = [start]
    while len(chosen) < count:
        to_chosen = distances[:, chosen].min(dim=1).values
        chosen.append(int(to_chosen.argmax()))
    return chosen


def held_bytes(coreset: StreamingCoreset) -> int:
    """Bytes of every tensor storage the coreset holds between calls (views counted by their whole storage)."""
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
                for tensor in [*coreset._buffer, *coreset._kept]}
    return sum(storages.values())


@pytest.mark.parametrize(("rows", "count", "start"), [(60, 1, 7), (60, 12, 0), (200, 50, 123), (40, 40, 5)])
def test_greedy_k_center_adds_the_farthest_point_each_step(rows, count, start):
    data = points(rows, seed=rows)
    chosen = greedy_k_center(data, count, start)
    assert chosen.tolist() == brute_force_k_center(data, count, start)
    assert len(set(chosen.tolist())) == count  # never a point twice


def test_greedy_k_center_refuses_impossible_counts():
    for count in (0, 11):
        with pytest.raises(ValueError, match=f"a coreset of {count} rows out of 10 is impossible"):
            greedy_k_center(points(10), count)


def test_a_single_chunk_without_projection_is_the_exact_greedy_coreset():
    """With every patch in one chunk and a projection as wide as the patches (so none is made),
    the bank is the greedy k-center coreset of all patches from the seeded start."""
    data = points(300, columns=16, seed=3)
    coreset = StreamingCoreset(16, ratio=0.1, seed=4, chunk_patches=1000, projection_dim=16)
    for batch in data.split(70):
        coreset.add(batch)
    bank = coreset.bank()
    start = int((data == bank[0]).all(dim=1).nonzero())
    assert torch.equal(bank, data[brute_force_k_center(data, 30, start)])


def test_the_same_settings_give_the_same_bank():
    data = points(500, columns=32)

    def bank(seed: int) -> torch.Tensor:
        coreset = StreamingCoreset(32, ratio=0.2, seed=seed, chunk_patches=128, projection_dim=8)
        for batch in data.split(50):
            coreset.add(batch)
        return coreset.bank()

    assert torch.equal(bank(0), bank(0))
    assert not torch.equal(bank(0), bank(1))


@pytest.mark.parametrize(("ratio", "chunk"), [(0.1, 100), (0.25, 64), (0.01, 1000)])
def test_the_bank_is_about_ratio_of_the_patches_and_rows_of_them(ratio, chunk):
    data = points(1111, columns=12)
    coreset = StreamingCoreset(12, ratio, chunk_patches=chunk, projection_dim=4)
    for batch in data.split(37):
        coreset.add(batch)
    bank = coreset.bank()
    chunks = -(-1111 // chunk)
    assert coreset.seen == 1111
    assert abs(bank.shape[0] - ratio * 1111) <= chunks  # each chunk rounds its own share once
    assert bank.shape[1] == 12 and bank.dtype == torch.float32
    assert all((data == row).all(dim=1).any() for row in bank)  # patches, not centroids


def test_ratio_one_keeps_every_patch_in_order():
    data = points(300, columns=12)
    coreset = StreamingCoreset(12, 1.0, chunk_patches=64)
    for batch in data.split(45):
        coreset.add(batch)
    assert torch.equal(coreset.bank(), data)


def test_memory_holds_one_chunk_and_the_kept_rows_whatever_the_batches():
    """Between calls the coreset holds at most one chunk of patches plus the bank so far, never
    the caller's batches (a slice of a batch would keep all of it), whatever the stream's length."""
    channels, chunk = 16, 100
    coreset = StreamingCoreset(channels, 0.1, chunk_patches=chunk, projection_dim=4)
    for step in range(40):
        batch = points(70 + step % 3 * 45, columns=channels, seed=step)  # batches across chunk boundaries
        coreset.add(batch)
        del batch
        kept_rows = sum(rows.shape[0] for rows in coreset._kept)
        assert coreset._buffered < chunk
        assert held_bytes(coreset) <= (chunk + kept_rows) * channels * 4
    assert coreset.bank().shape[0] == pytest.approx(0.1 * coreset.seen, abs=coreset.seen / chunk)


def test_a_chunk_is_reduced_as_soon_as_it_is_full():
    coreset = StreamingCoreset(8, 0.5, chunk_patches=10, projection_dim=4)
    coreset.add(points(25))
    assert coreset._buffered == 5 and sum(rows.shape[0] for rows in coreset._kept) == 10


def test_random_projection_is_seeded_and_keeps_distances_roughly():
    assert random_projection(64, 64, 0) is None and random_projection(64, 100, 0) is None
    projection = random_projection(512, 128, 0)
    assert projection.shape == (512, 128) and torch.equal(projection, random_projection(512, 128, 0))
    assert not torch.equal(projection, random_projection(512, 128, 1))
    data = points(50, columns=512)
    ratio = torch.pdist(data @ projection) / torch.pdist(data)
    assert 0.7 < float(ratio.min()) and float(ratio.max()) < 1.3


def test_bad_settings_and_input_are_clear_errors():
    for ratio in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match=rf"coreset ratio must be in \(0, 1\], got {ratio}"):
            StreamingCoreset(8, ratio)
    with pytest.raises(ValueError, match="chunk_patches must be >= 1, got 0"):
        StreamingCoreset(8, 0.1, chunk_patches=0)
    coreset = StreamingCoreset(8, 0.1)
    with pytest.raises(ValueError, match=r"patches must be \[N, 8\], got \[4, 9\]"):
        coreset.add(points(4, columns=9))
    with pytest.raises(ValueError, match="no patches were added"):
        coreset.bank()
