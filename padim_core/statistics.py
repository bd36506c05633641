"""A PaDiM model's sufficient statistics, kept beside the model so that it can grow.

The Gaussians are finalised from running sums (count, sum, sum of outer products, in float64;
`gaussian.GaussianAccumulator`). The model file keeps only what scoring needs (mean, inverse
covariance); this file keeps the sums, so new normal images are added exactly, by addition,
without refitting the images already seen. The sums of outer products are symmetric: only their
upper triangle is stored.

The file also names what the sums were made with (backbone, layers, channel index, image size,
grid), so an update can refuse images embedded differently, and it can carry the split manifest
of the fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from padim_core import safe_write
from padim_core.errors import ModelFileError
from padim_core.gaussian import GaussianAccumulator

FORMAT = "padim-statistics"
FORMAT_VERSION = 1
METADATA_KEY = "padim_statistics"
EMBEDDING_KEYS = ("kind", "backbone", "layers", "image_size", "pretrained", "embedding", "seed", "n_features",
                  "embedding_size")
"""What must agree between two detectors (or statistics and a detector) for their embeddings to add
up; a kind without some of these (PatchCore has no channel subset) is compared on the others."""


def fingerprint(model: Any) -> dict[str, Any]:
    """What a detector's embeddings depend on (a channel index is compared apart, as a tensor)."""
    values = {"kind": model.kind, "backbone": model.backbone, "layers": list(model.layers),
              "image_size": list(model.image_size), "pretrained": model.pretrained}
    return values | {key: getattr(model, key) for key in EMBEDDING_KEYS if key not in values and hasattr(model, key)}


def embedding_differences(found: dict[str, Any], found_index: torch.Tensor | None, expected: Any) -> list[str]:
    """Each way in which `found` (a fingerprint, and a channel index or None) embeds images
    differently from the detector `expected`, named with both values."""
    wanted = fingerprint(expected)
    different = [f"{key} {found.get(key)!r} (expected {value!r})" for key, value in wanted.items() if found.get(key) != value]
    index = getattr(expected, "channel_index", None)
    if index is not None and (found_index is None or not torch.equal(found_index.cpu(), index.cpu())):
        different.append("the channel index")
    return different


@dataclass
class PackedSums:
    """Running sums with only the upper triangle of each outer product: what the statistics file
    and a shard of a sharded fit carry (about half the bytes). They merge by addition as they are."""

    grid_shape: tuple[int, int]
    count: int
    tensors: dict[str, torch.Tensor]  # as GaussianAccumulator.tensors(), `outer` packed to [L, C (C + 1) / 2]

    @classmethod
    def of(cls, accumulator: GaussianAccumulator) -> PackedSums:
        rows, columns = torch.triu_indices(accumulator.channels, accumulator.channels)
        tensors = {name: (value[:, rows, columns] if name == "outer" else value).detach().cpu().contiguous()
                   for name, value in accumulator.tensors().items()}
        return cls(tuple(accumulator.grid_shape), accumulator.count, tensors)

    def unpack(self) -> GaussianAccumulator:
        tensors = dict(self.tensors)
        channels = tensors["total"].shape[1]
        rows, columns = torch.triu_indices(channels, channels)
        packed = tensors.pop("outer")
        outer = torch.zeros(packed.shape[0], channels, channels, dtype=packed.dtype)
        outer[:, rows, columns] = packed
        outer[:, columns, rows] = packed
        return GaussianAccumulator(grid_shape=self.grid_shape, count=self.count, outer=outer, **tensors)

    def __iadd__(self, other: PackedSums) -> PackedSums:
        if other.grid_shape != self.grid_shape or other.tensors.keys() != self.tensors.keys():
            raise ValueError(f"sums of a {list(self.grid_shape)} and a {list(other.grid_shape)} grid do not add up")
        for name, value in self.tensors.items():
            value += other.tensors[name]
        self.count += other.count
        return self

    @property
    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self.tensors.values())


def encode_statistics(sums: GaussianAccumulator | PackedSums, model: Any, manifest: dict[str, Any] | None = None) -> bytes:
    """The statistics file's bytes for `sums`, made by the embeddings of `model`."""
    packed = sums if isinstance(sums, PackedSums) else PackedSums.of(sums)
    tensors = {**packed.tensors, "channel_index": model.channel_index.cpu().contiguous()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **fingerprint(model),
            "grid_shape": list(packed.grid_shape), "count": packed.count, "manifest": manifest}
    return save(tensors, metadata={METADATA_KEY: json.dumps(meta)})


def write_statistics(path: str | Path, accumulator: GaussianAccumulator, model: Any,
                     manifest: dict[str, Any] | None = None) -> Path:
    """Write the statistics file atomically."""
    return safe_write.write_file(path, encode_statistics(accumulator, model, manifest))


def read_statistics(source: str | Path | bytes) -> tuple[GaussianAccumulator, dict[str, Any], torch.Tensor]:
    """(the sums, the file's metadata, the channel index) from a path or the file's bytes."""
    where = f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as error:
        raise ModelFileError(f"statistics file {where}: cannot be read ({error.strerror or error})") from None
    try:
        tensors = load(data)
        meta = json.loads(_metadata(data)[METADATA_KEY])
    except (SafetensorError, ValueError, KeyError, TypeError) as error:
        raise ModelFileError(f"statistics file {where}: not a padim statistics file ({error})") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"statistics file {where}: format {meta.get('format')!r} version "
                             f"{meta.get('format_version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}")
    channel_index = tensors.pop("channel_index")
    try:
        accumulator = PackedSums(tuple(meta["grid_shape"]), int(meta["count"]), tensors).unpack()
    except (TypeError, KeyError, RuntimeError) as error:
        raise ModelFileError(f"statistics file {where}: its sums do not fit this padim ({error})") from None
    return accumulator, meta, channel_index


def check_compatible(meta: dict[str, Any], channel_index: torch.Tensor, model: Any, where: str) -> None:
    """Refuse statistics made by other embeddings than `model`'s: name every difference."""
    different = embedding_differences(meta, channel_index, model)
    if different:
        raise ModelFileError(f"{where}: these statistics were made with other embeddings: {'; '.join(different)}")


def _metadata(data: bytes) -> dict[str, str]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}
