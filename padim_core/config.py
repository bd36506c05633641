"""Experiment configs: YAML files and `key.sub=value` overrides -> frozen, validated dataclasses.

This module holds the config machinery (validators, sections, YAML and overrides) and the
detectors' own sections: which detector, its settings, the data, calibration and shifts. The
jobs add their sections (Ray tasks, scoring, tracking) by subclassing `ExperimentConfig`
(`jobs.common.config`). Everything is checked when the config is loaded, on the machine that
submits the job, rather than inside a Ray task halfway through a cluster run. Every error names
the key path, the bad value and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from padim_core.augmentation import MAX_COPIES, PhotometricAugmentation
from padim_core.backbones import get_backbone
from padim_core.coreset import DEFAULT_CHUNK_PATCHES, DEFAULT_PROJECTION_DIM
from padim_core.datasets import MvtecCategory
from padim_core.detector import KINDS, Detector, detector_class
from padim_core.errors import BackboneError, ConfigError
from padim_core.features import EMBEDDINGS
from padim_core.gaussian import REGULARIZATION_SCALES, SHRINKAGE
from padim_core.manifest import SplitManifest, category_manifest
from padim_core.model_file import MAX_IMAGE_SIDE
from padim_core.shifts import SHIFTS


def describe_value(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(key: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    # bool is a subclass of int in Python; `n_features: true` is a mistake, not 1.
    allowed = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected {allowed}, got {describe_value(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigError(f"{key}: {value} is out of range; allowed: {allowed}")
    return value


def check_float(key: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number ({allowed}), got {describe_value(value)}")
    if not math.isfinite(value) or not ok(value):
        raise ConfigError(f"{key}: {value!r} is out of range; allowed: {allowed}")
    return float(value)


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {describe_value(value)}")
    return value


def check_str(key: str, value: Any, choices: Sequence[str] | None = None) -> str:
    if not isinstance(value, str) or not value:
        allowed = f"one of {list(choices)}" if choices else "a non-empty string"
        raise ConfigError(f"{key}: expected {allowed}, got {describe_value(value)}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {list(choices)}")
    return value


def check_str_list(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of strings, got {describe_value(value)}")
    for item in value:
        check_str(f"{key}[]", item)
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}: {list(value)} repeats a name; allowed: distinct names")
    return tuple(value)


class Section:
    """Base of the section dataclasses: check a field and store its normalised value."""

    section: ClassVar[str]

    def _check(self, name: str, check: Callable[..., Any], *args: Any) -> None:
        object.__setattr__(self, name, check(f"{self.section}.{name}", getattr(self, name), *args))


def check_augmentation(key: str, value: Any, default: PhotometricAugmentation | None = None) -> PhotometricAugmentation:
    """A detector's `augmentation` mapping: any key left out keeps the section's `default` (null:
    no augmentation at all)."""
    if isinstance(value, PhotometricAugmentation):
        return value
    if value is None:
        return PhotometricAugmentation()
    known = [item.name for item in dataclasses.fields(PhotometricAugmentation)]
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping with keys {known}, got {describe_value(value)}")
    for name in value:
        if name not in known:
            raise ConfigError(f"{key}.{name}: unknown key; known keys: {known}")
    values = dict(value)
    checks = {
        "copies": lambda v: check_int(f"{key}.copies", v, 0, MAX_COPIES),
        "brightness": lambda v: check_float(f"{key}.brightness", v, "0 <= x < 1 (factors 1 - x to 1 + x)", lambda x: 0 <= x < 1),
        "contrast": lambda v: check_float(f"{key}.contrast", v, "0 <= x < 1 (factors 1 - x to 1 + x)", lambda x: 0 <= x < 1),
        "noise": lambda v: check_float(f"{key}.noise", v, "0 <= sigma <= 1 (fraction of full scale)", lambda x: 0 <= x <= 1),
        "jpeg_quality": lambda v: check_int(f"{key}.jpeg_quality", v, 1, 100),
        "seed": lambda v: check_int(f"{key}.seed", v, 0),
    }
    for name, check in checks.items():
        if name in values:
            values[name] = check(values[name])
    if "colour_temperature" in values:
        bounds = values["colour_temperature"]
        allowed = "[low, high] kelvin, 1000 <= low <= high <= 40000"
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
            raise ConfigError(f"{key}.colour_temperature: expected {allowed}, got {describe_value(bounds)}")
        low, high = (check_float(f"{key}.colour_temperature[{i}]", bound, allowed, lambda x: 1000 <= x <= 40000)
                     for i, bound in enumerate(bounds))
        if low > high:
            raise ConfigError(f"{key}.colour_temperature: {list(bounds)} has low above high; allowed: {allowed}")
        values["colour_temperature"] = (low, high)
    return dataclasses.replace(default or PhotometricAugmentation(), **values)


class DetectorSection(Section):
    """A detector's section: its fields are the detector's constructor arguments."""

    def detector_kwargs(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


@dataclass(frozen=True)
class PadimConfig(DetectorSection):
    """PaDiM: which features, how many, and how the Gaussians and maps are made."""

    section: ClassVar[str] = "padim"

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] | None = None  # None: the backbone's default layers for PaDiM
    n_features: int = 100
    distance_metric: str = "mahalanobis"  # the only one PaDiM defines; recorded in the model file
    image_size: int | tuple[int, int] = 256  # square side, or (height, width)
    embedding: str = "random_subset"  # or semi_orthogonal (Kim et al. 2021): n_features dimensions either way
    shrinkage: str = "none"  # or oas, ledoit_wolf: each covariance pulled towards its average variance
    regularization: float = 10.0  # added to every covariance diagonal (the paper: 0.01; README, issue 14)...
    regularization_scale: str = "absolute"  # ...as is, or times the average variance: location_variance, global_variance
    seed: int = 0
    pretrained: bool = True  # false: a randomly initialised backbone (baselines only)
    blur_sigma: float = 4.0
    augmentation: PhotometricAugmentation = field(default_factory=lambda: PhotometricAugmentation(copies=1))  # fit-time copies

    def __post_init__(self) -> None:
        spec = _check_backbone(self)
        self._check("n_features", check_int, 1)
        size = spec.embedding_size(self.layers)
        if self.n_features > size:
            raise ConfigError(
                f"padim.n_features: {self.n_features} is larger than the embedding size {size} of "
                f"{spec.name} layers {list(self.layers)}; allowed: 1 to {size}"
            )
        self._check("distance_metric", check_str, ("mahalanobis",))
        self._check("embedding", check_str, EMBEDDINGS)
        self._check("shrinkage", check_str, SHRINKAGE)
        self._check("regularization", check_float, ">= 0", lambda v: v >= 0)
        self._check("regularization_scale", check_str, REGULARIZATION_SCALES)
        self._check("seed", check_int, 0)

    @property
    def image_hw(self) -> tuple[int, int]:
        """`image_size` as (height, width) whichever form the config used."""
        size = self.image_size
        return (size, size) if isinstance(size, int) else size


@dataclass(frozen=True)
class PatchcoreConfig(DetectorSection):
    """PatchCore: which features, how much of them the memory bank keeps, how images are scored."""

    section: ClassVar[str] = "patchcore"

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] | None = None  # None: the backbone's default layers for PatchCore (strides 8 and 16)
    image_size: int | tuple[int, int] = 256
    coreset_ratio: float = 0.1  # share of the training patches kept in the memory bank
    num_neighbors: int = 9  # bank neighbours in the image score's re-weighting (1: the plain maximum)
    seed: int = 0  # the coreset's random projection and starting points
    projection_dim: int = DEFAULT_PROJECTION_DIM  # dimensions of the coreset's distance computations
    chunk_patches: int = DEFAULT_CHUNK_PATCHES  # patches reduced at a time: fit memory and coreset quality
    pretrained: bool = True
    blur_sigma: float = 4.0
    augmentation: PhotometricAugmentation = field(default_factory=PhotometricAugmentation)  # fit-time copies

    def __post_init__(self) -> None:
        _check_backbone(self)
        self._check("coreset_ratio", check_float, "0 < ratio <= 1", lambda v: 0 < v <= 1)
        self._check("num_neighbors", check_int, 1)
        self._check("seed", check_int, 0)
        self._check("projection_dim", check_int, 1)
        self._check("chunk_patches", check_int, 1)



def _check_backbone(section: DetectorSection) -> Any:
    """backbone, layers, image_size, pretrained and blur_sigma: what every detector section has."""
    name = section.section
    section._check("backbone", check_str)
    try:
        spec = get_backbone(section.backbone)
    except BackboneError as error:
        raise ConfigError(f"{name}.backbone: {error}") from None
    layers = spec.default_layers[name] if section.layers is None else section.layers
    if not isinstance(layers, (list, tuple)) or not all(isinstance(layer, str) for layer in layers):
        raise ConfigError(
            f"{name}.layers: expected a list of layer names, got {describe_value(layers)}; "
            f"allowed for {spec.name}: {list(spec.layers)}"
        )
    try:
        object.__setattr__(section, "layers", spec.validate_layers(list(layers)))
    except BackboneError as error:
        raise ConfigError(f"{name}.layers: {error}") from None
    min_side = max(spec.layer_strides[layer] for layer in section.layers)
    value = section.image_size
    allowed = f"an integer from {min_side} to {MAX_IMAGE_SIDE}, or [height, width] of such integers"
    if isinstance(value, (list, tuple)) and len(value) == 2:
        sides = tuple(check_int(f"{name}.image_size[{i}]", side, min_side, MAX_IMAGE_SIDE) for i, side in enumerate(value))
        object.__setattr__(section, "image_size", sides)
    elif isinstance(value, int) and not isinstance(value, bool):
        check_int(f"{name}.image_size", value, min_side, MAX_IMAGE_SIDE)
    else:
        raise ConfigError(f"{name}.image_size: expected {allowed}, got {describe_value(value)}")
    section._check("pretrained", check_bool)
    section._check("blur_sigma", check_float, ">= 0 (0: no blur)", lambda v: v >= 0)
    default = next(f for f in dataclasses.fields(section) if f.name == "augmentation").default_factory()
    section._check("augmentation", check_augmentation, default)
    return spec


@dataclass(frozen=True)
class DataConfig(Section):
    """Where the images are and how they are read."""

    section: ClassVar[str] = "data"

    root: str = "demo_data"
    categories: tuple[str, ...] | str = "all"  # "all": every category folder under root
    batch_size: int = 32
    num_workers: int = 2  # decode threads

    def __post_init__(self) -> None:
        self._check("root", check_str)
        if isinstance(self.categories, str):
            # A single name is a one-item list; "all" keeps its meaning.
            object.__setattr__(self, "categories", self.categories if self.categories == "all" else (self.categories,))
        if self.categories != "all":
            if not isinstance(self.categories, (list, tuple)):
                raise ConfigError(
                    f"data.categories: expected 'all' or a list of category names, got {describe_value(self.categories)}"
                )
            self._check("categories", check_str_list)
        self._check("batch_size", check_int, 1)
        self._check("num_workers", check_int, 1)


@dataclass(frozen=True)
class CalibrationConfig(Section):
    """Which normal images calibrate the threshold, and the false-alarm rate it guarantees.

    The calibration images are held out from the fit (`padim_core.manifest`): a seeded
    `fraction` of `train/good`, or the normal images of `folder/<category>/`, or the split of a
    `manifest` written by an earlier fit (a file, or a folder of `<category>.json`).
    """

    section: ClassVar[str] = "calibration"

    fraction: float = 0.2  # share of train/good held out for calibration (without folder or manifest)
    seed: int = 0  # which images the fraction holds out
    false_alarm_rate: float | str | None = None  # alpha; null or "auto": 0.01 if the count allows, else 1/(n+1)
    folder: str | None = None  # <folder>/<category>/: normal calibration images; all of train/good fits
    manifest: str | None = None  # a split manifest file, or a folder of <category>.json

    def __post_init__(self) -> None:
        self._check("fraction", check_float, "0 < fraction < 1", lambda v: 0 < v < 1)
        self._check("seed", check_int, 0)
        if self.false_alarm_rate == "auto":
            object.__setattr__(self, "false_alarm_rate", None)
        if self.false_alarm_rate is not None:
            self._check("false_alarm_rate", check_float, "0 < rate < 1, or null/auto", lambda v: 0 < v < 1)
        for name in ("folder", "manifest"):
            if getattr(self, name) is not None:
                self._check(name, check_str)
        if self.folder is not None and self.manifest is not None:
            raise ConfigError("calibration.folder and calibration.manifest: give one of them, not both "
                              "(a manifest already names its calibration images)")

    def split(self, category: MvtecCategory, min_fit: int = 1) -> SplitManifest:
        """The category's fit / calibration / test split this section describes (see `padim_core.manifest`)."""
        return category_manifest(category, fraction=self.fraction, seed=self.seed, folder=self.folder,
                                 manifest=self.manifest, min_fit=min_fit)


