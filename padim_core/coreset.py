"""Greedy k-center coresets (Sener & Savarese, 2018) of a stream of patch embeddings, in bounded memory.

PatchCore keeps a coreset of the normal patches as its memory bank: the greedy k-center rule
picks, again and again, the patch farthest from everything picked so far, so the bank covers
every kind of normal patch with few rows. Distances are computed in a seeded random projection
to `projection_dim` dimensions (Johnson-Lindenstrauss), which keeps the greedy loop cheap.

The exact greedy rule needs every patch at once. `StreamingCoreset` never does: patches arrive in
batches, fill a buffer of `chunk_patches`, and each full buffer is reduced to `ratio` of its rows
by the greedy rule before the next one fills. The bank is the union of the chunk coresets: memory
is one chunk plus the bank, whatever the number of images, and the greedy loop's cost grows with
the chunk, not with the whole category. The trade: a patch is only compared with the patches of
its own chunk, so near-duplicates across chunks can both be kept (the bank covers no worse, and
is at most `ratio` of the patches all the same). Unions of coresets from several workers are
coresets of the union in the same sense, so shards merge by concatenation.
"""

from __future__ import annotations

import math

import torch

DEFAULT_CHUNK_PATCHES = 32768
DEFAULT_PROJECTION_DIM = 128


def random_projection(channels: int, dimensions: int, seed: int) -> torch.Tensor | None:
    """A seeded Gaussian projection `[channels, dimensions]` scaled to keep distances; None when
    `dimensions >= channels` (projecting would not make anything cheaper)."""
    if dimensions >= channels:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(channels, dimensions, generator=generator) / math.sqrt(dimensions)


def greedy_k_center(points: torch.Tensor, count: int, start: int = 0) -> torch.Tensor:
    """Indices of `count` rows of `points [N, D]` chosen by the greedy k-center rule from `start`.

    Each step adds the row farthest (Euclidean) from the rows chosen so far. Squared distances
    to the newest centre are one `[1, D] @ [D, N]` product over every row: with the points
    stored column-major that product streams memory in order, several times faster on CPU than
    the matrix-vector product over row-major points.
    """
    total = points.shape[0]
    if not 1 <= count <= total:
        raise ValueError(f"a coreset of {count} rows out of {total} is impossible")
    norms = (points * points).sum(dim=1)
    columns = points.t().contiguous()
    nearest = torch.full((total,), float("inf"), dtype=points.dtype, device=points.device)
    chosen = torch.empty(count, dtype=torch.long, device=points.device)
    index = torch.tensor(start, device=points.device)
    for step in range(count):
        chosen[step] = index
        centre = points[index].unsqueeze(0)
        distances = torch.addmm(norms.unsqueeze(0), centre, columns, alpha=-2.0)[0].add_(norms[index])
        torch.minimum(nearest, distances, out=nearest)
        nearest[index] = 0
        index = torch.argmax(nearest)
    return chosen


class StreamingCoreset:
    """The coreset of a stream of patch embeddings `[N, C]` at `ratio`, one chunk at a time."""

    def __init__(self, channels: int, ratio: float, seed: int = 0, chunk_patches: int = DEFAULT_CHUNK_PATCHES,
                 projection_dim: int = DEFAULT_PROJECTION_DIM) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
        if chunk_patches < 1:
            raise ValueError(f"chunk_patches must be >= 1, got {chunk_patches}")
        self.channels = channels
        self.ratio = ratio
        self.seed = seed
        self.chunk_patches = chunk_patches
        self.projection = random_projection(channels, projection_dim, seed)
        self.seen = 0
        self._chunks = 0
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0
        self._kept: list[torch.Tensor] = []

    def add(self, patches: torch.Tensor) -> None:
        """Take patch embeddings `[N, C]` (any device; kept on the CPU between chunks)."""
        if patches.ndim != 2 or patches.shape[1] != self.channels:
            raise ValueError(f"patches must be [N, {self.channels}], got {list(patches.shape)}")
        self.seen += patches.shape[0]
        while patches.shape[0]:
            room = self.chunk_patches - self._buffered
            # A copy, never a view: a view would keep the caller's whole batch alive with it.
            self._buffer.append(patches[:room].to(torch.float32, copy=True))
            self._buffered += self._buffer[-1].shape[0]
            patches = patches[room:]
            if self._buffered == self.chunk_patches:
                self._reduce()

    def bank(self) -> torch.Tensor:
        """The coreset of everything added: `[M, C]` float32 on the CPU, about `ratio` of the patches."""
        if self._buffered:
            self._reduce()
        if not self._kept:
            raise ValueError("no patches were added to the coreset")
        return torch.cat(self._kept)

    def _reduce(self) -> None:
        chunk = self._buffer[0] if len(self._buffer) == 1 else torch.cat(self._buffer)
        self._buffer, self._buffered = [], 0
        count = max(1, round(self.ratio * chunk.shape[0]))
        if count >= chunk.shape[0]:
            self._kept.append(chunk.cpu())
        else:
            points = chunk if self.projection is None else chunk @ self.projection.to(chunk.device)
            start = int(torch.randint(chunk.shape[0], (1,), generator=torch.Generator().manual_seed(self.seed + self._chunks)))
            self._kept.append(chunk[greedy_k_center(points, count, start)].cpu())
        self._chunks += 1
