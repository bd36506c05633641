"""The second stage of jobs.score: image bytes -> uint8 pixels at the model's input size.

Kept apart from the scoring actors' code so that decode workers import only what decoding
needs (no backbones, no timm, no Ray Data plumbing).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping

import pyarrow as pa
from PIL import Image

from padim_core.errors import ImageDecodeError
from padim_core.images import ImageTransform

DECODED_SCHEMA = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("input", pa.int32(), nullable=False),
    pa.field("pixels", pa.binary()),  # uint8 [H, W, 3] at the model's input size
    pa.field("height", pa.int32()),  # of the original image
    pa.field("width", pa.int32()),
    pa.field("error", pa.string()),
    pa.field("skipped", pa.bool_(), nullable=False),
])


def decode_batch(batch: pa.Table, transforms: Mapping[str, ImageTransform]) -> pa.Table:
    """map_batches (tasks): bytes -> uint8 pixels at the category's model size, and the original size."""
    sources = batch.column("source").to_pylist()
    categories = batch.column("category").to_pylist()
    datas = batch.column("data").to_pylist()
    errors = batch.column("error").to_pylist()
    pixels: list[bytes | None] = [None] * len(sources)
    heights: list[int | None] = [None] * len(sources)
    widths: list[int | None] = [None] * len(sources)
    with warnings.catch_warnings():
        # padim_core refuses images above its own pixel limit, PIL's warning below that is noise
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for index, (source, category, data) in enumerate(zip(sources, categories, datas)):
            if data is None or errors[index] is not None:
                continue
            try:
                pixels[index] = transforms[category].to_array(data, name=source).tobytes()
                heights[index], widths[index] = original_size(data)
            except ImageDecodeError as error:
                errors[index] = str(error)
            except Exception as error:  # noqa: BLE001 - one bad image is a row with an error, never a failed job
                errors[index] = f"cannot decode image {source}: {type(error).__name__}: {error}"
    return pa.table(
        {
            "source": sources, "category": categories, "input": batch.column("input").to_pylist(), "pixels": pixels,
            "height": heights, "width": widths, "error": errors, "skipped": batch.column("skipped").to_pylist(),
        },
        schema=DECODED_SCHEMA,
    )


_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def original_size(data: bytes) -> tuple[int, int]:
    """(height, width) as the image is shown, read from the header (EXIF rotation applied)."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        # A PNG's EXIF may follow the pixels, and PIL decodes them all to find it: look only
        # when the file has an eXIf chunk at all.
        has_exif = image.format != "PNG" or b"eXIf" in data
        if has_exif and image.getexif().get(_EXIF_ORIENTATION, 1) in _TRANSPOSED:
            width, height = height, width
    return height, width
