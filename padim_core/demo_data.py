"""A small MVTec-style data set, built offline from the texture photos that ship with scikit-image.

    python -m padim_core.demo_data OUTPUT_DIR [--train N] [--test-good N] [--test-defect N]
                                             [--size PX] [--seed S] [--overwrite]

Categories `brick`, `grass` and `gravel` are tinted crops of `skimage.data.brick()`, `grass()`
and `gravel()`, so the whole pipeline can be tried, and tested, without downloading MVTec AD.
Defective test images carry a synthetic `scratch`, `hole`, `stain` or `color` shift, and each
mask marks exactly the pixels the defect changed: every pixel outside it is untouched. Every
image draws from its own seeded generator, so the same arguments give byte-identical PNGs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageDraw

from padim_core.safe_write import StagedFolder

TEXTURE_TINTS: dict[str, tuple[float, float, float]] = {
    "brick": (1.0, 0.62, 0.48),
    "grass": (0.6, 0.92, 0.42),
    "gravel": (0.9, 0.86, 0.76),
}
"""Category -> RGB multiplier that turns scikit-image's grayscale photo into a colour image."""

DEFECTS = ("scratch", "hole", "stain", "color")

_STAIN_COLOURS = np.array([(0.5, 0.24, 0.06), (0.12, 0.16, 0.5), (0.42, 0.08, 0.4), (0.1, 0.3, 0.12)])
_SHIFT_COLOURS = np.array([(0.35, 0.55, 1.0), (1.0, 0.35, 0.9), (0.3, 0.95, 0.95), (1.0, 0.85, 0.15)])
_MIN_ALPHA = 0.1  # weaker blending is cut to zero, so the mask holds every changed pixel
_SUPERSAMPLE = 4  # scratches are drawn this much larger, then box-filtered down for soft edges


