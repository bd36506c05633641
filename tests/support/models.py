"""Small fitted models, quick to build on a CPU."""

from __future__ import annotations

import json
import struct
from typing import Any

import torch

from padim_core.padim import PadimModel
from padim_core.patchcore import PatchcoreModel

SIZE = 64
"""Input side of the tiny models: resnet18's layer1 gives them a 16x16 grid."""


def images(count: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    """Normalised float32 images `[count, 3, size, size]` of seeded Gaussian noise."""
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def pixels(count: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    """uint8 images `[count, 3, size, size]` of seeded uniform noise."""
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def fit_tiny_padim(seed: int = 1) -> PadimModel:
    """PaDiM on a random-init resnet18 (layer1 + layer2, 20 of 192 channels), fitted on 11 noise images."""
    model = PadimModel("resnet18", ["layer1", "layer2"], n_features=20, image_size=SIZE, pretrained=False, seed=seed)
    return model.fit([images(6), images(5, seed=1)])


def tiny_patchcore(**settings: Any) -> PatchcoreModel:
    """An unfitted PatchCore on a random-init resnet18 (layer2 + layer3: 384 channels on an 8x8
    grid at 64 px); a bank of a quarter of each 256-patch chunk unless `settings` say otherwise."""
    return PatchcoreModel("resnet18", ["layer2", "layer3"], SIZE, pretrained=False,
                          **{"coreset_ratio": 0.25, "chunk_patches": 256, **settings})


def fit_tiny_patchcore(**settings: Any) -> PatchcoreModel:
    """`tiny_patchcore(**settings)` fitted on 11 noise images (704 patches)."""
    return tiny_patchcore(**settings).fit([images(6), images(5, seed=1)])


def model_metadata(data: bytes) -> dict[str, Any]:
    """The padim metadata of a model file's bytes, read without validating it."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(json.loads(data[8 : 8 + length])["__metadata__"]["padim"])


def rewrite_model_file(
    data: bytes, tensors: dict[str, torch.Tensor] | None = None, drop: tuple[str, ...] = (), **changes: Any
) -> bytes:
    """The model file `data` with metadata `changes`, `drop`ped metadata keys and `tensors` replaced."""
    from safetensors.torch import load, save

    meta = {key: value for key, value in model_metadata(data).items() if key not in drop}
    meta.update(changes)
    return save({**load(data), **(tensors or {})}, metadata={"padim": json.dumps(meta)})
