"""What every detector is, and the registry that finds a detector class by its kind name.

A detector learns what normal looks like from a stream of image batches (`fit`), scores new
images (`predict`: image scores and anomaly maps), decides with a calibrated threshold, and
saves itself to one safetensors file (`save`, `to_bytes`) that `load` reads back from a path or
from bytes. Everything outside `padim_core` uses this interface and `load_detector`, never a
concrete class, so a new kind needs a module here and one line in `KINDS`.

Settings (hyper-parameters) are plain attributes set in `__init__`; what `fit` learns carries a
trailing underscore (`threshold_`, `grid_shape_`), as in scikit-learn.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from padim_core import __version__
from padim_core.acceleration import optimize_for_inference, resolve_device
from padim_core.augmentation import PhotometricAugmentation
from padim_core.backbones import FeatureExtractor, get_backbone
from padim_core.calibration import Calibration
from padim_core.errors import ModelFileError
from padim_core.images import ImageSource, ImageTransform
from padim_core.model_file import (
    MAX_IMAGE_SIDE,
    ModelFile,
    ModelSource,
    encode_model,
    read_model_file,
    write_model_file,
)

KINDS: dict[str, str] = {
    "padim": "padim_core.padim:PadimModel",
    "patchcore": "padim_core.patchcore:PatchcoreModel",
}
"""Detector kind -> `module:class`; imported on first use, so loading one kind never imports the others."""


def detector_class(kind: str) -> type[Detector]:
    """The class registered for `kind`."""
    if kind not in KINDS:
        raise ModelFileError(f"unknown detector kind {kind!r}; known kinds: {sorted(KINDS)}")
    module, name = KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def load_detector(source: ModelSource, device: str | torch.device | None = None) -> Detector:
    """Any detector from its model file (a path or the file's bytes), by the kind the file names."""
    return Detector.load(source, device)


def image_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """`size` as (height, width); one integer means a square."""
    sides = [size, size] if isinstance(size, (int, np.integer)) else list(size) if isinstance(size, (list, tuple)) else []
    if len(sides) != 2 or not all(isinstance(side, (int, np.integer)) and not isinstance(side, bool)
                                  and 0 < side <= MAX_IMAGE_SIDE for side in sides):
        raise ValueError(f"image_size must be an integer or [height, width] of integers from 1 to {MAX_IMAGE_SIDE}, got {size!r}")
    return int(sides[0]), int(sides[1])


class Detector(ABC):
    """The interface every detector kind implements; shared machinery lives here."""

    kind: ClassVar[str]
    min_fit_images: ClassVar[int] = 1  # fewer normal images than this cannot be fitted

    def __init__(self, backbone: str, layers: Sequence[str] | None, image_size: int | Sequence[int], blur_sigma: float,
                 pretrained: bool, device: str | torch.device | None,
                 augmentation: PhotometricAugmentation | Mapping[str, Any] | None = None) -> None:
        """The settings every kind shares; each kind's own `__init__` gives their defaults.

        `augmentation` (a `PhotometricAugmentation`, its mapping, or None for none) changes only
        what `fit` sees: the fit's batches then must be uint8 pixels."""
        spec = get_backbone(backbone)
        self.backbone = backbone
        self.layers = spec.validate_layers(layers or spec.default_layers[self.kind])
        self.image_size = image_pair(image_size)
        deepest = max(spec.layer_strides[layer] for layer in self.layers)
        if min(self.image_size) < deepest:
            raise ValueError(f"image_size {list(self.image_size)} is smaller than the stride {deepest} of layer {self.layers[-1]}")
        if isinstance(blur_sigma, bool) or not isinstance(blur_sigma, (int, float)) or not math.isfinite(blur_sigma) or blur_sigma < 0:
            raise ValueError(f"blur_sigma must be a finite number >= 0, got {blur_sigma!r}")
        self.blur_sigma = float(blur_sigma)
        self.augmentation = (augmentation if isinstance(augmentation, PhotometricAugmentation)
                             else PhotometricAugmentation.from_dict(augmentation))
        self.pretrained = pretrained
        self.normalization = {"mean": list(spec.mean), "std": list(spec.std)}
        self.device = resolve_device(device)
        self.transform = ImageTransform(self.image_size, spec.mean, spec.std)
        self.grid_shape_: tuple[int, int] | None = None
        self.n_train_ = 0
        self.calibration_: Calibration | None = None
        self.score_stats_: dict[str, float] = {}
        self._optimized: dict[str, Callable[[torch.Tensor], Any]] = {}

    # ------------------------------------------------------------ what a kind implements
    @abstractmethod
    def fit(self, batches: Iterable[torch.Tensor]) -> Detector:
        """Learn from batches of normal images (uint8 pixels or normalised, `[B, 3, H, W]`); returns self."""

    @abstractmethod
    def update(self, batches: Iterable[torch.Tensor], statistics: Any = None) -> Detector:
        """Add new normal images to a fitted detector (PaDiM also needs the statistics of its fit)."""

    @abstractmethod
    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images `[B, 3, H, W]` on the device -> (image scores `[B]`, maps `[B, H, W]`)."""

    @abstractmethod
    def _settings(self) -> dict[str, Any]:
        """The kind's own hyper-parameters, as JSON values (the model file's `settings`)."""

    @abstractmethod
    def _state(self) -> dict[str, torch.Tensor]:
        """The learned tensors, as saved."""

    @classmethod
    @abstractmethod
    def _from_file(cls, file: ModelFile, common: dict[str, Any], device: torch.device | None) -> Detector:
        """A fitted detector from a validated file; `common` holds the constructor's shared arguments."""

    # ----------------------------------------------------------------- shared machinery
    @property
    def is_fitted(self) -> bool:
        return self.grid_shape_ is not None

    @property
    def threshold_(self) -> float | None:
        return None if self.calibration_ is None else self.calibration_.threshold

    def feature_extractor(self, seed: int = 0) -> FeatureExtractor:
        """The backbone cut at the deepest layer; a random-init one is seeded so it rebuilds identically."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return FeatureExtractor(self.backbone, self.layers, pretrained=self.pretrained)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float32 images on the model's device: uint8 pixels are normalised here."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.image_size:
            raise ValueError(
                f"expected images of shape [B, 3, {self.image_size[0]}, {self.image_size[1]}], got {list(images.shape)}"
            )
        if images.dtype == torch.uint8:
            images = self.transform.normalize(images)
        return images.to(self.device, non_blocking=True)

    def run_optimized(self, name: str, build: Callable[[], nn.Module], images: torch.Tensor) -> Any:
        """`build()`'s module applied to `images`, traced and frozen once per name (see `acceleration`);
        rebuilt after `forget_optimized`."""
        if name not in self._optimized:
            self._optimized[name] = optimize_for_inference(build().to(self.device), images)
        with torch.inference_mode():
            return self._optimized[name](images)

    def forget_optimized(self) -> None:
        """Drop traced modules after the learned state changed."""
        self._optimized.clear()

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores `[B]` and anomaly maps `[B, H, W]` (float32, on the CPU) of an image batch
        (uint8 pixels or normalised float32, `[B, 3, H, W]` at `image_size`)."""
        if not self.is_fitted:
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call fit() or load a model file")
        with torch.inference_mode():
            scores, maps = self._forward(self.prepare(images))
        return scores.float().cpu(), maps.float().cpu()

    def predict_one(self, image: ImageSource) -> tuple[float, np.ndarray]:
        """Score one image (path, bytes, PIL image or array): `(score, heatmap [H, W])`."""
        scores, maps = self.predict(self.transform.to_pixels(image)[None])
        return float(scores[0]), maps[0].numpy()

    def calibrate(self, calibration: Calibration, **score_stats: float) -> Detector:
        """Set the decision rule (anomalous: score > threshold) and score statistics (e.g. map range)."""
        self.calibration_ = calibration
        self.score_stats_.update({key: float(value) for key, value in score_stats.items()})
        return self

    def is_anomalous(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        if self.calibration_ is None:
            raise RuntimeError("this model has no calibrated threshold: call calibrate() first")
        return self.calibration_.is_anomalous(scores)

    # ------------------------------------------------------------------ persistence
    def metadata(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "padim_version": __version__,
            "torch_version": torch.__version__,
            "backbone": self.backbone,
            "layers": list(self.layers),
            "pretrained": self.pretrained,
            "image_size": list(self.image_size),
            "grid_shape": list(self.grid_shape_) if self.grid_shape_ else None,
            "normalization": self.normalization,
            "blur_sigma": self.blur_sigma,
            "settings": {**self._settings(), "augmentation": self.augmentation.to_dict()},
            "n_train": self.n_train_,
            "calibration": None if self.calibration_ is None else self.calibration_.to_dict(),
            "score_stats": self.score_stats_,
        }

    def to_bytes(self) -> bytes:
        """The model file's content (what `save` writes)."""
        self._require_fitted("save")
        return encode_model(self._state(), self.metadata())

    def save(self, path: str | Path) -> Path:
        """Write the model as one safetensors file, atomically."""
        self._require_fitted("save")
        return write_model_file(path, self._state(), self.metadata())

    @classmethod
    def load(cls, source: ModelSource, device: str | torch.device | None = None) -> Detector:
        """Load and validate a model file (a path or its bytes). Called on a concrete class,
        the file must hold that kind."""
        file = read_model_file(source)
        kind_class = detector_class(file.kind)
        if cls is not Detector and kind_class is not cls:
            raise ModelFileError(f"{file.where} holds a {file.kind} model, not {cls.kind}")
        meta = file.metadata
        try:
            common = {
                "backbone": meta["backbone"], "layers": meta["layers"], "image_size": meta["image_size"],
                "blur_sigma": meta["blur_sigma"], "pretrained": meta["pretrained"], "device": device,
                "augmentation": PhotometricAugmentation.from_dict(meta["settings"].get("augmentation")),
            }
            detector = kind_class._from_file(file, common, device)
        except (KeyError, TypeError, ValueError) as error:
            raise ModelFileError(f"{file.where}: settings do not describe a usable {file.kind} model ({error})") from None
        detector.grid_shape_ = tuple(meta["grid_shape"])
        detector.n_train_ = meta["n_train"]
        detector.calibration_ = file.calibration
        detector.score_stats_ = dict(meta["score_stats"])
        return detector

    def _require_fitted(self, action: str) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"cannot {action} an unfitted {type(self).__name__}")
