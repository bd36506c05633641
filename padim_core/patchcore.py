"""PatchCore (Roth et al., CVPR 2022): a coreset of normal patch features, and nearest-neighbour distances.

Locally aware patch features: each chosen layer's map is averaged over the 3x3 neighbourhood of
every cell, deeper layers are resized (bilinear) to the first layer's grid, and the maps are
concatenated. Fitting keeps a greedy k-center coreset of the normal patches as the memory bank
(`coreset`, streamed in bounded memory). A test patch's score is the distance to its nearest bank
patch; the map is those distances upsampled and blurred like PaDiM's; the image score is the
largest patch score re-weighted by how isolated its nearest bank patch is (the paper's eq. 7).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from padim_core.anomaly_map import MapResizer
from padim_core.augmentation import PhotometricAugmentation
from padim_core.backbones import FeatureExtractor
from padim_core.coreset import DEFAULT_CHUNK_PATCHES, DEFAULT_PROJECTION_DIM, StreamingCoreset
from padim_core.detector import Detector
from padim_core.model_file import ModelFile, check_tensor
from padim_core.nearest import nearest, squared_norms

BANK_DTYPE = torch.float16
"""The memory bank's values: float16, half the model file of float32 with the same image and
pixel AUROC (measured by `bench.bench_patchcore`). The bank is rounded when it is set, not when
it is saved, so a fitted model and its reloaded file score identically; it is held as float32
for the distance computations."""


class LocallyAwareEmbedder(nn.Module):
    """Images `[B, 3, H, W]` -> patch features `[B, C, h, w]` on the first layer's grid."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = [F.avg_pool2d(feature, 3, stride=1, padding=1) for feature in self.extractor(images)]
        size = features[0].shape[-2:]
        resized = [features[0], *(F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features[1:])]
        return torch.cat(resized, dim=1)


