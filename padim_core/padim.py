"""PaDiM (Defard et al., ICPR 2021): a Gaussian per grid location over normal patch embeddings."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from padim_core.anomaly_map import MahalanobisScorer
from padim_core.augmentation import PhotometricAugmentation
from padim_core.backbones import get_backbone
from padim_core.detector import Detector
from padim_core.features import EMBEDDINGS, PatchEmbedder, random_channel_index, semi_orthogonal_matrix
from padim_core.gaussian import REGULARIZATION_SCALES, SHRINKAGE, GaussianAccumulator
from padim_core.model_file import ModelFile, check_tensor

DISTANCE_METRICS = ("mahalanobis",)


class PadimModel(Detector):
    """PaDiM for one product category.

    Settings: the backbone and layers; the `embedding` that reduces their concatenation to
    `n_features` dimensions (`random_subset`: channels chosen at random, as in the paper;
    `semi_orthogonal`: a random projection with orthonormal columns), both seeded by `seed`;
    how each covariance is regularised (`shrinkage`: none, oas or ledoit_wolf, then
    `regularization` on the diagonal, as is or times an average variance by
    `regularization_scale`: see `gaussian`); fit-time `augmentation`. The defaults are the paper's PaDiM; the
    config's defaults add what measurement chose (README, "Robustness to light and noise (issue 14)").
    Learned: `mean_` and `inv_covariance_` per location of the `grid_shape_` grid.
    """

    kind = "padim"
    min_fit_images = 2  # a covariance needs two embeddings per location

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] | None = None,
        n_features: int = 100,
        image_size: int | Sequence[int] = 256,
        *,
        seed: int = 0,
        regularization: float = 0.01,
        regularization_scale: str = "absolute",
        shrinkage: str = "none",
        embedding: str = "random_subset",
        distance_metric: str = "mahalanobis",
        blur_sigma: float = 4.0,
        pretrained: bool = True,
        augmentation: PhotometricAugmentation | dict[str, Any] | None = None,
        device: str | torch.device | None = None,
        channel_index: torch.Tensor | None = None,
        projection: torch.Tensor | None = None,
    ) -> None:
        super().__init__(backbone, layers, image_size, blur_sigma, pretrained, device, augmentation)
        for name, value, allowed in (("distance_metric", distance_metric, DISTANCE_METRICS), ("shrinkage", shrinkage, SHRINKAGE),
                                     ("regularization_scale", regularization_scale, REGULARIZATION_SCALES),
                                     ("embedding", embedding, EMBEDDINGS)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one PaDiM defines here; allowed: {list(allowed)}")
        if regularization < 0:
            raise ValueError(f"regularization must be >= 0, got {regularization}")
        self.embedding_size = get_backbone(backbone).embedding_size(self.layers)
        self.embedding = embedding
        if embedding == "semi_orthogonal":
            channel_index = torch.arange(self.embedding_size)
            if projection is None:
                projection = semi_orthogonal_matrix(self.embedding_size, n_features, seed)
            self.projection = torch.as_tensor(projection, dtype=torch.float32)
            self.n_features = int(self.projection.shape[1])
        else:
            if channel_index is None:
                channel_index = random_channel_index(self.embedding_size, n_features, seed)
            self.projection = None
            self.n_features = int(torch.as_tensor(channel_index).numel())
        self.channel_index = torch.as_tensor(channel_index, dtype=torch.long)
        self.seed = seed
        self.regularization = float(regularization)
        self.regularization_scale = regularization_scale
        self.shrinkage = shrinkage
        self.distance_metric = distance_metric
        self.embedder = PatchEmbedder(self.feature_extractor(seed), self.channel_index, self.projection).to(self.device)
        self.mean_: torch.Tensor | None = None
        self.inv_covariance_: torch.Tensor | None = None
        self._scorer: MahalanobisScorer | None = None

    # ------------------------------------------------------------------ fitting
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings `[h, w, B, n_features]` of an image batch."""
        return self.run_optimized("embedder", lambda: self.embedder, self.prepare(images))

    def accumulate(self, batches: Iterable[torch.Tensor], into: GaussianAccumulator | None = None,
                   first: int = 0) -> GaussianAccumulator:
        """Stream image batches (and their augmented copies; `first`: the index of the first image
        among all the training images) into a Gaussian accumulator (mergeable across workers by `+`)."""
        accumulator = into
        for batch in self.augmentation.expand(batches, first):
            embedding = self.embed(batch)
            height, width, count, channels = embedding.shape
            if accumulator is None:
                accumulator = GaussianAccumulator.empty((height, width), channels, device=embedding.device)
            accumulator.update(embedding.reshape(height * width, count, channels))
        if accumulator is None:
            raise ValueError("fit needs at least one batch of training images, got none")
        return accumulator

    def fit_accumulator(self, accumulator: GaussianAccumulator) -> PadimModel:
        """Finalise the Gaussians from (possibly merged) running sums."""
        mean, inv_covariance = accumulator.finalize(
            self.regularization, shrinkage=self.shrinkage, regularization_scale=self.regularization_scale)
        self._set_gaussian(mean, inv_covariance, accumulator.grid_shape)
        self.n_train_ = accumulator.count // self.augmentation.images_per_source
        return self

    def fit(self, batches: Iterable[torch.Tensor]) -> PadimModel:
        return self.fit_accumulator(self.accumulate(batches))

    def update(self, batches: Iterable[torch.Tensor], statistics: GaussianAccumulator | None = None) -> PadimModel:
        """Add new normal images to the running sums of an earlier fit (`statistics`, which grow in
        place) and finalise again: exactly the model a fit on all the images would give."""
        if statistics is None:
            raise ValueError("updating a PaDiM model needs the statistics of its fit (padim_core.statistics)")
        statistics += self.accumulate(batches, first=statistics.count // self.augmentation.images_per_source)  # summed on the model's device, merged where the statistics are
        return self.fit_accumulator(statistics)

    def _set_gaussian(self, mean: torch.Tensor, inv_covariance: torch.Tensor, grid_shape: tuple[int, int]) -> None:
        self.mean_ = mean.to(self.device)
        self.inv_covariance_ = inv_covariance.to(self.device)
        self.grid_shape_ = tuple(grid_shape)
        self._scorer: MahalanobisScorer | None = None

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The traced embedder (shared with fitting), then the distances and maps: a few large
        batched products that gain nothing from tracing."""
        if self._scorer is None:
            self._scorer = MahalanobisScorer(self.mean_, self.inv_covariance_, self.grid_shape_, self.image_size, self.blur_sigma)
        return self._scorer(self.embed(images))

    # ------------------------------------------------------------------ persistence
    def _settings(self) -> dict[str, Any]:
        return {
            "n_features": self.n_features, "embedding_size": self.embedding_size, "embedding": self.embedding,
            "seed": self.seed, "regularization": self.regularization, "regularization_scale": self.regularization_scale,
            "shrinkage": self.shrinkage, "distance_metric": self.distance_metric,
        }

    def _state(self) -> dict[str, torch.Tensor]:
        reduction = {"projection": self.projection} if self.embedding == "semi_orthogonal" else {"channel_index": self.channel_index}
        return {"mean": self.mean_.float(), "inv_covariance": self.inv_covariance_.float(), **reduction}

    @classmethod
    def _from_file(cls, file: ModelFile, common: dict[str, Any], device: torch.device | None) -> PadimModel:
        settings = file.metadata["settings"]
        channels = settings["n_features"]
        # Files written before the robustness options hold the paper's PaDiM: these defaults.
        embedding = settings.get("embedding", "random_subset")
        if embedding == "semi_orthogonal":
            reduction = {"projection": check_tensor(file, "projection", (settings["embedding_size"], channels), torch.float32)}
        else:
            reduction = {"channel_index": check_tensor(file, "channel_index", (channels,), torch.int64)}
        model = cls(
            **common, n_features=channels, seed=settings["seed"], regularization=settings["regularization"],
            regularization_scale=settings.get("regularization_scale", "absolute"),
            shrinkage=settings.get("shrinkage", "none"), embedding=embedding,
            distance_metric=settings["distance_metric"], **reduction,
        )
        if settings["embedding_size"] != model.embedding_size:
            raise ValueError(f"embedding_size {settings['embedding_size']} but layers {list(model.layers)} give {model.embedding_size}")
        height, width = file.metadata["grid_shape"]
        mean = check_tensor(file, "mean", (height * width, channels), torch.float32)
        inverse = check_tensor(file, "inv_covariance", (height * width, channels, channels), torch.float32)
        model._set_gaussian(mean, inverse, (height, width))
        return model
