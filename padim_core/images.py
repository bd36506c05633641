"""Turn any image source into 8-bit RGB, and 8-bit RGB into the model's normalised tensor.

Every image the model sees goes through `decode_image`, so odd inputs (16-bit, CMYK, palette,
alpha, EXIF rotation) are handled in one place and a bad input is always an `ImageDecodeError`
that names where it came from, never a bare PIL exception halfway through a batch.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import decode_png
from torchvision.transforms.v2.functional import resize

from padim_core.errors import ImageDecodeError

MAX_PIXELS = 100_000_000
"""Images above this many pixels are refused before decoding (a 100-megapixel RGB image is 300 MB).

PIL's own guard (`PIL.Image.MAX_IMAGE_PIXELS`) still applies on top: it warns above ~89
megapixels and refuses above twice that.
"""

ImageSource = str | Path | bytes | bytearray | memoryview | Image.Image | np.ndarray

# What PIL raises for unreadable input: UnidentifiedImageError and truncation are OSErrors,
# broken PNG chunks are SyntaxErrors, bad headers surface as ValueError, EOFError or struct.error.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def decode_image(
    source: ImageSource,
    *,
    name: str | None = None,
    draft_size: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Decode `source` into an 8-bit RGB image.

    `source` is a file path, encoded bytes, a PIL image or a numpy array (HxW, HxWx1, HxWx3 or
    HxWx4 of uint8, uint16, bool, or float in [0, 1]). `name` replaces the source's description
    in error messages (for bytes read from an archive, say). With `draft_size`, JPEGs decode at
    the smallest 1/2, 1/4 or 1/8 scale whose sides are still at least `draft_size`.

    The EXIF orientation is applied. 16-bit data is scaled to 8 bits (divided by 257), not
    clipped. Transparent pixels are composited onto black, so whatever colour a transparent
    pixel happens to store never reaches the model.
    """
    label = name or _describe(source)
    try:
        if isinstance(source, np.ndarray):
            image = _image_from_array(source)
            _check_size(image, max_pixels)
        elif isinstance(source, Image.Image):
            _check_size(source, max_pixels)
            source.load()
            image = ImageOps.exif_transpose(source)
        else:
            image = _open(source, draft_size, max_pixels)
        return _to_rgb(image)
    except ImageDecodeError as error:
        raise ImageDecodeError(f"cannot decode image {label}: {error}") from None
    except UnidentifiedImageError as error:
        # PIL's own message repeats the source (as an object repr for bytes): say what went wrong
        raise ImageDecodeError(f"cannot decode image {label}: empty, or not in a format PIL can read") from error
    except _DECODE_ERRORS as error:
        raise ImageDecodeError(f"cannot decode image {label}: {error}") from error


