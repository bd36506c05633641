"""The pieces of the jobs.score pipeline that need no Ray: category routing, decoding of odd
and broken images, the actor pool plan, and the driver's tallies."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from jobs.score_decoding import decode_batch, original_size
from jobs.score_pipeline import plan_pool
from jobs.score_reading import CategoryRouter
from jobs.score_summary import ScoreSample, Tally
from jobs.score_table import UNKNOWN_CATEGORY, row_schema
from padim_core.config import ConfigError
from padim_core.images import ImageTransform


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header but holds no pixels: enough for the size guard."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def odd_images() -> dict[str, bytes]:
    """Encodings that must be scored, as the model's own transform reads them."""
    gradient = np.linspace(0, 255, 40 * 60 * 3).reshape(40, 60, 3).astype(np.uint8)
    rgb = Image.fromarray(gradient)
    palette = rgb.convert("P", palette=Image.ADAPTIVE)
    palette.info["transparency"] = 0
    return {
        "rgb.png": encode(rgb),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "sixteen.png": encode(Image.fromarray((gradient[..., 0].astype(np.uint16) * 257))),
        "palette.png": encode(palette, transparency=0),
        "alpha.png": encode(rgb.convert("RGBA")),
        "gray.bmp": encode(rgb.convert("L"), "BMP"),
        "float.tif": encode(Image.fromarray(gradient[..., 0].astype(np.float32) / 255.0), "TIFF"),
    }


