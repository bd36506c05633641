"""PadimModel: fit a per-location Gaussian on normal images, score new ones, save and load."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from padim_core import __version__
from padim_core.acceleration import optimize_for_inference, resolve_device
from padim_core.anomaly_map import AnomalyScorer
from padim_core.backbones import get_backbone
from padim_core.features import PatchEmbedder, random_channel_index
from padim_core.gaussian import GaussianAccumulator
from padim_core.images import ImageTransform

MODEL_FORMAT = "padim-model"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A file that is not a usable padim model."""


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    height, width = (int(s) for s in size)
    return (height, width)


class PadimModel:
    """PaDiM (Defard et al., 2021) for one product category.

    Learned state - the channel index, the per-location mean and inverse covariance, the
    threshold - is explicit and saved with everything needed to rebuild the model.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] | None = None,
        n_features: int = 100,
        image_size: int | Sequence[int] = 256,
        *,
        seed: int = 0,
        regularization: float = 0.01,
        blur_sigma: float = 4.0,
        pretrained: bool = True,
        device: str | torch.device | None = None,
        channel_index: torch.Tensor | None = None,
    ) -> None:
        spec = get_backbone(backbone)
        self.backbone = backbone
        self.layers = spec.validate_layers(layers or spec.default_layers)
        self.embedding_size = spec.embedding_size(self.layers)
        if channel_index is None:
            channel_index = random_channel_index(self.embedding_size, n_features, seed)
        self.channel_index = torch.as_tensor(channel_index, dtype=torch.long)
        self.n_features = int(self.channel_index.numel())
        self.image_size = _pair(image_size)
        self.seed = seed
        self.regularization = regularization
        self.blur_sigma = blur_sigma
        self.pretrained = pretrained
        self.normalization = {"mean": list(spec.mean), "std": list(spec.std)}
        self.device = resolve_device(device)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # a random-init backbone is rebuilt identically from the seed
            embedder = PatchEmbedder(backbone, self.layers, self.channel_index, pretrained=pretrained)
        self.embedder = embedder.to(self.device)
        self.transform = ImageTransform(self.image_size, spec.mean, spec.std)
        self.mean: torch.Tensor | None = None
        self.inv_covariance: torch.Tensor | None = None
        self.grid_shape: tuple[int, int] | None = None
        self.n_train = 0
        self.threshold: float | None = None
        self.score_stats: dict[str, float] = {}
        self._fast_embedder = None
        self._fast_scorer = None

    # ------------------------------------------------------------------ fitting
    @property
    def is_fitted(self) -> bool:
        return self.mean is not None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings `[h, w, B, n_features]` of normalised images `[B, 3, H, W]`."""
        images = self._check_images(images)
        if self._fast_embedder is None:
            self._fast_embedder = optimize_for_inference(self.embedder, images)
        with torch.inference_mode():
            return self._fast_embedder(images)

    def accumulate(self, batches: Iterable[torch.Tensor], into: GaussianAccumulator | None = None) -> GaussianAccumulator:
        """Stream image batches into a Gaussian accumulator (mergeable across workers)."""
        accumulator = into
        for batch in batches:
            embedding = self.embed(batch)
            height, width, batch, channels = embedding.shape
            if accumulator is None:
                accumulator = GaussianAccumulator.empty(height * width, channels, device=embedding.device)
                self.grid_shape = (height, width)
            accumulator.update(embedding.reshape(height * width, batch, channels))
        if accumulator is None:
            raise ValueError("fit needs at least one batch of training images, got none")
        return accumulator

    def fit_accumulator(self, accumulator: GaussianAccumulator, grid_shape: tuple[int, int]) -> "PadimModel":
        """Finalise the Gaussians from (possibly merged) running sums."""
        if grid_shape[0] * grid_shape[1] != accumulator.locations:
            raise ValueError(f"grid {grid_shape} does not match {accumulator.locations} accumulated locations")
        mean, inv_covariance = accumulator.finalize(self.regularization)
        self._set_gaussian(mean, inv_covariance, tuple(grid_shape))
        self.n_train = accumulator.count
        return self

    def fit(self, batches: Iterable[torch.Tensor]) -> "PadimModel":
        """Fit on an iterable of normalised image batches `[B, 3, H, W]`; returns the model."""
        accumulator = self.accumulate(batches)
        return self.fit_accumulator(accumulator, self.grid_shape)

    def _set_gaussian(self, mean: torch.Tensor, inv_covariance: torch.Tensor, grid_shape: tuple[int, int]) -> None:
        self.mean = mean.to(self.device)
        self.inv_covariance = inv_covariance.to(self.device)
        self.grid_shape = grid_shape
        self._fast_scorer = None

    # --------------------------------------------------------------- prediction
    def predict(self, images: torch.Tensor | Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores `[B]` and anomaly maps `[B, H, W]` (float32, on the CPU).

        `images` is a normalised batch `[B, 3, H, W]`, or a sequence of paths, bytes, PIL images
        or arrays that are decoded and transformed first.
        """
        if not self.is_fitted:
            raise RuntimeError("this PadimModel is not fitted yet: call fit() or PadimModel.load()")
        if not isinstance(images, torch.Tensor):
            images = torch.stack([self.transform(image) for image in images])
        images = self._check_images(images)
        if self._fast_scorer is None:
            scorer = _PadimScorer(self.embedder, self._anomaly_scorer()).to(self.device)
            self._fast_scorer = optimize_for_inference(scorer, images)
        with torch.inference_mode():
            scores, maps = self._fast_scorer(images)
        return scores.float().cpu(), maps.float().cpu()

    def predict_one(self, image: Any) -> tuple[float, np.ndarray]:
        """Score one image (path, bytes, PIL image or array): `(score, heatmap [H, W])`."""
        scores, maps = self.predict([image])
        return float(scores[0]), maps[0].numpy()

    def is_anomalous(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise RuntimeError("no threshold calibrated for this model: call calibrate() first")
        return np.asarray(scores) > self.threshold

    def calibrate(self, threshold: float, **score_stats: float) -> "PadimModel":
        """Set the decision threshold (anomalous means score > threshold) and score statistics."""
        self.threshold = float(threshold)
        self.score_stats.update({key: float(value) for key, value in score_stats.items()})
        return self

    def _anomaly_scorer(self) -> AnomalyScorer:
        return AnomalyScorer(self.mean, self.inv_covariance, self.grid_shape, self.image_size, self.blur_sigma)

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.image_size:
            raise ValueError(
                f"expected images of shape [B, 3, {self.image_size[0]}, {self.image_size[1]}], "
                f"got {list(images.shape)}"
            )
        return images.to(self.device, non_blocking=True)

    # ------------------------------------------------------------- persistence
    def metadata(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "format_version": FORMAT_VERSION,
            "padim_version": __version__,
            "torch_version": torch.__version__,
            "backbone": self.backbone,
            "layers": list(self.layers),
            "pretrained": self.pretrained,
            "n_features": self.n_features,
            "embedding_size": self.embedding_size,
            "image_size": list(self.image_size),
            "grid_shape": list(self.grid_shape) if self.grid_shape else None,
            "normalization": self.normalization,
            "seed": self.seed,
            "regularization": self.regularization,
            "blur_sigma": self.blur_sigma,
            "n_train": self.n_train,
            "threshold": self.threshold,
            "score_stats": self.score_stats,
        }

    def save(self, path: str | Path) -> Path:
        """Write the model as one safetensors file, atomically (no half-written file on failure)."""
        if not self.is_fitted:
            raise RuntimeError("cannot save an unfitted PadimModel")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "mean": self.mean.detach().float().cpu().contiguous(),
            "inv_covariance": self.inv_covariance.detach().float().cpu().contiguous(),
            "channel_index": self.channel_index.cpu().contiguous(),
        }
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        try:
            save_file(tensors, temporary, metadata={"padim": json.dumps(self.metadata())})
            os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp's 0600 would hide it from other users
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> "PadimModel":
        """Load and validate a model file written by `save`."""
        path = Path(path)
        tensors, meta = _read_model_file(path)
        try:
            model = cls(
                backbone=meta["backbone"],
                layers=meta["layers"],
                image_size=meta["image_size"],
                seed=meta["seed"],
                regularization=meta["regularization"],
                blur_sigma=meta["blur_sigma"],
                pretrained=meta["pretrained"],
                device=device,
                channel_index=tensors["channel_index"],
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ModelFileError(f"{path}: metadata does not describe a usable model ({error})") from error
        _check_layout(path, tensors, meta, model.embedding_size)
        model._set_gaussian(tensors["mean"], tensors["inv_covariance"], tuple(meta["grid_shape"]))
        model.n_train = int(meta["n_train"])
        model.threshold = meta["threshold"]
        model.score_stats = dict(meta["score_stats"])
        return model


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _PadimScorer(torch.nn.Module):
    """Images -> (scores, maps) as one module, so the whole path can be traced and frozen."""

    def __init__(self, embedder: PatchEmbedder, scorer: AnomalyScorer) -> None:
        super().__init__()
        self.embedder = embedder
        self.scorer = scorer

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scorer(self.embedder(images))


_REQUIRED_KEYS = (
    "format_version", "backbone", "layers", "pretrained", "n_features", "image_size", "grid_shape",
    "normalization", "seed", "regularization", "blur_sigma", "n_train", "threshold", "score_stats",
)


def _read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path}: not a readable safetensors file ({error}); is it truncated?") from error
    try:
        meta = json.loads(header["padim"])
    except (KeyError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path}: a safetensors file, but not a padim model (no 'padim' metadata)") from error
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path}: metadata format is {meta.get('format') if isinstance(meta, dict) else meta!r}, expected {MODEL_FORMAT!r}")
    missing = [key for key in _REQUIRED_KEYS if key not in meta]
    if missing:
        raise ModelFileError(f"{path}: padim metadata lacks {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {meta['format_version']}, this padim reads version {FORMAT_VERSION}"
        )
    absent = {"mean", "inv_covariance", "channel_index"} - set(tensors)
    if absent:
        raise ModelFileError(f"{path}: missing tensors {sorted(absent)}")
    return tensors, meta


def _check_layout(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], embedding_size: int) -> None:
    mean, inverse, index = tensors["mean"], tensors["inv_covariance"], tensors["channel_index"]
    height, width = meta["grid_shape"]
    locations, channels = height * width, meta["n_features"]
    expected = {"mean": (locations, channels), "inv_covariance": (locations, channels, channels), "channel_index": (channels,)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelFileError(
                f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                f"for grid {height}x{width} and {channels} features"
            )
    if mean.dtype != torch.float32 or inverse.dtype != torch.float32:
        raise ModelFileError(f"{path}: mean and inv_covariance must be float32, got {mean.dtype}, {inverse.dtype}")
    if int(index.max()) >= embedding_size:
        raise ModelFileError(f"{path}: channel index exceeds the embedding size {embedding_size} of {meta['layers']}")
    if not torch.isfinite(inverse).all() or not torch.isfinite(mean).all():
        raise ModelFileError(f"{path}: mean or inv_covariance holds NaN or infinity")