def load_mask(path: str | Path | None, size: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask as a bool array of `size` (H, W); `None` means "no defect pixels".

    Resized with nearest neighbour so it stays binary; a pixel is a defect when its brightest
    channel is above half, so anti-aliased or JPEG-compressed masks binarise sensibly too.
    """
    height, width = _check_shape(size)
    if path is None:
        return np.zeros((height, width), dtype=bool)
    mask = decode_image(path)
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.NEAREST)
    return np.asarray(mask).max(axis=2) > 127


class ImageTransform:
    """Decode, resize to `image_size` and normalise: the one preprocessing path for fit and predict.

    Built once and called per image (so it can live inside a Ray actor or a DataLoader worker).
    """

    def __init__(
        self, image_size: int | tuple[int, int], mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.image_size = _check_shape(image_size)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must be three numbers each, std positive; got mean={mean}, std={std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # (x / 255 - mean) / std folded into one multiply-add
        std_tensor = torch.tensor(self.std).view(3, 1, 1)
        self._scale = 1.0 / (255.0 * std_tensor)
        self._shift = -torch.tensor(self.mean).view(3, 1, 1) / std_tensor

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size}, mean={self.mean}, std={self.std})"

    def to_array(self, source: ImageSource, *, name: str | None = None) -> np.ndarray:
        """The decoded image resized to `image_size`, as writable uint8 HxWx3 (for overlays)."""
        height, width = self.image_size
        fast = _plain_png_resized(source, self.image_size)
        if fast is not None:
            return fast
        image = decode_image(source, name=name, draft_size=max(height, width))
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        return np.array(image)

    def to_pixels(self, source: ImageSource, *, name: str | None = None) -> torch.Tensor:
        """The decoded, resized image as uint8 `[3, H, W]`: what detectors and loaders take."""
        return torch.from_numpy(self.to_array(source, name=name)).permute(2, 0, 1)

    def __call__(self, source: ImageSource, *, name: str | None = None) -> torch.Tensor:
        """A normalised float32 tensor `[3, H, W]`."""
        return self.normalize(self.to_pixels(source, name=name))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[..., 3, H, W]` -> normalised float32, value for value as `__call__` gives."""
        # one copy that both converts to float and lays the channels out contiguously
        tensor = images.to(torch.float32, memory_format=torch.contiguous_format)
        return tensor.mul_(self._scale).add_(self._shift)


def _plain_png_resized(source: ImageSource, size: tuple[int, int]) -> np.ndarray | None:
    """Plain 8-bit RGB PNGs through libpng and torchvision's antialiased resize; None otherwise.

    For large photos, such as MVTec AD's 900x900 ones, this decodes and resizes faster than PIL
    does, and stays within one grey level of PIL's result.
    Anything unusual (other bit depths or colour types, transparency, EXIF, a huge or broken
    file) returns None and takes the PIL path, which handles and reports it.
    """
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError:
            return None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        return None
    # PNG signature, then IHDR: width, height (big-endian), bit depth 8, colour type 2 (RGB).
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[24:26] != b"\x08\x02":
        return None
    width, height = struct.unpack(">II", data[16:24])
    if width * height > MAX_PIXELS or b"tRNS" in data or b"eXIf" in data:
        return None
    try:
        image = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except RuntimeError:
        return None
    if tuple(image.shape[1:]) != size:
        image = resize(image, list(size), antialias=True)
    return image.permute(1, 2, 0).numpy().copy()


def _describe(source: object) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{memoryview(source).nbytes} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.dtype} {source.shape}>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    return f"<{type(source).__name__}>"


def _open(source: ImageSource, draft_size: int | None, max_pixels: int) -> Image.Image:
    if isinstance(source, (str, Path)):
        file = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        file = io.BytesIO(source)
    else:
        raise ImageDecodeError(f"expected a path, bytes, a PIL image or a numpy array, got {type(source).__name__}")
    with Image.open(file) as image:
        _check_size(image, max_pixels)
        if draft_size is not None:
            image.draft("RGB", (draft_size, draft_size))  # a no-op for every format but JPEG
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return image


def _check_size(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # "I" (32-bit) is what older Pillow made of 16-bit PNGs, so it is read as 16-bit too.
        levels = np.asarray(image).astype(np.float32)
        return Image.fromarray(_scaled_to_uint8(levels, 65535.0)).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(_scaled_to_uint8(np.nan_to_num(np.asarray(image)), 1.0)).convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _scaled_to_uint8(levels: np.ndarray, full_scale: float) -> np.ndarray:
    """Map [0, full_scale] to [0, 255] with rounding (65535 / 257 = 255 exactly)."""
    scaled = np.clip(levels, 0.0, full_scale) * (255.0 / full_scale)
    return np.rint(scaled).astype(np.uint8)


def _image_from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageDecodeError(f"expected an array of shape HxW, HxWx1, HxWx3 or HxWx4, got {array.shape}")
    if array.size == 0:
        raise ImageDecodeError(f"array of shape {array.shape} is empty")
    if array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * 255
    elif array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.uint16:
        pixels = _scaled_to_uint8(array.astype(np.float32), 65535.0)
    elif np.issubdtype(array.dtype, np.floating):
        low, high = float(np.min(array)), float(np.max(array))
        if not (0.0 <= low and high <= 1.0):
            raise ImageDecodeError(f"float pixels must lie in [0, 1], found values in [{low}, {high}]")
        pixels = _scaled_to_uint8(array, 1.0)
    else:
        raise ImageDecodeError(f"expected uint8, uint16, bool or float pixels, got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(pixels))


def _check_shape(size: int | tuple[int, int]) -> tuple[int, int]:
    """`size` as (height, width) of positive ints; a single int means a square."""
    shape = (size, size) if isinstance(size, (int, np.integer)) else size
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2 and all(map(_is_side, shape))):
        raise ValueError(f"size must be a positive int or a (height, width) pair of them, got {size!r}")
    return int(shape[0]), int(shape[1])


def _is_side(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0