class PatchcoreModel(Detector):
    """PatchCore for one product category.

    Settings: the backbone and layers, `coreset_ratio` of the training patches kept in the bank
    (greedy k-center in a `projection_dim` random projection, `chunk_patches` at a time, seeded by
    `seed`), `num_neighbors` for the image score's re-weighting, fit-time `augmentation` (the
    coreset then keeps `coreset_ratio` of the original patches' count out of all the augmented
    ones, so the bank is no larger). Learned: `memory_bank_` (values of `BANK_DTYPE`, held as float32).
    """

    kind = "patchcore"

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] | None = None,
        image_size: int | Sequence[int] = 256,
        *,
        coreset_ratio: float = 0.1,
        num_neighbors: int = 9,
        seed: int = 0,
        projection_dim: int = DEFAULT_PROJECTION_DIM,
        chunk_patches: int = DEFAULT_CHUNK_PATCHES,
        blur_sigma: float = 4.0,
        pretrained: bool = True,
        augmentation: PhotometricAugmentation | dict[str, Any] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(backbone, layers, image_size, blur_sigma, pretrained, device, augmentation)
        if isinstance(coreset_ratio, bool) or not isinstance(coreset_ratio, (int, float)) or not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio!r}")
        if isinstance(num_neighbors, bool) or not isinstance(num_neighbors, int) or num_neighbors < 1:
            raise ValueError(f"num_neighbors must be an integer >= 1, got {num_neighbors!r}")
        for name, value in (("projection_dim", projection_dim), ("chunk_patches", chunk_patches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.coreset_ratio = float(coreset_ratio)
        self.num_neighbors = num_neighbors
        self.seed = seed
        self.projection_dim = projection_dim
        self.chunk_patches = chunk_patches
        extractor = self.feature_extractor(seed)
        self.embedding_size = sum(extractor.channels)
        self.embedder = LocallyAwareEmbedder(extractor).to(self.device)
        self.memory_bank_: torch.Tensor | None = None
        self._bank_norms: torch.Tensor | None = None
        self._resizer: MapResizer | None = None

    # ------------------------------------------------------------------ fitting
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features `[B, C, h, w]` of an image batch."""
        return self.run_optimized("embedder", lambda: self.embedder, self.prepare(images))

    def new_coreset(self) -> StreamingCoreset:
        """An empty coreset with this model's settings (shards and updates fill their own)."""
        ratio = self.coreset_ratio / self.augmentation.images_per_source
        return StreamingCoreset(self.embedding_size, ratio, self.seed, self.chunk_patches, self.projection_dim)

    def accumulate(self, batches: Iterable[torch.Tensor], into: StreamingCoreset | None = None,
                   first: int = 0) -> tuple[StreamingCoreset, tuple[int, int]]:
        """Stream image batches (and their augmented copies; `first`: the index of the first image
        among all the training images) into a coreset; returns it with the patch grid's shape."""
        coreset = into or self.new_coreset()
        grid = None
        for batch in self.augmentation.expand(batches, first):
            features = self.embed(batch)
            grid = tuple(features.shape[-2:])
            coreset.add(features.permute(0, 2, 3, 1).reshape(-1, self.embedding_size))
        if grid is None:
            raise ValueError("fit needs at least one batch of training images, got none")
        return coreset, grid

    def fit(self, batches: Iterable[torch.Tensor]) -> PatchcoreModel:
        coreset, grid = self.accumulate(batches)
        patches_per_image = grid[0] * grid[1] * self.augmentation.images_per_source
        return self.set_memory_bank(coreset.bank(), grid, coreset.seen // patches_per_image)

    def update(self, batches: Iterable[torch.Tensor], statistics: None = None) -> PatchcoreModel:
        """Add new normal images: the coreset of their patches, made by the same streaming method
        as the fit, joins the bank. Approximate: a refit would choose its coreset among all the
        patches at once (the README measures how close the two come)."""
        coreset, grid = self.accumulate(batches, first=self.n_train_)
        if grid != self.grid_shape_:
            raise ValueError(f"new images give a {list(grid)} patch grid, the model has {list(self.grid_shape_)}")
        added = coreset.seen // (grid[0] * grid[1] * self.augmentation.images_per_source)
        return self.set_memory_bank(torch.cat([self.memory_bank_.float().cpu(), coreset.bank()]), grid, self.n_train_ + added)

    def set_memory_bank(self, bank: torch.Tensor, grid_shape: tuple[int, int], n_train: int) -> PatchcoreModel:
        """Use `bank [M, C]` (rounded to `BANK_DTYPE`) as the memory bank of a `grid_shape` patch
        grid fitted on `n_train` images."""
        if bank.ndim != 2 or bank.shape[1] != self.embedding_size:
            raise ValueError(f"memory bank must be [M, {self.embedding_size}], got {list(bank.shape)}")
        if bank.shape[0] < self.num_neighbors:
            raise ValueError(f"num_neighbors {self.num_neighbors} is larger than the memory bank ({bank.shape[0]} patches); "
                             "lower num_neighbors or raise coreset_ratio")
        rounded = bank.to(BANK_DTYPE)
        if not torch.isfinite(rounded).all():
            raise ValueError(f"memory bank holds NaN, infinity or values beyond {BANK_DTYPE}'s range "
                             f"(largest magnitude {float(bank.abs().max()):.4g})")
        self.memory_bank_ = rounded.float().to(self.device)
        self._bank_norms = squared_norms(self.memory_bank_)
        self.grid_shape_ = tuple(grid_shape)
        self.n_train_ = n_train
        self._resizer = MapResizer(self.grid_shape_, self.image_size, self.blur_sigma).to(self.device)
        return self

    # --------------------------------------------------------------- prediction
    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(images)
        batch, channels, height, width = features.shape
        patches = features.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
        distances, locations = nearest(patches, self.memory_bank_, 1, self._bank_norms)
        patch_scores = distances.reshape(batch, height * width)
        maps = self._resizer(patch_scores.reshape(batch, height, width))[1]
        scores = self._image_scores(patches.reshape(batch, height * width, channels), patch_scores,
                                    locations.reshape(batch, height * width))
        return scores, maps

    def _image_scores(self, patches: torch.Tensor, patch_scores: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        """The largest patch score, re-weighted by the paper's eq. 7 (as anomalib does):
        `s = (1 - softmax(d)_0) * s*`, `d` the distances of the worst patch to the `num_neighbors`
        bank patches nearest its own nearest bank patch `m*` (itself first)."""
        rows = torch.arange(patch_scores.shape[0], device=patch_scores.device)
        worst = patch_scores.argmax(dim=1)
        score = patch_scores[rows, worst]
        if self.num_neighbors == 1:
            return score
        worst_patch = patches[rows, worst]
        anchor = self.memory_bank_[locations[rows, worst]]
        _, support = nearest(anchor, self.memory_bank_, self.num_neighbors, self._bank_norms)
        distances = torch.linalg.vector_norm(self.memory_bank_[support] - worst_patch[:, None], dim=2)
        return (1 - torch.softmax(distances, dim=1)[:, 0]) * score

    # ------------------------------------------------------------------ persistence
    def _settings(self) -> dict[str, Any]:
        return {
            "coreset_ratio": self.coreset_ratio, "num_neighbors": self.num_neighbors, "seed": self.seed,
            "projection_dim": self.projection_dim, "chunk_patches": self.chunk_patches,
            "embedding_size": self.embedding_size,
        }

    def _state(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank_.to(BANK_DTYPE)}

    @classmethod
    def _from_file(cls, file: ModelFile, common: dict[str, Any], device: torch.device | None) -> PatchcoreModel:
        settings = file.metadata["settings"]
        model = cls(
            **common, coreset_ratio=settings["coreset_ratio"], num_neighbors=settings["num_neighbors"],
            seed=settings["seed"], projection_dim=settings["projection_dim"], chunk_patches=settings["chunk_patches"],
        )
        if settings["embedding_size"] != model.embedding_size:
            raise ValueError(f"embedding_size {settings['embedding_size']} but layers {list(model.layers)} give {model.embedding_size}")
        bank = file.tensors.get("memory_bank")
        rows = bank.shape[0] if bank is not None and bank.ndim == 2 else 0
        bank = check_tensor(file, "memory_bank", (rows, model.embedding_size), BANK_DTYPE)
        model.set_memory_bank(bank, tuple(file.metadata["grid_shape"]), file.metadata["n_train"])
        return model
