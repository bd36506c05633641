"""Encoded images for tests: odd but valid encodings, and inputs that must be refused."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def noise_png(size: int = 64, seed: int = 0) -> bytes:
    """A real PNG that does not compress away, so cutting it really truncates the pixel data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header but holds no pixels: enough for the size guard."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def odd_images() -> dict[str, bytes]:
    """Encodings that must be scored, as the model's own transform reads them (all 60 x 40)."""
    gradient = np.linspace(0, 255, 40 * 60 * 3).reshape(40, 60, 3).astype(np.uint8)
    rgb = Image.fromarray(gradient)
    palette = rgb.convert("P", palette=Image.ADAPTIVE)
    palette.info["transparency"] = 0
    return {
        "rgb.png": encode(rgb),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "sixteen.png": encode(Image.fromarray(gradient[..., 0].astype(np.uint16) * 257)),
        "palette.png": encode(palette, transparency=0),
        "alpha.png": encode(rgb.convert("RGBA")),
        "gray.bmp": encode(rgb.convert("L"), "BMP"),
        "float.tif": encode(Image.fromarray(gradient[..., 0].astype(np.float32) / 255.0), "TIFF"),
    }


def broken_images() -> dict[str, bytes]:
    """Inputs that must become errors; `huge.png` is last (144 megapixels, above the pixel limit)."""
    good = odd_images()["rgb.png"]
    return {
        "empty.png": b"",
        "truncated.png": good[: len(good) // 2],
        "text.png": b"this is not an image",
        "huge.png": png_header_only(12_000, 12_000),
    }


def bottle_photos(bottle: Path) -> list[Path]:
    """Four normal and two defective test photos of MVTec AD's bottle."""
    return sorted((bottle / "test" / "good").glob("*.png"))[:4] + sorted((bottle / "test" / "broken_large").glob("*.png"))[:2]
