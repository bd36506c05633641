"""One category's training images over several Ray tasks: each shard embeds its images into
statistics that merge by addition (PaDiM's running sums) or union (PatchCore's coresets), and
the model is finalised once from the merged statistics.

The task that fits the category embeds the first shard itself and asks Ray for one task per
other shard; shards run on any node and send back nothing but their statistics (PaDiM's packed,
`statistics.PackedSums`). Beyond `FAN_IN` other shards, Ray tasks merge them in groups of
`FAN_IN` (a tree reduction), so the fitting task receives at most `FAN_IN` results. It merges
them in place as they arrive and drops each at once: it holds its own set and one arriving set,
however many shards there are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from padim_core.detector import Detector
from padim_core.loader import image_batches
from padim_core.statistics import PackedSums

SHARD_IMAGES = 4096
"""`fit.shards: auto` gives a category one shard per this many training images (see the README's
planning figures: below it a shard's start-up and the statistics it sends back cost more than
the embedding time it saves)."""

FAN_IN = 4
"""Results one merge (the fitting task's, or a merge task's) takes in; more shards are tree-reduced."""


def shard_count(setting: str | int, images: int, batch_size: int) -> int:
    """How many shards fit `images` training images: `auto` by `SHARD_IMAGES`, else as set
    (never more shards than batches)."""
    wanted = max(1, math.ceil(images / SHARD_IMAGES)) if setting == "auto" else int(setting)
    return max(1, min(wanted, math.ceil(images / batch_size)))


def split(images: Sequence[Path], shards: int, batch_size: int) -> list[list[Path]]:
    """`shards` consecutive parts made of whole batches (fewer when there are fewer batches), as even
    as batches allow. Each image then goes through the network in the same batch as in a
    single-task fit: a CPU's convolution algorithm can differ with the batch size, and the sums
    would differ in the last bits."""
    batches = [list(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    shards = max(1, min(shards, len(batches)))
    per_shard, extra = divmod(len(batches), shards)
    parts, start = [], 0
    for index in range(shards):
        end = start + per_shard + (1 if index < extra else 0)
        parts.append([image for batch in batches[start:end] for image in batch])
        start = end
    return parts


@dataclass(frozen=True)
class ShardRequest:
    """One shard's work: build the detector from the config, embed these images."""

    config: Any
    kind: str
    images: list[str]
    device: str
    threads: int
    first: int = 0  # the index of the shard's first image among the category's fit images


@dataclass
class ShardStatistics:
    """What a shard sends back: PaDiM's packed sums, or PatchCore's coreset, and its grid and image count."""

    grid_shape: tuple[int, int]
    images: int
    sums: PackedSums | None = None
    bank: torch.Tensor | None = None

    def __iadd__(self, other: ShardStatistics) -> ShardStatistics:
        if other.grid_shape != self.grid_shape:
            raise ValueError(f"shards disagree on the patch grid: {list(self.grid_shape)} and {list(other.grid_shape)}")
        if self.sums is not None:
            self.sums += other.sums
        else:
            self.bank = torch.cat([self.bank, other.bank])
        self.images += other.images
        return self

    @property
    def nbytes(self) -> int:
        return self.sums.nbytes if self.sums is not None else self.bank.numel() * self.bank.element_size()


def embed_shard(detector: Detector, images: Sequence[Path], batch_size: int, workers: int, first: int = 0) -> ShardStatistics:
    """`images` (the first of them image `first` of the category) through `detector`'s embedding
    into mergeable statistics (nothing is finalised)."""
    batches = image_batches(images, detector.transform.to_pixels, batch_size, workers)
    if detector.kind == "padim":
        sums = detector.accumulate(batches, first=first)
        return ShardStatistics(sums.grid_shape, len(images), sums=PackedSums.of(sums))
    coreset, grid = detector.accumulate(batches, first=first)
    return ShardStatistics(grid, len(images), bank=coreset.bank())


def shard_task(request: ShardRequest) -> ShardStatistics:
    """A Ray task: one shard's statistics."""
    torch.set_num_threads(request.threads)
    detector = request.config.build_detector(request.kind, request.device)
    data = request.config.data
    return embed_shard(detector, [Path(path) for path in request.images], data.batch_size, data.num_workers, request.first)


def merge_task(*parts: ShardStatistics) -> ShardStatistics:
    """A Ray task: one level of the tree reduction."""
    merged = parts[0]
    for part in parts[1:]:
        merged += part
    return merged


def fit_sharded(detector: Detector, request: ShardRequest, shards: int, resources: dict[str, Any]) -> ShardStatistics:
    """Fit `detector` on `request.images` in `shards` parts (the first here, the others as Ray
    tasks asking for `resources`), merging as they arrive; returns the merged statistics."""
    import ray

    parts = split(request.images, shards, request.config.data.batch_size)
    remote = ray.remote(shard_task).options(**resources)
    firsts = [sum(len(part) for part in parts[:index]) for index in range(len(parts))]
    pending = [remote.remote(ShardRequest(request.config, request.kind, part, request.device, request.threads, first))
               for part, first in zip(parts[1:], firsts[1:])]
    merge = ray.remote(merge_task).options(num_cpus=resources.get("num_cpus", 1))
    while len(pending) > FAN_IN:
        pending = [*pending[FAN_IN:], merge.remote(*pending[:FAN_IN])]
    data = request.config.data
    merged = embed_shard(detector, [Path(path) for path in parts[0]], data.batch_size, data.num_workers)
    while pending:
        (ready,), pending = ray.wait(pending, num_returns=1)
        part = ray.get(ready)
        del ready  # the object store may free its copy now
        merged += part
        del part
    if merged.sums is not None:
        detector.fit_accumulator(merged.sums.unpack())
    else:
        detector.set_memory_bank(merged.bank, merged.grid_shape, merged.images)
    return merged
