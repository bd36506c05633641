"""Controlled domain shifts: another day's light, focus and camera, applied to test images.

Each shift turns a batch of uint8 images `[B, 3, H, W]` (the model's input size, before
normalisation) into a shifted batch; the geometric ones move the ground-truth masks with the
image. A shift is applied at a *level* in its own unit (a brightness factor, a blur sigma in
pixels, a JPEG quality, ...); severity 0 means no shift at all and never calls a shift.

Random shifts (noise, the direction of a rotation or translation) draw from one generator per
image, seeded from (seed, shift, severity, image index): the same config gives the same images
whatever the batch size or order, and two images never share their noise.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

NEUTRAL_KELVIN = 6500.0
"""The colour temperature the test photos are taken to have (daylight, sRGB's white point)."""

Apply = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]
"""One image `[3, H, W]` uint8, the level and the image's generator -> the shifted image."""

Motion = Callable[[float, torch.Generator, int, int], tuple[float, list[int]]]
"""The level, the image's generator, its height and width -> (degrees, [dx, dy] pixels)."""


@dataclass(frozen=True)
class ShiftKind:
    """One kind of shift: what a level means, which levels are allowed, how to apply it."""

    name: str
    unit: str
    allowed: str
    check: Callable[[float], bool]
    default_levels: tuple[float, ...]
    apply: Apply | None = None  # a photometric shift: the mask stays
    motion: Motion | None = None  # a geometric shift: image and mask move alike


def _brightness(image: torch.Tensor, level: float, _: torch.Generator) -> torch.Tensor:
    return tvf.adjust_brightness(image, level)


def _contrast(image: torch.Tensor, level: float, _: torch.Generator) -> torch.Tensor:
    return tvf.adjust_contrast(image, level)


