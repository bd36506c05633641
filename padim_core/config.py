"""Experiment configs: YAML files and `key.sub=value` overrides -> frozen, validated dataclasses.

Everything is checked when the config is loaded, on the machine that submits the job, rather
than inside a Ray task halfway through a cluster run. Every error names the key path, the bad
value and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import yaml

from padim_core.backbones import BackboneError, get_backbone
from padim_core.shifts import SHIFTS


class ConfigError(ValueError):
    """A config file, override or value that cannot be used."""


# MLflow's rules for registered-model aliases (mlflow.utils.validation): "latest" and "v<N>"
# are reserved because `models:/name@alias` URIs would clash with version references.
_ALIAS_PATTERN = re.compile(r"^[\w\-]{1,255}$")
_VERSION_ALIAS = re.compile(r"^[vV]\d+$")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _int(key: str, value: Any, minimum: int) -> int:
    # bool is a subclass of int in Python; `n_features: true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer >= {minimum}, got {_describe(value)}")
    if value < minimum:
        raise ConfigError(f"{key}: {value} is too small; allowed: an integer >= {minimum}")
    return value


def _float(key: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number ({allowed}), got {_describe(value)}")
    if not ok(value):
        raise ConfigError(f"{key}: {value!r} is out of range; allowed: {allowed}")
    return float(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
    return value


def _str(key: str, value: Any, choices: Sequence[str] | None = None) -> str:
    if not isinstance(value, str) or not value:
        allowed = f"one of {list(choices)}" if choices else "a non-empty string"
        raise ConfigError(f"{key}: expected {allowed}, got {_describe(value)}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {list(choices)}")
    return value


def _str_list(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of strings, got {_describe(value)}")
    for item in value:
        _str(f"{key}[]", item)
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}: {list(value)} repeats a name; allowed: distinct names")
    return tuple(value)


def _gpus(key: str, value: Any) -> str | float:
    """Ray's rule: fractional GPUs only below one (0.25 shares a GPU; 1.5 is rejected)."""
    if value == "auto":
        return value
    allowed = "'auto', or a number >= 0 (whole numbers above 1, as Ray requires)"
    if isinstance(value, str):
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {allowed}")
    return _float(key, value, allowed, lambda v: v >= 0 and (v <= 1 or float(v).is_integer()))


class _Section:
    """Shared by the section dataclasses: check a field and store its normalised value."""

    section: ClassVar[str]

    def _check(self, name: str, check: Callable[..., Any], *args: Any) -> None:
        object.__setattr__(self, name, check(f"{self.section}.{name}", getattr(self, name), *args))


