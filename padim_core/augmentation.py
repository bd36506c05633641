"""Fit-time photometric augmentation: more samples of "normal" as another day's light and camera would give.

A detector fitted on photos taken minutes apart learns that normal patches never change their
exposure, white balance, sensor noise or compression, so the first such change on the line reads
as a defect everywhere. Augmentation shows the fit `copies` extra versions of every training
image, each through small random changes drawn from the ranges below, applied by the same
functions that `shifts` uses to test robustness (colour temperature, brightness, contrast,
noise, JPEG, in the order light, exposure, sensor and camera apply them).

The copies are more samples of the same running sums (PaDiM) or of the same coreset stream
(PatchCore): fitting memory does not grow, fitting time grows by about `copies + 1` times the
CNN's forward pass. Draws come from one generator per (seed, image, copy), so the same images in
the same order give the same model whatever the batch size.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from padim_core.shifts import NEUTRAL_KELVIN, SHIFTS

MAX_COPIES = 64
"""More copies than this only repeat the same ranges at a high fitting cost."""


@dataclass(frozen=True)
class PhotometricAugmentation:
    """`copies` augmented versions of each training image (0: none), each with strengths drawn
    uniformly: brightness and contrast factors in [1 - x, 1 + x], the light's colour temperature
    in kelvin between the two bounds (the camera balanced for 6500 K), Gaussian noise of sigma in
    [0, noise] of full scale, and a JPEG re-compression at a quality in [jpeg_quality, 100]
    (100: no re-compression at all)."""

    copies: int = 0
    brightness: float = 0.1
    contrast: float = 0.1
    colour_temperature: tuple[float, float] = (4500.0, 8500.0)
    noise: float = 0.02
    jpeg_quality: int = 70
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.copies, bool) or not isinstance(self.copies, int) or not 0 <= self.copies <= MAX_COPIES:
            raise ValueError(f"augmentation copies must be an integer from 0 to {MAX_COPIES}, got {self.copies!r}")
        for name, value in (("brightness", self.brightness), ("contrast", self.contrast)):
            if not 0 <= value < 1:
                raise ValueError(f"augmentation {name} must be in [0, 1) (factors from 1 - x to 1 + x), got {value!r}")
        low, high = self.colour_temperature
        if not (SHIFTS["colour_temperature"].check(low) and SHIFTS["colour_temperature"].check(high) and low <= high):
            raise ValueError(f"augmentation colour_temperature must be [low, high] kelvin within 1000-40000, got {self.colour_temperature!r}")
        if not 0 <= self.noise <= 1:
            raise ValueError(f"augmentation noise must be in [0, 1] (sigma as a fraction of full scale), got {self.noise!r}")
        if isinstance(self.jpeg_quality, bool) or not isinstance(self.jpeg_quality, int) or not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"augmentation jpeg_quality must be an integer from 1 to 100, got {self.jpeg_quality!r}")
        object.__setattr__(self, "colour_temperature", (float(low), float(high)))

    @property
    def images_per_source(self) -> int:
        """How many images the fit sees for each training image."""
        return self.copies + 1

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["colour_temperature"] = list(self.colour_temperature)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> PhotometricAugmentation:
        """From a model file's or config's mapping (None: no augmentation)."""
        if values is None:
            return cls()
        values = dict(values)
        if "colour_temperature" in values:
            values["colour_temperature"] = tuple(values["colour_temperature"])
        return cls(**values)

    def augment(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One augmented version of a uint8 image `[3, H, W]`."""
        def uniform(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))

        low, high = self.colour_temperature
        kelvin = uniform(low, high)
        if kelvin != NEUTRAL_KELVIN:
            image = SHIFTS["colour_temperature"].apply(image, kelvin, generator)
        if self.brightness:
            image = SHIFTS["brightness"].apply(image, uniform(1 - self.brightness, 1 + self.brightness), generator)
        if self.contrast:
            image = SHIFTS["contrast"].apply(image, uniform(1 - self.contrast, 1 + self.contrast), generator)
        if self.noise:
            sigma = uniform(0, self.noise)
            if sigma > 0:
                image = SHIFTS["noise"].apply(image, sigma, generator)
        quality = self.jpeg_quality + int(torch.randint(101 - self.jpeg_quality, (), generator=generator))
        if quality < 100:
            image = SHIFTS["jpeg"].apply(image, quality, generator)
        return image

    def expand(self, batches: Iterable[torch.Tensor], first: int = 0) -> Iterator[torch.Tensor]:
        """Each batch as given, then its `copies` augmented versions, one batch each (so a batch
        in flight stays the size it was). With no copies, the batches pass through untouched.
        `first` is the index of the first image among all the training images (a shard's or an
        update's offset), so that every image gets the same copies however the fit is split."""
        if not self.copies:
            yield from batches
            return
        for batch in batches:
            if batch.dtype != torch.uint8:
                raise ValueError(
                    f"fit-time augmentation works on uint8 pixels [B, 3, H, W], got {batch.dtype}; "
                    "pass images as ImageTransform.to_pixels gives them, or set augmentation copies to 0"
                )
            yield batch
            for copy in range(1, self.copies + 1):
                yield torch.stack([
                    self.augment(image, torch.Generator().manual_seed(augmentation_seed(self.seed, first + index, copy)))
                    for index, image in enumerate(batch)
                ])
            first += len(batch)


def augmentation_seed(seed: int, index: int, copy: int) -> int:
    """A stable seed per (training image, copy)."""
    return zlib.crc32(f"augment/{seed}/{index}/{copy}".encode())