def _blur(image: torch.Tensor, level: float, _: torch.Generator) -> torch.Tensor:
    # A kernel of +-3 sigma, odd, and smaller than the image (reflect padding needs that).
    side = min(2 * math.ceil(3 * level) + 1, 2 * ((min(image.shape[-2:]) - 1) // 2) + 1)
    return tvf.gaussian_blur(image, [side, side], [level, level])


def _noise(image: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(image.shape, generator=generator) * (255.0 * level)
    return (image.float() + noise).round_().clamp_(0, 255).to(torch.uint8)


def _jpeg(image: torch.Tensor, level: float, _: torch.Generator) -> torch.Tensor:
    return tvf.jpeg(image, int(level))


def _rotation(level: float, generator: torch.Generator, height: int, width: int) -> tuple[float, list[int]]:
    """`level` degrees about the centre, clockwise or anticlockwise at random."""
    return (level if torch.rand((), generator=generator) < 0.5 else -level), [0, 0]


def _translation(level: float, generator: torch.Generator, height: int, width: int) -> tuple[float, list[int]]:
    """`level` of the image side in a random direction, in whole pixels."""
    direction = 2 * math.pi * float(torch.rand((), generator=generator))
    return 0.0, [round(level * width * math.cos(direction)), round(level * height * math.sin(direction))]


def _affine(image: torch.Tensor, angle: float, offset: list[int], interpolation: InterpolationMode) -> torch.Tensor:
    """Rotate about the centre and translate `[C, H, W]`; what comes into view is the picture
    mirrored at its edges (as a camera moved over more of the same scene would see), not the
    black corners that would read as defects. Masks mirror with their images."""
    height, width = image.shape[-2:]
    pad_y, pad_x = height // 2, width // 2  # covers any angle and a shift of up to half the side
    padded = torch.nn.functional.pad(image[None].float(), (pad_x, pad_x, pad_y, pad_y), mode="reflect")[0]
    moved = tvf.affine(padded, angle=angle, translate=offset, scale=1.0, shear=[0.0, 0.0], interpolation=interpolation)
    return moved[:, pad_y : pad_y + height, pad_x : pad_x + width].round_().clamp_(0, 255).to(image.dtype)


def kelvin_to_rgb(kelvin: float) -> tuple[float, float, float]:
    """The colour of a black body at `kelvin`, in 0-255 sRGB (Tanner Helland's fit, 1000-40000 K)."""
    t = kelvin / 100.0
    red = 255.0 if t <= 66 else 329.698727446 * (t - 60) ** -0.1332047592
    green = 99.4708025861 * math.log(t) - 161.1195681661 if t <= 66 else 288.1221695283 * (t - 60) ** -0.0755148492
    blue = 255.0 if t >= 66 else 0.0 if t <= 19 else 138.5177312231 * math.log(t - 10) - 305.0447927307
    return tuple(min(255.0, max(0.0, value)) for value in (red, green, blue))  # type: ignore[return-value]


def _colour_temperature(image: torch.Tensor, level: float, _: torch.Generator) -> torch.Tensor:
    """The scene lit at `level` kelvin with the camera's white balance still set for daylight."""
    gains = [shifted / neutral for shifted, neutral in zip(kelvin_to_rgb(level), kelvin_to_rgb(NEUTRAL_KELVIN))]
    scaled = image.float() * torch.tensor(gains).view(3, 1, 1)
    return scaled.round_().clamp_(0, 255).to(torch.uint8)


SHIFTS: dict[str, ShiftKind] = {
    kind.name: kind
    for kind in (
        ShiftKind("brightness", "factor on every pixel (1: unchanged)", "a number > 0", lambda v: v > 0,
                  (0.98, 0.95, 0.9, 0.8, 0.6), apply=_brightness),
        ShiftKind("contrast", "factor on the distance to the mean grey (1: unchanged)", "a number > 0", lambda v: v > 0,
                  (0.98, 0.95, 0.9, 0.8, 0.6), apply=_contrast),
        ShiftKind("blur", "Gaussian sigma in pixels of the model input", "a number > 0", lambda v: v > 0,
                  (0.5, 1.0, 1.5, 2.0, 4.0), apply=_blur),
        ShiftKind("noise", "Gaussian noise sigma as a fraction of full scale", "a number in (0, 1]", lambda v: 0 < v <= 1,
                  (0.005, 0.01, 0.02, 0.05, 0.1), apply=_noise),
        ShiftKind("jpeg", "JPEG quality of a re-compression", "an integer from 1 to 100",
                  lambda v: float(v).is_integer() and 1 <= v <= 100, (90, 75, 50, 25, 10), apply=_jpeg),
        ShiftKind("rotation", "degrees, either way at random", "a number in (0, 180]", lambda v: 0 < v <= 180,
                  (0.5, 1.0, 2.0, 5.0, 10.0), motion=_rotation),
        ShiftKind("translation", "fraction of the image side, in a random direction", "a number in (0, 0.5]",
                  lambda v: 0 < v <= 0.5, (0.005, 0.01, 0.02, 0.05, 0.1), motion=_translation),
        ShiftKind("colour_temperature", f"kelvin of the light, the camera balanced for {NEUTRAL_KELVIN:g} K",
                  "a number from 1000 to 40000", lambda v: 1000 <= v <= 40000,
                  (6000.0, 5500.0, 4500.0, 3500.0, 2500.0), apply=_colour_temperature),
    )
}


def image_seed(seed: int, shift: str, severity: int, index: int) -> int:
    """A stable seed per shifted image (Python's `hash` of a string changes from run to run)."""
    return zlib.crc32(f"{seed}/{shift}/{severity}/{index}".encode())


def apply_shift(
    shift: str,
    level: float,
    images: torch.Tensor,
    masks: torch.Tensor | None,
    seeds: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`images` uint8 `[B, 3, H, W]` and `masks` bool `[B, H, W]` (or None), shifted.

    Masks change only under geometric shifts, and then exactly as their images do.
    """
    kind = SHIFTS.get(shift)
    if kind is None:
        raise ValueError(f"unknown shift {shift!r}; known shifts: {list(SHIFTS)}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if len(seeds) != len(images):
        raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
    if not kind.check(level):
        raise ValueError(f"{shift} level {level!r} is out of range; allowed: {kind.allowed}")
    height, width = images.shape[-2:]
    shifted, moved = [], []
    for index, image in enumerate(images):
        generator = torch.Generator().manual_seed(seeds[index])
        if kind.motion is None:
            shifted.append(kind.apply(image, level, generator))
            continue
        angle, offset = kind.motion(level, generator, height, width)
        shifted.append(_affine(image, angle, offset, InterpolationMode.BILINEAR))
        if masks is not None:  # nearest neighbour, so it stays binary
            moved.append(_affine(masks[index, None].to(torch.uint8), angle, offset, InterpolationMode.NEAREST)[0].bool())
    return torch.stack(shifted), torch.stack(moved) if moved else masks
