"""Decode images in background threads so decoding overlaps with the CNN.

PIL releases the GIL while it decodes and resizes, so a few threads keep the model fed without
the start-up cost and memory of worker processes. At most `prefetch` batches are in flight, so
memory is bounded however many images there are.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

Source = TypeVar("Source")


def iter_image_batches(
    sources: Sequence[Source] | Iterable[Source],
    transform: Callable[[Source], torch.Tensor],
    batch_size: int = 32,
    workers: int = 2,
    prefetch: int = 2,
) -> Iterator[tuple[list[Source], torch.Tensor]]:
    """Yield `(sources, stacked transform(source) for each)` in input order; a decoding error propagates."""
    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch_size and workers must be >= 1, got {batch_size} and {workers}")

    def chunks() -> Iterator[list[Source]]:
        chunk: list[Source] = []
        for source in sources:
            chunk.append(source)
            if len(chunk) == batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def load(chunk: list[Source]) -> tuple[list[Source], torch.Tensor]:
        return chunk, torch.stack(list(pool.map(transform, chunk)))

    with ThreadPoolExecutor(max_workers=workers) as pool, ThreadPoolExecutor(max_workers=1) as batcher:
        pending: deque = deque()
        for chunk in chunks():
            pending.append(batcher.submit(load, chunk))
            if len(pending) > prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def image_batches(
    sources: Sequence[Source] | Iterable[Source],
    transform: Callable[[Source], torch.Tensor],
    batch_size: int = 32,
    workers: int = 2,
) -> Iterator[torch.Tensor]:
    """Just the image tensors of `iter_image_batches`, ready for a detector's `fit`."""
    for _, images in iter_image_batches(sources, transform, batch_size, workers):
        yield images
