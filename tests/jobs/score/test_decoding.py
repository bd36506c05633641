"""jobs.score.decoding: image bytes -> uint8 pixels at the model's size, for odd encodings, broken
images and rows that already failed."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from jobs.score.decoding import DECODED_SCHEMA, decode_batch, original_size
from padim_core.images import ImageTransform

from support.images import broken_images, encode, odd_images


def batch(items: dict[str, bytes], category: str = "bottle") -> pa.Table:
    names = list(items)
    return pa.table({
        "source": names, "category": [category] * len(names), "input": [0] * len(names), "data": [items[n] for n in names],
        "error": pa.array([None] * len(names), pa.string()), "skipped": [False] * len(names),
    })


def test_odd_encodings_are_decoded_like_the_models_own_transform() -> None:
    transform = ImageTransform(32, (0.5,) * 3, (0.5,) * 3)
    items = odd_images()
    decoded = decode_batch(batch(items), {"bottle": transform})
    assert decoded.schema.equals(DECODED_SCHEMA)
    for row in decoded.to_pylist():
        assert row["error"] is None, row
        expected = transform.to_array(items[row["source"]])
        assert np.frombuffer(row["pixels"], np.uint8).reshape(32, 32, 3).tolist() == expected.tolist()
        assert (row["height"], row["width"]) == (40, 60)


def test_each_category_is_decoded_at_its_own_models_size() -> None:
    transforms = {"small": ImageTransform(16, (0.5,) * 3, (0.5,) * 3), "large": ImageTransform((24, 40), (0.5,) * 3, (0.5,) * 3)}
    data = odd_images()["rgb.png"]
    table = pa.concat_tables([batch({"a.png": data}, "small"), batch({"b.png": data}, "large")])
    sizes = [len(row["pixels"]) for row in decode_batch(table, transforms).to_pylist()]
    assert sizes == [16 * 16 * 3, 24 * 40 * 3]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_broken_images_become_error_rows_naming_the_source() -> None:
    transform = ImageTransform(32, (0.5,) * 3, (0.5,) * 3)
    decoded = decode_batch(batch(broken_images()), {"bottle": transform}).to_pylist()
    assert len(decoded) == len(broken_images())
    for row in decoded:
        assert row["pixels"] is None and row["error"].startswith(f"cannot decode image {row['source']}"), row
    assert "more than the limit" in decoded[-1]["error"]


def test_rows_that_already_failed_or_were_skipped_pass_through() -> None:
    table = pa.table({
        "source": ["a.tar", "a.tar::x.txt"], "category": ["bottle", "bottle"], "input": [3, 3],
        "data": pa.array([None, None], pa.binary()),
        "error": ["archive a.tar is unreadable", None], "skipped": [False, True],
    })
    rows = decode_batch(table, {}).to_pylist()
    assert [(r["error"], r["skipped"], r["pixels"]) for r in rows] == [("archive a.tar is unreadable", False, None), (None, True, None)]
    assert [row["input"] for row in rows] == [3, 3]  # which --input each row came from travels on


def test_original_size_follows_exif_rotation() -> None:
    image = Image.new("RGB", (60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 40 wide, 60 high
    assert original_size(encode(image, "JPEG", exif=exif.tobytes())) == (60, 40)
    assert original_size(encode(image)) == (40, 60)
