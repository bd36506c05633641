"""The model file: one safetensors file per fitted detector, and everything that checks it.

Layout: the detector's tensors, and one JSON string in the safetensors metadata under `padim`:
format and version, the detector kind, the backbone, layers, image size, normalisation, grid
shape, blur, the kind's own settings, the training count, the calibration and score statistics,
and the versions that wrote it. No pickle anywhere.

`read_model_file` validates every common value's type and range (and the image size against
the grid and the backbone's stride), so a file that loads can score; the detector class then
checks its own settings and tensor shapes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as encode_tensors

from padim_core import safe_write
from padim_core.backbones import get_backbone
from padim_core.calibration import Calibration
from padim_core.errors import BackboneError, ModelFileError

FORMAT = "padim-model"
FORMAT_VERSION = 2
METADATA_KEY = "padim"
MAX_IMAGE_SIDE = 2048
"""Largest image side a model may take: a PaDiM map at 2048 px is 16 MB per image already."""

_MAX_HEADER = 100 * 1024**2  # safetensors' own limit on the JSON header

ModelSource = str | Path | bytes | bytearray | memoryview


@dataclass(frozen=True)
class ModelFile:
    """A validated model file: its kind, its metadata and its tensors."""

    kind: str
    metadata: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    where: str  # the path, or "<N bytes>", for messages

    @property
    def calibration(self) -> Calibration | None:
        values = self.metadata.get("calibration")
        return None if values is None else Calibration.from_dict(values, self.where)


def encode_model(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> bytes:
    """The bytes of a model file (tensors contiguous on the CPU; metadata as JSON)."""
    plain = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    return encode_tensors(plain, metadata={METADATA_KEY: json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **metadata})})


def write_model_file(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
    """Write a model file atomically: no half-written file under the final name, ever."""
    return safe_write.write_file(path, encode_model(tensors, metadata))


def describe_source(source: ModelSource) -> str:
    return f"<{memoryview(source).nbytes} bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def read_model_file(source: ModelSource) -> ModelFile:
    """Read and validate a model file from a path or from its bytes."""
    where = describe_source(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ModelFileError(f"{where}: no such model file")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ModelFileError(f"{where}: cannot be read ({error.strerror or error})") from None
    else:
        data = bytes(source)
    header = _safetensors_header(data, where)
    meta = _padim_metadata(header, where)
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise ModelFileError(f"{where}: a safetensors header, but its tensors cannot be read ({error}); is it truncated?") from None
    check_common_metadata(meta, where)
    return ModelFile(meta["kind"], meta, tensors, where)


def _safetensors_header(data: bytes, where: str) -> dict[str, Any]:
    """The JSON header, or "not a safetensors file" for anything else (a pickle, an image...)."""
    not_safetensors = ModelFileError(f"{where}: not a safetensors file (a padim model file is safetensors with padim metadata)")
    if len(data) < 8:
        raise not_safetensors
    (length,) = struct.unpack("<Q", data[:8])
    if length > _MAX_HEADER or not data[8:9] == b"{":
        raise not_safetensors
    if length > len(data) - 8:
        raise ModelFileError(f"{where}: its safetensors header needs {length} bytes but the file has {len(data) - 8} after "
                             "the length; is it truncated?")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise not_safetensors from None
    if not isinstance(header, dict):
        raise not_safetensors
    return header


def _padim_metadata(header: dict[str, Any], where: str) -> dict[str, Any]:
    extra = header.get("__metadata__") or {}
    if METADATA_KEY not in extra:
        raise ModelFileError(f"{where}: a safetensors file, but not a padim model (no {METADATA_KEY!r} metadata)")
    try:
        meta = json.loads(extra[METADATA_KEY])
    except (TypeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{where}: padim metadata is not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise ModelFileError(f"{where}: metadata format is {found!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{where}: model format version {meta.get('format_version')!r}; this padim reads version {FORMAT_VERSION} "
            "(fit the model again with this version)"
        )
    return meta


COMMON_KEYS = (
    "kind", "backbone", "layers", "pretrained", "image_size", "grid_shape", "normalization", "blur_sigma",
    "settings", "n_train", "calibration", "score_stats",
)


def check_common_metadata(meta: Mapping[str, Any], where: str) -> None:
    """Every value every detector kind shares: types, ranges and how they fit together."""
    missing = [key for key in COMMON_KEYS if key not in meta]
    if missing:
        raise ModelFileError(f"{where}: padim metadata lacks {missing}")

    def fail(key: str, expected: str) -> ModelFileError:
        return ModelFileError(f"{where}: metadata {key} is {meta[key]!r}; expected {expected}")

    if not isinstance(meta["kind"], str) or not meta["kind"]:
        raise fail("kind", "a detector kind name")
    try:
        spec = get_backbone(meta["backbone"]) if isinstance(meta["backbone"], str) else None
        if spec is None:
            raise fail("backbone", "a backbone name")
        layers = meta["layers"]
        if not isinstance(layers, list) or not all(isinstance(layer, str) for layer in layers):
            raise fail("layers", "a list of layer names")
        layers = spec.validate_layers(layers)
    except BackboneError as error:
        raise ModelFileError(f"{where}: {error}") from None
    if not isinstance(meta["pretrained"], bool):
        raise fail("pretrained", "true or false")
    image_size = _pair(meta["image_size"])
    if image_size is None or max(image_size) > MAX_IMAGE_SIDE:
        raise fail("image_size", f"[height, width] of integers from 1 to {MAX_IMAGE_SIDE}")
    grid = _pair(meta["grid_shape"])
    stride = spec.layer_strides[layers[0]]
    expected_grid = tuple(math.ceil(side / stride) for side in image_size)
    if grid != expected_grid:
        raise fail("grid_shape", f"{list(expected_grid)}: image size {list(image_size)} at the stride {stride} of {layers[0]}")
    if min(image_size) < max(spec.layer_strides[layer] for layer in layers):
        raise fail("image_size", f"sides of at least the deepest layer's stride {max(spec.layer_strides[layer] for layer in layers)}")
    normalization = meta["normalization"]
    if not (isinstance(normalization, dict) and _numbers(normalization.get("mean"), 3)
            and _numbers(normalization.get("std"), 3) and min(normalization["std"]) > 0):
        raise fail("normalization", "{mean: [3 numbers], std: [3 positive numbers]}")
    if not _finite(meta["blur_sigma"]) or meta["blur_sigma"] < 0:
        raise fail("blur_sigma", "a finite number >= 0")
    if not isinstance(meta["settings"], dict):
        raise fail("settings", "a mapping of the detector's settings")
    if isinstance(meta["n_train"], bool) or not isinstance(meta["n_train"], int) or meta["n_train"] < 0:
        raise fail("n_train", "an integer >= 0")
    if meta["calibration"] is not None:
        Calibration.from_dict(meta["calibration"], where)
    stats = meta["score_stats"]
    if not isinstance(stats, dict) or not all(isinstance(key, str) and _finite(value) for key, value in stats.items()):
        raise fail("score_stats", "a mapping of names to finite numbers")


def _pair(value: Any) -> tuple[int, int] | None:
    if not isinstance(value, list) or len(value) != 2:
        return None
    if not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in value):
        return None
    return value[0], value[1]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value: Any, count: int) -> bool:
    return isinstance(value, list) and len(value) == count and all(_finite(item) for item in value)


def check_tensor(file: ModelFile, name: str, shape: tuple[int, ...], dtype: torch.dtype | tuple[torch.dtype, ...]) -> torch.Tensor:
    """The named tensor, checked for shape, dtype and finiteness."""
    if name not in file.tensors:
        raise ModelFileError(f"{file.where}: missing tensor {name!r} (has {sorted(file.tensors)})")
    tensor = file.tensors[name]
    if tuple(tensor.shape) != tuple(shape):
        raise ModelFileError(f"{file.where}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if tensor.dtype not in dtypes:
        raise ModelFileError(f"{file.where}: tensor {name} is {tensor.dtype}, expected {' or '.join(map(str, dtypes))}")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ModelFileError(f"{file.where}: tensor {name} holds NaN or infinity")
    return tensor