@dataclass(frozen=True)
class PadimConfig(_Section):
    """The model: which features, how many, and how the Gaussians and maps are made."""

    section: ClassVar[str] = "padim"

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] | None = None  # None: the backbone's default_layers
    n_features: int = 100
    distance_metric: str = "mahalanobis"
    image_size: int | tuple[int, int] = 256  # square side, or (height, width)
    regularization: float = 0.01
    seed: int = 0
    pretrained: bool = True  # false: a randomly initialised backbone (baselines only)
    blur_sigma: float = 4.0

    def __post_init__(self) -> None:
        self._check("backbone", _str)
        try:
            spec = get_backbone(self.backbone)
        except BackboneError as error:
            raise ConfigError(f"padim.backbone: {error}") from None
        layers = spec.default_layers if self.layers is None else self.layers
        if not isinstance(layers, (list, tuple)) or not all(isinstance(layer, str) for layer in layers):
            raise ConfigError(
                f"padim.layers: expected a list of layer names, got {_describe(layers)}; "
                f"allowed for {spec.name}: {list(spec.layers)}"
            )
        try:
            object.__setattr__(self, "layers", spec.validate_layers(list(layers)))
        except BackboneError as error:
            raise ConfigError(f"padim.layers: {error}") from None
        self._check("n_features", _int, 1)
        size = spec.embedding_size(self.layers)
        if self.n_features > size:
            raise ConfigError(
                f"padim.n_features: {self.n_features} is larger than the embedding size {size} of "
                f"{spec.name} layers {list(self.layers)}; allowed: 1 to {size}"
            )
        self._check("distance_metric", _str, ("mahalanobis",))
        self._check_image_size(max(spec.layer_strides[layer] for layer in self.layers))
        self._check("regularization", _float, ">= 0", lambda v: v >= 0)
        self._check("seed", _int, 0)
        self._check("pretrained", _bool)
        self._check("blur_sigma", _float, ">= 0 (0: no blur)", lambda v: v >= 0)

    def _check_image_size(self, min_side: int) -> None:
        """Every chosen layer must still have at least one cell: sides >= the deepest stride."""
        value = self.image_size
        allowed = f"an integer >= {min_side} or [height, width] of such integers"
        if isinstance(value, (list, tuple)) and len(value) == 2:
            sides = tuple(_int(f"padim.image_size[{i}]", side, min_side) for i, side in enumerate(value))
            object.__setattr__(self, "image_size", sides)
        elif isinstance(value, int) and not isinstance(value, bool):
            _int("padim.image_size", value, min_side)
        else:
            raise ConfigError(f"padim.image_size: expected {allowed}, got {_describe(value)}")

    @property
    def image_hw(self) -> tuple[int, int]:
        """`image_size` as (height, width) whichever form the config used."""
        size = self.image_size
        return (size, size) if isinstance(size, int) else size


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where the images are and how they are read."""

    section: ClassVar[str] = "data"

    root: str = "demo_data"
    categories: tuple[str, ...] | str = "all"  # "all": every category folder under root
    batch_size: int = 32
    num_workers: int = 2  # decode threads

    def __post_init__(self) -> None:
        self._check("root", _str)
        if isinstance(self.categories, str):
            # A single name is a one-item list; "all" keeps its meaning.
            object.__setattr__(self, "categories", self.categories if self.categories == "all" else (self.categories,))
        if self.categories != "all":
            if not isinstance(self.categories, (list, tuple)):
                raise ConfigError(
                    f"data.categories: expected 'all' or a list of category names, got {_describe(self.categories)}"
                )
            self._check("categories", _str_list)
        self._check("batch_size", _int, 1)
        self._check("num_workers", _int, 1)


@dataclass(frozen=True)
class FitConfig(_Section):
    """How fitting is spread over Ray and how the decision threshold is calibrated."""

    section: ClassVar[str] = "fit"

    device: str = "auto"
    num_gpus: str | float = "auto"  # per fit task; "auto": 1 when the cluster has GPUs, else 0
    num_cpus: float = 1.0
    max_retries: int = 2
    threshold_quantile: float = 0.99
    heatmap_examples: int = 4

    def __post_init__(self) -> None:
        self._check("device", _str, ("auto", "cpu", "cuda"))
        self._check("num_gpus", _gpus)
        if self.device == "cuda" and self.num_gpus == 0:
            raise ConfigError(
                "fit.num_gpus: 0 with fit.device 'cuda' leaves the Ray task without a GPU; "
                "allowed: 'auto' or a number > 0, or set fit.device to 'auto' or 'cpu'"
            )
        self._check("num_cpus", _float, ">= 0", lambda v: v >= 0)
        self._check("max_retries", _int, 0)
        self._check("threshold_quantile", _float, "0 < quantile <= 1", lambda v: 0 < v <= 1)
        self._check("heatmap_examples", _int, 0)


@dataclass(frozen=True)
class ScoringConfig(_Section):
    """Batch scoring with Ray Data: actor pool size and what each score row carries."""

    section: ClassVar[str] = "scoring"

    batch_size: int = 32
    actors: int = 1
    num_gpus: str | float = "auto"  # per actor
    map_columns: bool = False  # add a downsampled anomaly map to every row
    map_size: int = 32  # side of that map
    heatmaps_above_threshold: bool = False  # write overlays for images flagged anomalous

    def __post_init__(self) -> None:
        self._check("batch_size", _int, 1)
        self._check("actors", _int, 1)
        self._check("num_gpus", _gpus)
        self._check("map_columns", _bool)
        self._check("map_size", _int, 1)
        self._check("heatmaps_above_threshold", _bool)


@dataclass(frozen=True)
class ShiftConfig(_Section):
    """jobs.shift: which domain shifts, at which levels (severity k is the k-th level), which seed."""

    section: ClassVar[str] = "shift"

    shifts: Mapping[str, tuple[float, ...]] | None = None  # None: every shift at its default levels
    seed: int = 0
    tolerance: float = 0.05  # the image-AUROC drop at which the report calls a category broken

    def __post_init__(self) -> None:
        chosen = {name: kind.default_levels for name, kind in SHIFTS.items()} if self.shifts is None else self.shifts
        if not isinstance(chosen, Mapping) or not chosen:
            raise ConfigError(
                f"shift.shifts: expected a mapping of shift names to lists of levels, got {_describe(chosen)}; "
                f"shifts: {list(SHIFTS)}"
            )
        levels: dict[str, tuple[float, ...]] = {}
        for name, values in chosen.items():
            key = f"shift.shifts.{name}"
            if name not in SHIFTS:
                raise ConfigError(f"{key}: unknown shift; allowed: {list(SHIFTS)}")
            kind = SHIFTS[name]
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"{key}: expected a non-empty list of levels ({kind.unit}), got {_describe(values)}")
            levels[name] = tuple(
                _float(f"{key}[{i}]", value, f"{kind.allowed}; {kind.unit}", kind.check) for i, value in enumerate(values)
            )
        object.__setattr__(self, "shifts", levels)
        self._check("seed", _int, 0)
        self._check("tolerance", _float, "0 < tolerance < 1", lambda v: 0 < v < 1)


@dataclass(frozen=True)
class TrackingConfig(_Section):
    """MLflow: where runs go and how fitted models are registered."""

    section: ClassVar[str] = "tracking"

    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else SQLite in the output folder
    experiment: str = "padim"
    register_models: bool = True
    alias: str = "champion"  # MLflow reserves "latest" and "v<N>"

    def __post_init__(self) -> None:
        if self.tracking_uri is not None:
            self._check("tracking_uri", _str)
        self._check("experiment", _str)
        self._check("register_models", _bool)
        self._check("alias", _str)
        if not _ALIAS_PATTERN.match(self.alias) or self.alias.lower() == "latest" or _VERSION_ALIAS.match(self.alias):
            raise ConfigError(
                f"tracking.alias: {self.alias!r} is not a usable MLflow alias; allowed: letters, digits, "
                "'_' and '-' (at most 255), except the reserved 'latest' and version names like 'v1'"
            )


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: every section plus the output folder."""

    padim: PadimConfig = field(default_factory=PadimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output: str = "outputs"

    def __post_init__(self) -> None:
        _str("output", self.output)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and scalars: safe for `yaml.safe_dump` and MLflow params."""
        return _plain(dataclasses.asdict(self))


_SECTIONS: dict[str, type[_Section]] = {
    cls.section: cls for cls in (PadimConfig, DataConfig, FitConfig, ScoringConfig, ShiftConfig, TrackingConfig)
}
_TOP_LEVEL = sorted([*_SECTIONS, "output"])


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _section_from_dict(cls: type[_Section], values: Any) -> _Section:
    if values is None:  # a section header with only comments under it
        return cls()
    if not isinstance(values, Mapping):
        raise ConfigError(f"{cls.section}: expected a mapping of keys, got {_describe(values)}")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            raise ConfigError(f"{cls.section}.{key}: unknown key; known keys: {known}")
    return cls(**values)


def config_from_dict(values: Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate a config from plain data (the inverse of `ExperimentConfig.to_dict`)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"config: expected a mapping of sections {_TOP_LEVEL}, got {_describe(values)}")
    for key in values:
        if key not in _TOP_LEVEL:
            raise ConfigError(f"{key}: unknown section; allowed: {_TOP_LEVEL}")
    sections = {name: _section_from_dict(cls, values.get(name)) for name, cls in _SECTIONS.items()}
    return ExperimentConfig(**sections, output=values.get("output", "outputs"))


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
            raise ConfigError(f"override {override!r}: {where} is not a section; sections: {sorted(_SECTIONS)}")
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
        raise ConfigError(
            f"config file {path}: expected a mapping of sections {_TOP_LEVEL}, got {type(values).__name__}"
        )
    return values


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config (None: all defaults), apply `key.sub=value` overrides, validate."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides: expected a list of key.sub=value strings, got the string {overrides!r}")
    values = {} if path is None else _read_yaml(Path(path))
    for override in overrides:
        _apply_override(values, override)
    return config_from_dict(values)