def build_demo_dataset(
    output: str | Path,
    *,
    train: int = 40,
    test_good: int = 10,
    test_defect: int = 8,
    size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the demo data set to `output` and return it.

    `test_defect` is per defect type. The set is built in a temporary folder next to `output`
    and renamed into place, so `output` never holds half a data set. An existing non-empty
    `output` is a FileExistsError unless `overwrite`.
    """
    output = Path(output)
    _check_counts(train=train, test_good=test_good, test_defect=test_defect, size=size, seed=seed)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {output} exists and is not a folder")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {output} is not empty; pass overwrite=True (--overwrite) to replace it")
    with StagedFolder(output) as staged:
        for category_index, (category, tint) in enumerate(TEXTURE_TINTS.items()):
            photo = getattr(skimage.data, category)()
            _write_category(
                staged.path / category, photo, np.array(tint), (seed, category_index), train, test_good, test_defect, size
            )
    return output


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (argument errors and a refused output exit with 2)."""
    parser = argparse.ArgumentParser(
        prog="python -m padim_core.demo_data", description="Build a small MVTec-style demo data set offline."
    )
    parser.add_argument("output", type=Path, help="folder to create (must not exist, or be empty)")
    parser.add_argument("--train", type=_count(1), default=40, help="normal training images per category")
    parser.add_argument("--test-good", type=_count(0), default=10, help="normal test images per category")
    parser.add_argument("--test-defect", type=_count(0), default=8, help="test images per defect type and category")
    parser.add_argument("--size", type=_count(32), default=128, help="image side in pixels")
    parser.add_argument("--seed", type=_count(0), default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        output = build_demo_dataset(
            args.output,
            train=args.train,
            test_good=args.test_good,
            test_defect=args.test_defect,
            size=args.size,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except FileExistsError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"demo data set written to {output.resolve()} in {time.perf_counter() - started:.1f} s")
    print(f"  categories: {', '.join(TEXTURE_TINTS)} ({args.size}x{args.size} px)")
    print(
        f"  per category: {args.train} train, {args.test_good} test good, "
        f"{args.test_defect} test per defect type ({', '.join(DEFECTS)}) with masks"
    )
    return 0


def _write_category(
    folder: Path,
    photo: np.ndarray,
    tint: np.ndarray,
    key: tuple[int, int],
    train: int,
    test_good: int,
    test_defect: int,
    size: int,
) -> None:
    def generator(split: int, index: int) -> np.random.Generator:
        # one stream per (seed, category, split, image): changing a count never changes other images
        return np.random.default_rng([*key, split, index])

    for index in range(train):
        _save(folder / "train" / "good" / f"{index:03d}.png", _normal_crop(photo, tint, size, generator(0, index)))
    for index in range(test_good):
        _save(folder / "test" / "good" / f"{index:03d}.png", _normal_crop(photo, tint, size, generator(1, index)))
    for defect_index, defect in enumerate(DEFECTS):
        for index in range(test_defect):
            rng = generator(2 + defect_index, index)
            image = _normal_crop(photo, tint, size, rng)
            alpha, target = _DEFECT_MAKERS[defect](image, tint, rng)
            alpha = np.where(alpha < _MIN_ALPHA, 0.0, alpha)[..., None]
            _save(folder / "test" / defect / f"{index:03d}.png", image * (1 - alpha) + target * alpha)
            mask = np.where(alpha[..., 0] > 0, 255, 0).astype(np.uint8)
            _save(folder / "ground_truth" / defect / f"{index:03d}_mask.png", mask)


def _normal_crop(photo: np.ndarray, tint: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of 45-60 % of the photo's side, flipped and brightness-jittered; float RGB in [0, 1]."""
    side = int(rng.integers(int(0.45 * photo.shape[0]), int(0.6 * photo.shape[0]) + 1))
    top, left = (int(rng.integers(0, extent - side + 1)) for extent in photo.shape)
    crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
    gray = np.asarray(crop, dtype=np.float64) / 255
    if rng.random() < 0.5:
        gray = gray[:, ::-1]
    if rng.random() < 0.5:
        gray = gray[::-1, :]
    gray = gray * rng.uniform(0.93, 1.07)
    return np.clip(gray[..., None] * tint, 0.0, 1.0)


def _scratch(image: np.ndarray, tint: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One or two thin curved strokes, all bright or all dark."""
    size = image.shape[0]
    scale = _SUPERSAMPLE
    canvas = Image.new("L", (size * scale, size * scale))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 3))):
        start = rng.uniform(0.15, 0.85, 2) * size
        length = rng.uniform(0.3, 0.5) * size
        angle = rng.uniform(0, np.pi)
        end = np.clip(start + length * np.array([np.cos(angle), np.sin(angle)]), 0.05 * size, 0.95 * size)
        bend = (start + end) / 2 + rng.normal(0, 0.12 * size, 2)
        t = np.linspace(0, 1, 24)[:, None]
        curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end  # quadratic Bezier
        width = rng.uniform(1.6, 2.6) * size / 128
        draw.line([tuple(p) for p in curve * scale], fill=255, width=max(1, round(width * scale)), joint="curve")
    alpha = np.asarray(canvas.reduce(scale), dtype=np.float64) / 255
    shade = rng.uniform(0.92, 1.0) if rng.random() < 0.5 else rng.uniform(0.0, 0.08)
    return alpha, np.full_like(image, shade)


def _hole(image: np.ndarray, tint: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark ellipse with a soft rim; a faint trace of the texture shows through."""
    alpha = _blob(image.shape[0], rng, radius=(0.05, 0.09), elongation=(1.0, 1.8), wobble=0.0)
    return alpha, 0.03 + 0.12 * image


def _stain(image: np.ndarray, tint: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A translucent coloured blotch with a wobbly outline; the texture stays visible under it."""
    alpha = _blob(image.shape[0], rng, radius=(0.07, 0.11), elongation=(1.0, 1.5), wobble=0.18)
    colour = _STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))]
    luminance = image.mean(axis=2, keepdims=True)
    return alpha * rng.uniform(0.7, 0.9), colour * (0.6 + 0.8 * luminance)


def _color(image: np.ndarray, tint: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A region whose colour changes but whose brightness and texture stay the same."""
    alpha = _blob(image.shape[0], rng, radius=(0.09, 0.14), elongation=(1.0, 1.6), wobble=0.1)
    colour = _SHIFT_COLOURS[rng.integers(len(_SHIFT_COLOURS))]
    colour = colour * tint.mean() / colour.mean()
    luminance = image.mean(axis=2, keepdims=True) / tint.mean()
    return alpha, np.clip(luminance * colour, 0.0, 1.0)


def _blob(
    size: int, rng: np.random.Generator, *, radius: tuple[float, float], elongation: tuple[float, float], wobble: float
) -> np.ndarray:
    """Alpha of a rotated, possibly wobbly ellipse with a rim about 2 px (at 128 px) soft."""
    centre = rng.uniform(0.2, 0.8, 2) * size
    angle = rng.uniform(0, np.pi)
    radius_px = rng.uniform(*radius) * size
    stretch = rng.uniform(*elongation)
    harmonics = rng.uniform(0, wobble, 3), rng.uniform(0, 2 * np.pi, 3)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = x - centre[0], y - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (dy * np.cos(angle) - dx * np.sin(angle)) * stretch
    theta = np.arctan2(v, u)
    outline = radius_px * (1 + sum(a * np.cos(k * theta + phase) for k, a, phase in zip((2, 3, 4), *harmonics)))
    softness = 2.0 * size / 128
    return np.clip(0.5 + (outline - np.hypot(u, v)) / softness, 0.0, 1.0)


_DEFECT_MAKERS: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "color": _color,
}


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels.dtype != np.uint8:
        pixels = np.rint(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


def _check_counts(**values: int) -> None:
    minimum = {"train": 1, "size": 32}
    for key, value in values.items():
        if not isinstance(value, int) or value < minimum.get(key, 0):
            raise ValueError(f"{key} must be an integer >= {minimum.get(key, 0)}, got {value!r}")


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


if __name__ == "__main__":
    sys.exit(main())