@dataclass(frozen=True)
class ShiftConfig(Section):
    """Domain shifts: which, at which levels (severity k is the k-th level), which seed."""

    section: ClassVar[str] = "shift"

    shifts: Mapping[str, tuple[float, ...]] | None = None  # None: every shift at its default levels
    seed: int = 0
    tolerance: float = 0.05  # the AUROC drop at which the report calls a category broken

    def __post_init__(self) -> None:
        chosen = {name: kind.default_levels for name, kind in SHIFTS.items()} if self.shifts is None else self.shifts
        if not isinstance(chosen, Mapping) or not chosen:
            raise ConfigError(
                f"shift.shifts: expected a mapping of shift names to lists of levels, got {describe_value(chosen)}; "
                f"shifts: {list(SHIFTS)}"
            )
        levels: dict[str, tuple[float, ...]] = {}
        for name, values in chosen.items():
            key = f"shift.shifts.{name}"
            if name not in SHIFTS:
                raise ConfigError(f"{key}: unknown shift; allowed: {list(SHIFTS)}")
            kind = SHIFTS[name]
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"{key}: expected a non-empty list of levels ({kind.unit}), got {describe_value(values)}")
            levels[name] = tuple(
                check_float(f"{key}[{i}]", value, f"{kind.allowed}; {kind.unit}", kind.check) for i, value in enumerate(values)
            )
        object.__setattr__(self, "shifts", levels)
        self._check("seed", check_int, 0)
        self._check("tolerance", check_float, "0 < tolerance < 1", lambda v: 0 < v < 1)


