"""The jobs' config sections, on top of the detectors' (`padim_core.config`).

`tasks` sizes the Ray task of every per-category job (fit, shift, and what comes next);
`fit`, `scoring` and `drift` hold what only those jobs read; `tracking` says where MLflow runs go.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from padim_core.config import (
    ExperimentConfig,
    Section,
    check_bool,
    check_float,
    check_int,
    check_str,
    config_from_dict,
    read_values,
)
from padim_core.drift import (
    DEFAULT_ALPHA,
    DEFAULT_DEFECT_SHARE,
    DEFAULT_DRAWS,
    DEFAULT_MIN_IMAGES,
    DEFAULT_TRIM,
    DriftTest,
    drift_test,
)
from padim_core.errors import ConfigError

# MLflow's rules for registered-model aliases (mlflow.utils.validation): "latest" and "v<N>"
# are reserved because `models:/name@alias` URIs would clash with version references.
_ALIAS_PATTERN = re.compile(r"^[\w\-]{1,255}$")
_VERSION_ALIAS = re.compile(r"^[vV]\d+$")


def check_gpus(key: str, value: Any) -> str | float:
    """Ray's rule: fractional GPUs only below one (0.25 shares a GPU; 1.5 is rejected)."""
    if value == "auto":
        return value
    allowed = "'auto', or a number >= 0 (whole numbers above 1, as Ray requires)"
    if isinstance(value, str):
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {allowed}")
    return check_float(key, value, allowed, lambda v: v >= 0 and (v <= 1 or float(v).is_integer()))


@dataclass(frozen=True)
class TasksConfig(Section):
    """The Ray task of each (category, detector) in the per-category jobs (fit, shift)."""

    section: ClassVar[str] = "tasks"

    device: str = "auto"
    num_gpus: str | float = "auto"  # per task; "auto": 1 when the cluster has GPUs, else 0
    num_cpus: float = 1.0
    max_retries: int = 2  # Ray retries of a task whose worker died

    def __post_init__(self) -> None:
        self._check("device", check_str, ("auto", "cpu", "cuda"))
        self._check("num_gpus", check_gpus)
        if self.device == "cuda" and self.num_gpus == 0:
            raise ConfigError(
                "tasks.num_gpus: 0 with tasks.device 'cuda' leaves the Ray task without a GPU; "
                "allowed: 'auto' or a number > 0, or set tasks.device to 'auto' or 'cpu'"
            )
        self._check("num_cpus", check_float, ">= 0", lambda v: v >= 0)
        self._check("max_retries", check_int, 0)


@dataclass(frozen=True)
class FitConfig(Section):
    """jobs.fit: how a category is spread over Ray tasks, what each fit keeps and logs besides its metrics."""

    section: ClassVar[str] = "fit"

    heatmap_examples: int = 4  # test heatmaps logged per category
    keep_statistics: bool = True  # write PaDiM's running sums beside the model, so padim-update can add images
    shards: str | int = "auto"  # Ray tasks per category; auto: one per jobs.fit.shards.SHARD_IMAGES fit images

    def __post_init__(self) -> None:
        self._check("heatmap_examples", check_int, 0)
        self._check("keep_statistics", check_bool)
        if self.shards != "auto":
            if isinstance(self.shards, str):
                raise ConfigError(f"fit.shards: {self.shards!r} is not allowed; allowed: 'auto', or an integer >= 1")
            self._check("shards", check_int, 1)


@dataclass(frozen=True)
class UpdateConfig(Section):
    """jobs.update: when a model grown with new normal images replaces the one it grew from."""

    section: ClassVar[str] = "update"

    max_auroc_drop: float = 0.01  # the alias moves when the new image AUROC >= the old one minus this

    def __post_init__(self) -> None:
        self._check("max_auroc_drop", check_float, "0 <= drop <= 1", lambda v: 0 <= v <= 1)


