"""Decoding in background threads: batches in input order, bounded, errors passed on."""

from __future__ import annotations

import threading

import pytest
import torch

from padim_core.loader import image_batches, iter_image_batches


def as_tensor(value: int) -> torch.Tensor:
    return torch.full((3, 2, 2), value, dtype=torch.uint8)


def test_batches_keep_the_input_order_and_size() -> None:
    batches = list(iter_image_batches(range(7), as_tensor, batch_size=3, workers=2))
    assert [sources for sources, _ in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [images.shape for _, images in batches] == [(3, 3, 2, 2), (3, 3, 2, 2), (1, 3, 2, 2)]
    assert torch.cat([images for _, images in batches])[:, 0, 0, 0].tolist() == list(range(7))
    assert [images.shape[0] for images in image_batches(iter(range(5)), as_tensor, batch_size=2)] == [2, 2, 1]
    assert list(iter_image_batches([], as_tensor)) == []


def test_at_most_a_few_batches_are_decoded_ahead() -> None:
    decoded: list[int] = []
    lock = threading.Lock()

    def slow(value: int) -> torch.Tensor:
        with lock:
            decoded.append(value)
        return as_tensor(value)

    batches = iter_image_batches(range(100), slow, batch_size=2, workers=2, prefetch=2)
    next(batches)
    assert len(decoded) <= 2 * (2 + 2)  # the batch handed out, the prefetched ones and one being submitted
    batches.close()


def test_a_decoding_error_reaches_the_caller_and_bad_arguments_are_refused() -> None:
    def broken(value: int) -> torch.Tensor:
        if value == 4:
            raise ValueError("cannot decode image 4")
        return as_tensor(value)

    with pytest.raises(ValueError, match="cannot decode image 4"):
        list(iter_image_batches(range(8), broken, batch_size=2))
    with pytest.raises(ValueError, match="batch_size and workers must be >= 1, got 0 and 2"):
        list(iter_image_batches(range(2), as_tensor, batch_size=0))