def broken_images() -> dict[str, bytes]:
    """Inputs that must become error rows."""
    good = odd_images()["rgb.png"]
    return {
        "empty.png": b"",
        "truncated.png": good[: len(good) // 2],
        "text.png": b"this is not an image",
        "huge.png": png_header_only(12_000, 12_000),  # 144 megapixels
    }


def batch(items: dict[str, bytes], category: str = "bottle") -> pa.Table:
    names = list(items)
    return pa.table({
        "source": names, "category": [category] * len(names), "data": [items[n] for n in names],
        "error": pa.array([None] * len(names), pa.string()), "skipped": [False] * len(names),
    })


def test_odd_encodings_are_decoded_like_the_models_own_transform() -> None:
    transform = ImageTransform(32, (0.5,) * 3, (0.5,) * 3)
    items = odd_images()
    decoded = decode_batch(batch(items), {"bottle": transform}).to_pylist()
    for row in decoded:
        assert row["error"] is None, row
        expected = transform.to_array(items[row["source"]])
        assert np.frombuffer(row["pixels"], np.uint8).reshape(32, 32, 3).tolist() == expected.tolist()
        assert (row["height"], row["width"]) == (40, 60)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_broken_images_become_error_rows_naming_the_source() -> None:
    transform = ImageTransform(32, (0.5,) * 3, (0.5,) * 3)
    decoded = decode_batch(batch(broken_images()), {"bottle": transform}).to_pylist()
    for row in decoded:
        assert row["pixels"] is None and row["error"].startswith(f"cannot decode image {row['source']}"), row
    assert "more than the limit" in decoded[-1]["error"]


def test_rows_that_already_failed_or_were_skipped_pass_through() -> None:
    table = pa.table({
        "source": ["a.tar", "a.tar::x.txt"], "category": ["bottle", "bottle"], "data": pa.array([None, None], pa.binary()),
        "error": ["archive a.tar is unreadable", None], "skipped": [False, True],
    })
    rows = decode_batch(table, {}).to_pylist()
    assert [(r["error"], r["skipped"], r["pixels"]) for r in rows] == [("archive a.tar is unreadable", False, None), (None, True, None)]


def test_original_size_follows_exif_rotation() -> None:
    image = Image.new("RGB", (60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 40 wide, 60 high
    assert original_size(encode(image, "JPEG", exif=exif.tobytes())) == (60, 40)
    assert original_size(encode(image)) == (40, 60)


def test_routing_order_fixed_then_routes_then_column_then_folder() -> None:
    router = CategoryRouter(("bottle", "cable"), routes=(("*/line3/*", "cable"),))
    assert router.route("/d/bottle/a.png", "bottle/a.png", None) == ("bottle", None)
    assert router.route("/d/line3/a.png", "line3/a.png", None) == ("cable", None)
    assert router.route("x.parquet::#1", "#1", "cable") == ("cable", None)
    category, error = router.route("/d/a.png", "a.png", None)
    assert category == UNKNOWN_CATEGORY and "--category" in error
    category, error = router.route("/d/screw/a.png", "screw/a.png", None)
    assert category == "screw" and "no model for category 'screw'" in error
    assert CategoryRouter(("bottle",), fixed="bottle").route("/d/screw/a.png", "screw/a.png", "cable") == ("bottle", None)


def test_pool_plan_shares_cpus_with_the_decoders_and_checks_gpus() -> None:
    one = plan_pool(1, 32, "auto", {"CPU": 2.0}, 2.0)
    assert (one.cpus, one.gpus, one.device, one.threads, one.decoders, one.readers) == (0.9, 0.0, "cpu", 1, 2, 1)
    two = plan_pool(2, 32, "auto", {"CPU": 2.0}, 2.0)
    assert (two.cpus, two.threads) == (0.45, 1)
    big = plan_pool(2, 32, 0, {"CPU": 64.0, "GPU": 4.0}, 16.0)  # an actor must fit on one 16-CPU node
    assert (big.cpus, big.threads, big.device, big.decoders, big.readers) == (7.95, 8, "cpu", 64, 8)
    gpu = plan_pool(2, 32, "auto", {"CPU": 8.0, "GPU": 2.0}, 8.0)
    assert (gpu.gpus, gpu.device, gpu.cpus) == (1.0, "cuda", 1.0)
    with pytest.raises(ConfigError, match="scoring.actors=3"):
        plan_pool(3, 32, "auto", {"CPU": 8.0, "GPU": 2.0}, 8.0)
    with pytest.raises(ConfigError, match="scoring.num_gpus"):
        plan_pool(1, 32, 1, {"CPU": 8.0}, 8.0)


def test_score_sample_keeps_everything_up_to_capacity_then_a_uniform_sample() -> None:
    sample = ScoreSample(capacity=100)
    sample.add(np.arange(60, dtype=np.float32))
    sample.add(np.arange(60, 80, dtype=np.float32))
    assert sorted(sample.values.tolist()) == list(range(80))
    for start in range(80, 10_000, 500):
        sample.add(np.arange(start, start + 500, dtype=np.float32))
    assert sample.values.size == 100 and sample.seen == 10_080
    assert 3_000 < sample.values.mean() < 7_000  # drawn from the whole range, not the first 100


def test_tally_counts_scored_errors_skipped_and_anomalies_per_category() -> None:
    schema = row_schema(False, False)
    rows = {name: [None] * 5 for name in schema.names}
    rows.update(
        source=list("abcde"), category=["bottle", "bottle", "bottle", "cable", "bottle"],
        image_score=[1.0, 3.0, None, 2.0, None], is_anomalous=[False, True, None, None, None],
        error=[None, None, "bad", None, None], skipped=[False, False, False, False, True],
    )
    tally = Tally()
    kept = tally.add(pa.table(rows, schema=schema))
    assert kept.num_rows == 4 and tally.skipped == 1 and tally.skipped_examples == ["e"]
    bottle, cable = tally.categories["bottle"], tally.categories["cable"]
    assert (bottle.scored, bottle.errors, bottle.anomalous, bottle.anomaly_rate) == (2, 1, 1, 0.5)
    assert (cable.scored, cable.anomaly_rate) == (1, None)  # no threshold: no rate
    assert tally.error_examples == ["bad"] and sorted(bottle.sample.values.tolist()) == [1.0, 3.0]