@dataclass(frozen=True)
class ExperimentConfig:
    """What the detectors need: which kind, its settings, the data, calibration and shifts.

    Fields that hold a `Section` are YAML sections; the others are top-level keys.
    """

    detector: str = "padim"
    padim: PadimConfig = field(default_factory=PadimConfig)
    patchcore: PatchcoreConfig = field(default_factory=PatchcoreConfig)
    data: DataConfig = field(default_factory=DataConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    shift: ShiftConfig = field(default_factory=ShiftConfig)

    def __post_init__(self) -> None:
        check_str("detector", self.detector, sorted(KINDS))

    def detector_section(self, kind: str | None = None) -> DetectorSection:
        """The settings section of `kind` (default: the config's `detector`)."""
        return getattr(self, kind or self.detector)

    def build_detector(self, kind: str | None = None, device: str | None = None) -> Detector:
        """An unfitted detector of `kind` (default: the config's `detector`) with this config's settings."""
        return detector_class(kind or self.detector)(**self.detector_section(kind).detector_kwargs(), device=device)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and scalars: safe for `yaml.safe_dump` and MLflow params."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _sections(schema: type) -> dict[str, type[Section] | None]:
    """Top-level key -> its Section class, or None for a plain top-level value."""
    found = {}
    for item in dataclasses.fields(schema):
        default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
        found[item.name] = type(default) if isinstance(default, Section) else None
    return found


def _section_from_dict(cls: type[Section], values: Any) -> Section:
    if values is None:  # a section header with only comments under it
        return cls()
    if not isinstance(values, Mapping):
        raise ConfigError(f"{cls.section}: expected a mapping of keys, got {describe_value(values)}")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            raise ConfigError(f"{cls.section}.{key}: unknown key; known keys: {known}")
    return cls(**values)


def config_from_dict(values: Mapping[str, Any], schema: type = ExperimentConfig, *, others: Sequence[str] = ()) -> Any:
    """Build and validate a `schema` config from plain data (the inverse of `to_dict`).

    Top-level keys in `others` belong to another reader and are left alone; any other unknown
    key is an error.
    """
    sections = _sections(schema)
    allowed = sorted(sections)
    if not isinstance(values, Mapping):
        raise ConfigError(f"config: expected a mapping of sections {allowed}, got {describe_value(values)}")
    for key in values:
        if key not in sections and key not in others:
            raise ConfigError(f"{key}: unknown section; allowed: {allowed}")
    arguments = {}
    for name, cls in sections.items():
        if cls is not None:
            arguments[name] = _section_from_dict(cls, values.get(name))
        elif name in values:
            arguments[name] = values[name]
    return schema(**arguments)


def _apply_override(values: dict[str, Any], override: str) -> None:
    """Set `section.key=value` in `values`; the value is parsed as YAML (`[a, b]`, `null`, `0.5`)."""
    path, sep, text = override.partition("=")
    path = path.strip()
    if not sep or not path:
        raise ConfigError(f"override {override!r} is malformed; expected key.sub=value, e.g. padim.n_features=50")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: value {text!r} is not valid YAML ({error})") from None
    *parents, leaf = path.split(".")
    node = values
    for depth, part in enumerate(parents):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            where = ".".join(parents[: depth + 1])
            raise ConfigError(f"override {override!r}: {where} is not a section")
        node = node[part]
    node[leaf] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot be read ({error.strerror or error})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path}: invalid YAML ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(values).__name__}")
    return values


def read_values(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A YAML config (None: empty) with `key.sub=value` overrides applied, not yet validated."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides: expected a list of key.sub=value strings, got the string {overrides!r}")
    values = {} if path is None else _read_yaml(Path(path))
    for override in overrides:
        _apply_override(values, override)
    return values


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *, others: Sequence[str] = ()
                ) -> ExperimentConfig:
    """Read a YAML config (None: all defaults), apply overrides, validate the detectors' sections.

    `others`: top-level sections another layer reads (e.g. the jobs' `tracking`), left alone.
    """
    return config_from_dict(read_values(path, overrides), ExperimentConfig, others=others)
