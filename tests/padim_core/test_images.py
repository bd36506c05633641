"""Decoding every kind of image input, the huge-image guard, the transform and ground-truth masks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from padim_core.errors import ImageDecodeError, PadimError
from padim_core.image_files import IMAGE_SUFFIXES, is_image_name
from padim_core.images import ImageTransform, decode_image, load_mask

from support.images import encode, noise_png

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def pixel(image: Image.Image, x: int = 0, y: int = 0) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[y, x])


# -- decode_image: sources ----------------------------------------------------------------------


def test_decodes_a_real_mvtec_png(mvtec_root: Path) -> None:
    path = mvtec_root / "bottle" / "train" / "good" / "000.png"
    for source in (path, str(path), path.read_bytes()):
        image = decode_image(source)
        assert (image.mode, image.size) == ("RGB", (900, 900))


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_bytes_like_sources(kind) -> None:
    data = encode(Image.new("RGB", (5, 4), (10, 20, 30)), "PNG")
    image = decode_image(kind(data))
    assert (image.mode, image.size, pixel(image)) == ("RGB", (5, 4), (10, 20, 30))


@pytest.mark.parametrize("format", ["PNG", "JPEG", "BMP", "TIFF"])
def test_formats_from_files(tmp_path: Path, format: str) -> None:
    path = tmp_path / f"image.{format.lower()}"
    Image.new("RGB", (16, 8), (200, 100, 50)).save(path, format=format)
    image = decode_image(path)
    assert (image.mode, image.size) == ("RGB", (16, 8))
    assert np.abs(np.asarray(image, dtype=int) - (200, 100, 50)).max() <= 3


def test_pil_image_source_is_not_modified() -> None:
    gray = Image.new("L", (3, 2), 77)
    image = decode_image(gray)
    assert (image.mode, pixel(image), gray.mode) == ("RGB", (77, 77, 77), "L")


def test_unsupported_source_type() -> None:
    with pytest.raises(ImageDecodeError, match="expected a path, bytes"):
        decode_image(42)  # type: ignore[arg-type]


# -- decode_image: modes ------------------------------------------------------------------------


def test_grayscale_becomes_rgb() -> None:
    image = decode_image(encode(Image.new("L", (4, 4), 90), "PNG"))
    assert (image.mode, pixel(image)) == ("RGB", (90, 90, 90))


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    levels = np.array([[0, 65535, 257 * 100, 32896]], dtype=np.uint16)
    data = encode(Image.fromarray(levels), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = decode_image(data)
    assert np.asarray(image)[0, :, 0].tolist() == [0, 255, 100, 128]


def test_sixteen_bit_big_endian_tiff() -> None:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.array([[0, 65535, 257 * 7]], dtype=">u2"), byteorder=">")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16B"
    assert np.asarray(decode_image(buffer.getvalue()))[0, :, 1].tolist() == [0, 255, 7]


def test_sixteen_bit_rgb_tiff() -> None:
    levels = np.array([[[0, 32896, 65535], [257 * 10, 257 * 20, 257 * 30]]], dtype=np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, levels, photometric="rgb")
    image = decode_image(buffer.getvalue())
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=int) - np.rint(levels / 257)).max() <= 1


def test_cmyk_jpeg() -> None:
    cmyk = Image.new("RGB", (16, 16), (200, 40, 40)).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = decode_image(data)
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=int) - (200, 40, 40)).max() <= 6


def test_palette_png() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 128, 255, 10, 20, 30])
    palette.putpixel((1, 0), 1)
    image = decode_image(encode(palette, "PNG"))
    assert (image.mode, pixel(image, 0), pixel(image, 1)) == ("RGB", (0, 128, 255), (10, 20, 30))


def test_palette_transparency_becomes_black() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.putpixel((1, 0), 1)
    image = decode_image(encode(palette, "PNG", transparency=0))
    assert [pixel(image, 0), pixel(image, 1)] == [(0, 0, 0), (0, 255, 0)]


def test_rgba_is_composited_on_black() -> None:
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], dtype=np.uint8)
    image = decode_image(encode(Image.fromarray(rgba), "PNG"))
    assert pixel(image, 0) == (200, 100, 50)
    assert pixel(image, 1) == (0, 0, 0)
    assert np.abs(np.array(pixel(image, 2)) - (100, 50, 25)).max() <= 1


def test_gray_with_alpha() -> None:
    image = decode_image(encode(Image.new("LA", (2, 2), (100, 255)), "PNG"))
    assert pixel(image) == (100, 100, 100)


def test_exif_orientation_is_applied() -> None:
    left_red = np.zeros((16, 32, 3), dtype=np.uint8)
    left_red[:, :16] = (255, 0, 0)
    left_red[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be turned 90 degrees clockwise for display
    image = decode_image(encode(Image.fromarray(left_red), "JPEG", quality=95, exif=exif))
    assert image.size == (16, 32)
    pixels = np.asarray(image, dtype=int)
    assert pixels[:12, :, 0].mean() > 200 and pixels[20:, :, 2].mean() > 200  # left went to the top


def test_jpeg_draft_decodes_smaller_but_not_below_the_size() -> None:
    data = encode(Image.new("RGB", (800, 600), (30, 60, 90)), "JPEG")
    assert decode_image(data, draft_size=100).size == (200, 150)
    assert decode_image(data, draft_size=700).size == (800, 600)
    png = encode(Image.new("RGB", (800, 600)), "PNG")
    assert decode_image(png, draft_size=100).size == (800, 600)


# -- decode_image: numpy arrays -----------------------------------------------------------------


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((2, 3), 40, np.uint8), (40, 40, 40)),
        (np.full((2, 3, 1), 40, np.uint8), (40, 40, 40)),
        (np.full((2, 3, 3), (1, 2, 3), np.uint8), (1, 2, 3)),
        (np.full((2, 3, 4), (100, 50, 20, 255), np.uint8), (100, 50, 20)),
        (np.full((2, 3), 257 * 9, np.uint16), (9, 9, 9)),
        (np.ones((2, 3), bool), (255, 255, 255)),
        (np.full((2, 3, 3), 0.5, np.float32), (128, 128, 128)),
    ],
)
def test_arrays(array: np.ndarray, expected: tuple[int, int, int]) -> None:
    image = decode_image(array)
    assert (image.mode, image.size, pixel(image)) == ("RGB", (3, 2), expected)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((2, 3, 2), np.uint8), "HxW, HxWx1, HxWx3 or HxWx4"),
        (np.zeros((2,), np.uint8), "HxW, HxWx1, HxWx3 or HxWx4"),
        (np.zeros((0, 3), np.uint8), "empty"),
        (np.full((2, 2), 1.5), r"\[0, 1\]"),
        (np.full((2, 2), np.nan), r"\[0, 1\]"),
        (np.zeros((2, 2), np.int64), "int64"),
    ],
)
def test_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(array)


# -- decode_image: bad input --------------------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty.png"):
        decode_image(path)
    with pytest.raises(ImageDecodeError, match="<0 bytes>: empty"):
        decode_image(b"")


def test_truncated_png(tmp_path: Path) -> None:
    data = noise_png()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="cut.png.*truncated"):
        decode_image(path)


def test_random_bytes_name_the_given_name() -> None:
    junk = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError, match=r"archive.tar::x.png"):
        decode_image(junk, name="archive.tar::x.png")


def test_text_file_with_png_suffix(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not an image\n")
    with pytest.raises(ImageDecodeError, match="notes.png: empty, or not in a format PIL can read"):
        decode_image(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="missing.png"):
        decode_image(tmp_path / "missing.png")


def test_corrupt_png_chunk() -> None:
    data = bytearray(noise_png())
    data[500] ^= 0xFF  # inside the compressed pixel data
    with pytest.raises(ImageDecodeError, match="broken data stream"):
        decode_image(bytes(data))


def test_huge_image_guard_names_the_size() -> None:
    data = encode(Image.new("RGB", (40, 30)), "PNG")
    with pytest.raises(ImageDecodeError, match="40x30 = 1200 pixels.*limit of 1000"):
        decode_image(data, max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="1200 pixels"):
        decode_image(np.zeros((30, 40), np.uint8), max_pixels=1000)
    assert decode_image(data, max_pixels=1200).size == (40, 30)


def test_decode_error_is_a_padim_error_not_a_value_error() -> None:
    assert issubclass(ImageDecodeError, PadimError) and not issubclass(ImageDecodeError, ValueError)
    from padim_core import images

    assert images.ImageDecodeError is ImageDecodeError  # the old import path still resolves


# -- ImageTransform -----------------------------------------------------------------------------


def test_transform_normalises_exactly() -> None:
    transform = ImageTransform(8, MEAN, STD)
    tensor = transform(Image.new("RGB", (20, 20), (255, 128, 0)))
    assert tensor.shape == (3, 8, 8) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    expected = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(tensor[:, 3, 3], expected)


def test_to_pixels_gives_uint8_that_normalise_to_the_transform() -> None:
    transform = ImageTransform((12, 20), MEAN, STD)
    data = noise_png(40)
    pixels = transform.to_pixels(data, name="x.png")
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 12, 20)
    assert torch.equal(pixels, torch.from_numpy(transform.to_array(data)).permute(2, 0, 1))
    assert torch.equal(transform.normalize(pixels), transform(data))
    assert torch.equal(transform.normalize(pixels[None])[0], transform(data))  # batches too
    with pytest.raises(ImageDecodeError, match="x.png"):
        transform.to_pixels(b"junk", name="x.png")


def test_transform_resizes_to_height_width() -> None:
    transform = ImageTransform((32, 48), MEAN, STD)
    gradient = np.tile(np.linspace(0, 255, 100, dtype=np.uint8), (60, 1))
    assert transform(encode(Image.fromarray(gradient), "PNG")).shape == (3, 32, 48)
    array = transform.to_array(gradient)
    assert array.shape == (32, 48, 3) and array.dtype == np.uint8 and array.flags.writeable
    assert array[0, 0, 0] < 10 and array[0, -1, 0] > 245  # the gradient still runs left to right


def test_transform_matches_real_image(mvtec_root: Path) -> None:
    path = mvtec_root / "bottle" / "train" / "good" / "000.png"
    transform = ImageTransform(64, MEAN, STD)
    direct = np.asarray(Image.open(path).convert("RGB").resize((64, 64), Image.BILINEAR), dtype=np.float32)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    expected = (torch.from_numpy(direct).permute(2, 0, 1) / 255 - mean) / std
    # Plain RGB PNGs take libpng + torchvision's antialiased resize: within one grey level of PIL.
    one_level = float((1 / 255 / std).max()) + 1e-5
    torch.testing.assert_close(transform(path), expected, rtol=0, atol=one_level)
    assert (transform(path) - expected).abs().mean() < one_level / 100
    assert torch.equal(transform(path), transform(path.read_bytes()))


def test_transform_draft_decodes_jpeg_close_to_full() -> None:
    gradient = np.tile(np.linspace(0, 255, 800, dtype=np.uint8), (800, 1))
    data = encode(Image.fromarray(gradient), "JPEG", quality=95)
    transform = ImageTransform(64, MEAN, STD)
    full = transform(Image.open(io.BytesIO(data)))  # a PIL image is never drafted
    assert (transform(data) - full).abs().max() < 0.1


def test_transform_errors() -> None:
    transform = ImageTransform(8, MEAN, STD)
    with pytest.raises(ImageDecodeError, match="upload.jpg"):
        transform(b"junk", name="upload.jpg")
    with pytest.raises(ValueError, match="size"):
        ImageTransform(0, MEAN, STD)
    for size in ((8, 8, 8), 8.0, (8, True), "8"):
        with pytest.raises(ValueError, match="size"):
            ImageTransform(size, MEAN, STD)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="std"):
        ImageTransform(8, MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="mean"):
        ImageTransform(8, (0.5, 0.5), STD)


# -- load_mask ----------------------------------------------------------------------------------


def test_load_mask_none_is_all_false() -> None:
    mask = load_mask(None, (4, 6))
    assert mask.shape == (4, 6) and mask.dtype == bool and not mask.any()


def test_load_mask_resizes_nearest(tmp_path: Path) -> None:
    pixels = np.zeros((40, 80), np.uint8)
    pixels[:, 40:] = 255
    path = tmp_path / "000_mask.png"
    Image.fromarray(pixels).save(path)
    mask = load_mask(path, (10, 20))
    assert mask.shape == (10, 20) and mask.dtype == bool
    assert not mask[:, :10].any() and mask[:, 10:].all()


def test_load_mask_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad_mask.png"
    path.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ImageDecodeError, match="bad_mask.png"):
        load_mask(path, (4, 4))
    with pytest.raises(ValueError, match="size"):
        load_mask(None, (4, -1))


def test_load_real_mask(mvtec_root: Path) -> None:
    mask = load_mask(mvtec_root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png", (64, 64))
    assert 0 < mask.sum() < mask.size


# -- names --------------------------------------------------------------------------------------


def test_is_image_name() -> None:
    assert IMAGE_SUFFIXES == (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
    assert all(is_image_name(f"a{suffix}") for suffix in IMAGE_SUFFIXES)
    assert is_image_name("A.PNG") and is_image_name("scan.TiFf")
    assert not any(is_image_name(name) for name in ("a.gif", "a.txt", "png", "a.png.bak", ""))
