"""Which file names are images: plain string checks, importable without numpy, PIL or torch
(the readers of jobs.score run in processes that never touch pixels)."""

from __future__ import annotations

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the `IMAGE_SUFFIXES` (any case)."""
    return name.lower().endswith(IMAGE_SUFFIXES)
