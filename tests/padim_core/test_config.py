"""The detectors' config: sections, YAML files and overrides, and the errors that name key, value and
what is allowed. The jobs' sections are tested in tests/jobs/common/test_config.py."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml

from jobs.common.config import JOB_SECTIONS
from padim_core.augmentation import PhotometricAugmentation
from padim_core.backbones import BACKBONES, get_backbone
from padim_core.config import (
    CalibrationConfig,
    DataConfig,
    ExperimentConfig,
    PadimConfig,
    config_from_dict,
    load_config,
    read_values,
)
from padim_core.detector import KINDS, detector_class
from padim_core.errors import ConfigError, PadimError
from padim_core.padim import PadimModel

from support.paths import CONFIGS

"""Top-level keys of the config files that the jobs read, not padim_core."""


def test_defaults_without_a_file():
    config = load_config()
    assert config == ExperimentConfig()
    assert config.detector == "padim"
    assert config.padim.backbone == "efficientnet_lite0"
    assert config.padim.layers == get_backbone("efficientnet_lite0").default_layers["padim"]
    assert config.padim.n_features == 100
    assert config.padim.distance_metric == "mahalanobis"
    assert config.padim.image_hw == (256, 256)
    assert config.padim.pretrained is True
    assert config.data.categories == "all"
    assert config.calibration == CalibrationConfig(fraction=0.2, seed=0, false_alarm_rate=None, folder=None, manifest=None)
    sections = {field.name for field in dataclasses.fields(config)}
    assert {"detector", "padim", "data", "calibration", "shift"} <= sections and not sections & set(JOB_SECTIONS)


def test_experiment_config_keeps_the_seed_keys():
    raw = yaml.safe_load((CONFIGS / "experiment_config.yaml").read_text())
    assert {key: raw["padim"][key] for key in ("backbone", "layers", "n_features", "distance_metric")} == {
        "backbone": "resnet50",
        "layers": ["layer2", "layer3"],
        "n_features": 100,
        "distance_metric": "mahalanobis",
    }
    config = load_config(CONFIGS / "experiment_config.yaml", others=JOB_SECTIONS)
    assert config.padim.backbone == "resnet50"
    assert config.padim.layers == ("layer2", "layer3")
    assert config.padim.n_features == 100 and config.padim.distance_metric == "mahalanobis"


def test_the_jobs_sections_belong_to_another_reader():
    """Without `others`, a jobs section is an unknown section: padim_core reads none of them."""
    with pytest.raises(ConfigError, match=r"tasks: unknown section; allowed: \['calibration', 'data', 'detector', 'padim',"):
        load_config(CONFIGS / "experiment_config.yaml")
    values = read_values(CONFIGS / "experiment_config.yaml")
    assert set(JOB_SECTIONS) <= set(values)
    assert config_from_dict(values, others=JOB_SECTIONS) == load_config(CONFIGS / "experiment_config.yaml", others=JOB_SECTIONS)


def test_demo_config_is_offline_efficientnet():
    config = load_config(CONFIGS / "demo.yaml", others=JOB_SECTIONS)
    assert config.padim.backbone == "efficientnet_lite0"
    assert config.padim.layers == ("blocks.1", "blocks.2", "blocks.4")
    assert config.padim.pretrained is True
    assert config.data.root == "demo_data"
    assert config.padim.image_size == 128


@pytest.mark.parametrize("name", ["experiment_config.yaml", "demo.yaml"])
def test_round_trip_through_plain_dict_and_yaml(name):
    config = load_config(CONFIGS / name, others=JOB_SECTIONS)
    plain = config.to_dict()
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(plain))) == config
    assert config_from_dict(plain).to_dict() == plain


def test_overrides_are_parsed_as_yaml():
    config = load_config(
        CONFIGS / "experiment_config.yaml",
        [
            "padim.n_features=50",
            "padim.layers=[layer1, layer3]",
            "padim.image_size=[192, 256]",
            "data.categories=[bottle, cable]",
            "calibration.false_alarm_rate=0.05",
            "shift.tolerance=0.1",
        ],
        others=JOB_SECTIONS,
    )
    assert config.padim.n_features == 50
    assert config.padim.layers == ("layer1", "layer3")
    assert config.padim.image_size == (192, 256)
    assert config.padim.image_hw == (192, 256)
    assert config.data.categories == ("bottle", "cable")
    assert config.calibration.false_alarm_rate == 0.05
    assert config.shift.tolerance == 0.1


def test_override_fills_an_empty_section_and_values_are_normalised(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("padim:\n  backbone: resnet18\n  layers: [layer3, layer1]\ncalibration:\n")
    config = load_config(path, ["calibration.false_alarm_rate=auto", "padim.regularization=1", "data.categories=bottle"])
    assert config.padim.layers == ("layer1", "layer3")  # network order
    assert config.calibration.false_alarm_rate is None  # "auto" and null mean the same
    assert config.padim.regularization == 1.0 and isinstance(config.padim.regularization, float)
    assert config.data.categories == ("bottle",)


def test_layers_default_to_the_backbones_own():
    for name, spec in BACKBONES.items():
        assert PadimConfig(backbone=name).layers == spec.default_layers["padim"]


def test_dataclasses_validate_when_built_directly():
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"calibration\.fraction"):
        CalibrationConfig(fraction=1)
    with pytest.raises(ConfigError, match=r"calibration\.folder and calibration\.manifest: give one of them"):
        CalibrationConfig(folder="calibration", manifest="outputs/manifests")
    with pytest.raises(ConfigError, match=r"detector: 'nope' is not allowed; allowed: \["):
        ExperimentConfig(detector="nope")


def test_config_errors_are_padim_errors_not_value_errors():
    assert issubclass(ConfigError, PadimError) and not issubclass(ConfigError, ValueError)


def test_build_detector_gives_an_unfitted_detector_with_the_configs_settings():
    config = load_config(None, ["padim.backbone=resnet18", "padim.layers=[layer1, layer2]", "padim.n_features=12",
                                "padim.image_size=[48, 64]", "padim.pretrained=false", "padim.seed=3", "padim.blur_sigma=0"])
    model = config.build_detector(device="cpu")
    assert type(model) is PadimModel and not model.is_fitted
    assert (model.layers, model.n_features, model.image_size, model.seed, model.blur_sigma) == (
        ("layer1", "layer2"), 12, (48, 64), 3, 0.0)
    assert config.build_detector("padim").channel_index.tolist() == model.channel_index.tolist()
    assert config.detector_section() is config.padim


def test_robustness_options_reach_the_detector_and_round_trip():
    overrides = ["padim.embedding=semi_orthogonal", "padim.shrinkage=oas", "padim.regularization_scale=location_variance",
                 "padim.augmentation.copies=3", "padim.augmentation.colour_temperature=[5000, 8000]",
                 "patchcore.augmentation={copies: 2, noise: 0.01}"]
    config = load_config(None, overrides)
    model = config.build_detector(device="cpu")
    assert (model.embedding, model.shrinkage, model.regularization_scale) == ("semi_orthogonal", "oas", "location_variance")
    assert model.augmentation.copies == 3 and model.augmentation.colour_temperature == (5000.0, 8000.0)
    assert config.build_detector("patchcore").augmentation.noise == 0.01
    assert config_from_dict(config.to_dict()) == config
    assert yaml.safe_load(yaml.safe_dump(config.to_dict()))["padim"]["augmentation"]["colour_temperature"] == [5000.0, 8000.0]


def test_padims_defaults_are_the_measured_robust_ones_and_partial_augmentation_keeps_them():
    """README "Robustness to light and noise (issue 14)": regularisation 10 and one augmented copy."""
    padim = load_config(None).padim
    assert (padim.regularization, padim.regularization_scale, padim.shrinkage) == (10.0, "absolute", "none")
    assert padim.augmentation == PhotometricAugmentation(copies=1)
    # A key left out of an augmentation mapping keeps the section's default, not "no augmentation".
    assert load_config(None, ["padim.augmentation={noise: 0.01}"]).padim.augmentation == PhotometricAugmentation(copies=1, noise=0.01)
    assert load_config(None, ["padim.augmentation.copies=0"]).padim.augmentation.copies == 0
    assert load_config(None, ["padim.augmentation=null"]).padim.augmentation.copies == 0
    for path in (CONFIGS / "demo.yaml", CONFIGS / "experiment_config.yaml"):
        values = yaml.safe_load(path.read_text())["padim"]
        assert (values["regularization"], values["augmentation"]) == (10.0, {"copies": 1}), path


def test_every_kind_has_a_section_whose_settings_its_class_takes():
    config = ExperimentConfig()
    for kind in KINDS:
        arguments = set(config.detector_section(kind).detector_kwargs())
        assert arguments and arguments <= set(inspect.signature(detector_class(kind)).parameters), kind


BAD_OVERRIDES = [
    # (override, substrings the message must contain)
    ("padim.n_featurs=5", ["padim.n_featurs", "unknown key", "n_features", "backbone"]),
    ("padim.n_features=true", ["padim.n_features", "True", "integer"]),
    ("padim.n_features=12.5", ["padim.n_features", "12.5", "integer"]),
    ("padim.n_features=0", ["padim.n_features", "0", ">= 1"]),
    ("padim.n_features=5000", ["padim.n_features", "5000", "embedding size 176", "1 to 176"]),
    ("padim.backbone=vgg16", ["padim.backbone", "vgg16", "resnet50", "efficientnet_lite0"]),
    ("padim.layers=[layer2]", ["padim.layers", "layer2", "blocks.1", "blocks.6"]),
    ("padim.layers=blocks.1", ["padim.layers", "blocks.1", "list"]),
    ("padim.layers=[[layer2]]", ["padim.layers", "[['layer2']]", "blocks.1"]),
    ("padim.layers=[]", ["padim.layers", "empty", "blocks.1"]),
    ("padim.distance_metric=euclidean", ["padim.distance_metric", "euclidean", "mahalanobis"]),
    ("padim.regularization=-0.1", ["padim.regularization", "-0.1", ">= 0"]),
    ("padim.regularization=lots", ["padim.regularization", "lots", ">= 0"]),
    ("padim.image_size=8", ["padim.image_size", "8", ">= 16"]),
    ("padim.image_size=[256, 256, 3]", ["padim.image_size", "[256, 256, 3]", "[height, width]"]),
    ("padim.pretrained=no_thanks", ["padim.pretrained", "no_thanks", "true or false"]),
    ("padim.seed=-1", ["padim.seed", "-1", ">= 0"]),
    ("patchcore.coreset_ratio=0", ["patchcore.coreset_ratio", "0", "0 < ratio <= 1"]),
    ("patchcore.coreset_ratio=1.5", ["patchcore.coreset_ratio", "1.5", "0 < ratio <= 1"]),
    ("patchcore.coreset_ratio=all", ["patchcore.coreset_ratio", "all", "0 < ratio <= 1"]),
    ("patchcore.num_neighbors=0", ["patchcore.num_neighbors", "0", ">= 1"]),
    ("patchcore.chunk_patches=0", ["patchcore.chunk_patches", "0", ">= 1"]),
    ("patchcore.layers=[layer2]", ["patchcore.layers", "layer2", "blocks.2"]),
    ("data.categories=[]", ["data.categories", "[]", "list"]),
    ("data.categories=[a, a]", ["data.categories", "repeats", "distinct"]),
    ("data.batch_size=0", ["data.batch_size", "0", ">= 1"]),
    ("calibration.false_alarm_rate=0", ["calibration.false_alarm_rate", "0", "0 < rate < 1, or null/auto"]),
    ("calibration.false_alarm_rate=1.5", ["calibration.false_alarm_rate", "1.5", "0 < rate < 1"]),
    ("calibration.false_alarm_rate=often", ["calibration.false_alarm_rate", "'often'", "expected a number"]),
    ("calibration.fraction=0", ["calibration.fraction", "0", "0 < fraction < 1"]),
    ("calibration.fraction=1.0", ["calibration.fraction", "1.0", "0 < fraction < 1"]),
    ("calibration.seed=-1", ["calibration.seed", "-1", "integer >= 0"]),
    ("calibration.folder=''", ["calibration.folder", "non-empty string"]),
    ("calibration.threshold_quantile=0.5", ["calibration.threshold_quantile", "unknown key", "false_alarm_rate"]),
    ("paddim.backbone=resnet18", ["paddim", "unknown section", "padim", "calibration"]),
    ("tracking.alias=x", ["tracking", "unknown section", "padim", "shift"]),
    ("detector=patchcorn", ["detector", "patchcorn", "padim"]),
    ("data.root=", ["data.root", "None", "non-empty string"]),
    ("data.num_workers=0", ["data.num_workers", "0", ">= 1"]),
    ("padim.blur_sigma=-1", ["padim.blur_sigma", "-1", ">= 0"]),
    ("padim.image_size=4096", ["padim.image_size", "4096", "<= 2048"]),
    ("shift.shifts.fog=[1]", ["shift.shifts.fog", "unknown shift", "blur"]),
    ("shift.shifts.jpeg=[50, 0]", ["shift.shifts.jpeg[1]", "0", "an integer from 1 to 100"]),
    ("shift.shifts.blur=[]", ["shift.shifts.blur", "non-empty list of levels", "sigma"]),
    ("shift.shifts.blur=2", ["shift.shifts.blur", "non-empty list of levels"]),
    ("shift.tolerance=1", ["shift.tolerance", "0 < tolerance < 1"]),
    ("padim=5", ["padim", "5", "mapping"]),
    ("padim.shrinkage=lw", ["padim.shrinkage", "lw", "oas", "ledoit_wolf"]),
    ("padim.regularization_scale=relative", ["padim.regularization_scale", "relative", "absolute", "global_variance"]),
    ("padim.embedding=pca", ["padim.embedding", "pca", "random_subset", "semi_orthogonal"]),
    ("padim.augmentation=4", ["padim.augmentation", "4", "mapping", "copies"]),
    ("padim.augmentation.copy=4", ["padim.augmentation.copy", "unknown key", "copies"]),
    ("padim.augmentation.copies=-1", ["padim.augmentation.copies", "-1", ">= 0 and <= 64"]),
    ("patchcore.augmentation.brightness=1", ["patchcore.augmentation.brightness", "1", "0 <= x < 1"]),
    ("padim.augmentation.colour_temperature=[9000, 5000]", ["padim.augmentation.colour_temperature", "low above high"]),
    ("padim.augmentation.colour_temperature=5000", ["padim.augmentation.colour_temperature", "[low, high] kelvin"]),
    ("padim.augmentation.jpeg_quality=0", ["padim.augmentation.jpeg_quality", "0", ">= 1 and <= 100"]),
    ("padim.n_features", ["padim.n_features", "malformed", "key.sub=value"]),
    ("=5", ["=5", "malformed"]),
    ("data.categories=[a, b", ["data.categories=[a, b", "not valid YAML"]),
]


@pytest.mark.parametrize(("override", "expected"), BAD_OVERRIDES, ids=[case[0] for case in BAD_OVERRIDES])
def test_bad_values_name_the_key_value_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    for text in expected:
        assert text in str(caught.value)


def test_layers_must_belong_to_the_overridden_backbone():
    with pytest.raises(ConfigError, match=r"padim\.layers.*layer2.*efficientnet_lite0"):
        load_config(CONFIGS / "experiment_config.yaml", ["padim.backbone=efficientnet_lite0"], others=JOB_SECTIONS)
    overrides = ["padim.backbone=efficientnet_lite0", "padim.layers=[blocks.2]", "padim.n_features=40"]
    config = load_config(CONFIGS / "experiment_config.yaml", overrides, others=JOB_SECTIONS)
    assert config.padim.layers == ("blocks.2",)


def test_override_cannot_descend_into_a_value():
    with pytest.raises(ConfigError, match=r"detector\.kind=x.*detector is not a section"):
        load_config(CONFIGS / "demo.yaml", ["detector.kind=x"], others=JOB_SECTIONS)


def test_overrides_must_be_a_list_not_a_string():
    with pytest.raises(ConfigError, match="overrides"):
        load_config(None, "padim.n_features=5")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("padim: [unclosed\n", "invalid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        ("", "expected a mapping"),
    ],
)
def test_bad_files_name_the_file(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value) and expected in str(caught.value)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="absent.yaml.*cannot be read"):
        load_config(path)


def test_shift_section_defaults_to_every_shift_and_overrides_choose_some():
    from padim_core.shifts import SHIFTS

    default = load_config().shift
    assert list(default.shifts) == list(SHIFTS) and default.seed == 0
    assert all(levels == tuple(SHIFTS[name].default_levels) for name, levels in default.shifts.items())
    chosen = load_config(None, ["shift.shifts.blur=[1, 8]", "shift.seed=3"]).shift
    assert chosen.shifts == {"blur": (1.0, 8.0)} and chosen.seed == 3
    assert config_from_dict(load_config(None, ["shift.shifts.jpeg=[50]"]).to_dict()).shift.shifts == {"jpeg": (50.0,)}


def test_config_from_dict_rejects_non_mappings():
    with pytest.raises(ConfigError, match="expected a mapping"):
        config_from_dict(["padim"])
    with pytest.raises(ConfigError, match=r"data: expected a mapping"):
        config_from_dict({"data": "demo_data"})