@dataclass(frozen=True)
class ScoringConfig(Section):
    """jobs.score: the Ray Data actor pool and what each score row carries."""

    section: ClassVar[str] = "scoring"

    batch_size: int = 32
    actors: int = 1
    num_gpus: str | float = "auto"  # per actor
    map_columns: bool = False  # add a downsampled anomaly map to every row
    map_size: int = 32  # side of that map
    heatmaps_above_threshold: bool = False  # write overlays for images flagged anomalous

    def __post_init__(self) -> None:
        self._check("batch_size", check_int, 1)
        self._check("actors", check_int, 1)
        self._check("num_gpus", check_gpus)
        self._check("map_columns", check_bool)
        self._check("map_size", check_int, 1)
        self._check("heatmaps_above_threshold", check_bool)


@dataclass(frozen=True)
class DriftConfig(Section):
    """jobs.score's drift alarm (`padim_core.drift`): a test of whether the scored images still
    look like the calibration images, per category and job (and per input when there are several)."""

    section: ClassVar[str] = "drift"

    trim: float = DEFAULT_TRIM  # share of the smallest p-values left out of the statistic (where defects land)
    defect_share: float = DEFAULT_DEFECT_SHARE  # share of defects a batch may hold without ringing more than alpha
    alpha: float = DEFAULT_ALPHA  # alarm when the test's p-value is below this
    min_images: int = DEFAULT_MIN_IMAGES  # fewer scored images than this: not tested
    draws: int = DEFAULT_DRAWS  # Monte Carlo draws of the null distribution
    seed: int = 0

    def __post_init__(self) -> None:
        self._check("trim", check_float, "0 <= trim < 1", lambda v: 0 <= v < 1)
        self._check("defect_share", check_float, "0 <= defect_share < 1", lambda v: 0 <= v < 1)
        self._check("alpha", check_float, "0 < alpha < 1", lambda v: 0 < v < 1)
        self._check("min_images", check_int, 1)
        self._check("draws", check_int, 1)
        self._check("seed", check_int, 0)

    def test(self, counts: Any, calibration_count: int) -> DriftTest:
        """The drift test with these settings on one batch's level counts (`padim_core.drift`)."""
        return drift_test(counts, calibration_count, trim=self.trim, defect_share=self.defect_share, alpha=self.alpha,
                          draws=self.draws, seed=self.seed, min_images=self.min_images)


@dataclass(frozen=True)
class TrackingConfig(Section):
    """MLflow: where runs go and how fitted models are registered."""

    section: ClassVar[str] = "tracking"

    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else SQLite in the output folder
    experiment: str = "padim"
    register_models: bool = True
    alias: str = "champion"  # MLflow reserves "latest" and "v<N>"

    def __post_init__(self) -> None:
        if self.tracking_uri is not None:
            self._check("tracking_uri", check_str)
        self._check("experiment", check_str)
        self._check("register_models", check_bool)
        self._check("alias", check_str)
        if not _ALIAS_PATTERN.match(self.alias) or self.alias.lower() == "latest" or _VERSION_ALIAS.match(self.alias):
            raise ConfigError(
                f"tracking.alias: {self.alias!r} is not a usable MLflow alias; allowed: letters, digits, "
                "'_' and '-' (at most 255), except the reserved 'latest' and version names like 'v1'"
            )


@dataclass(frozen=True)
class JobConfig(ExperimentConfig):
    """A whole config file: the detectors' sections plus the jobs' and the output folder."""

    tasks: TasksConfig = field(default_factory=TasksConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output: str = "outputs"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_str("output", self.output)

    @property
    def output_folder(self) -> Path:
        return Path(self.output).expanduser().resolve()


JOB_SECTIONS = tuple(item.name for item in fields(JobConfig) if item.name not in {core.name for core in fields(ExperimentConfig)})
"""The keys of a config file that belong to the jobs: `padim_core.config.load_config(..., others=JOB_SECTIONS)`
reads a whole file for the detectors alone."""


def load_job_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Read a YAML config (None: all defaults), apply `key.sub=value` overrides, validate everything."""
    return config_from_dict(read_values(path, overrides), JobConfig)
