"""The jobs' config sections (tasks, fit, scoring, tracking, output) on top of the detectors'."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from jobs.common.config import (
    JOB_SECTIONS,
    JobConfig,
    ScoringConfig,
    TasksConfig,
    TrackingConfig,
    load_job_config,
)
from padim_core.config import ExperimentConfig, config_from_dict, load_config
from padim_core.errors import ConfigError

from support.paths import CONFIGS, DEMO_CONFIG


def test_defaults_without_a_file():
    config = load_job_config()
    assert config == JobConfig() and isinstance(config, ExperimentConfig)
    assert config.padim == ExperimentConfig().padim  # the detectors' sections are padim_core's
    assert (config.tasks.device, config.tasks.num_gpus, config.tasks.num_cpus, config.tasks.max_retries) == ("auto", "auto", 1.0, 2)
    assert config.fit.heatmap_examples == 4
    assert (config.scoring.actors, config.scoring.num_gpus, config.scoring.map_columns) == (1, "auto", False)
    assert config.tracking.tracking_uri is None and config.tracking.alias == "champion"
    assert config.tracking.experiment == "padim" and config.tracking.register_models is True
    assert config.output == "outputs"


@pytest.mark.parametrize("name", ["experiment_config.yaml", "demo.yaml"])
def test_the_shipped_configs_load_and_round_trip(name):
    config = load_job_config(CONFIGS / name)
    plain = config.to_dict()
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(plain)), JobConfig) == config
    # the same file read by padim_core alone, the jobs' sections left to their reader
    core = load_config(CONFIGS / name, others=JOB_SECTIONS)
    assert all(getattr(core, item.name) == getattr(config, item.name) for item in dataclasses.fields(ExperimentConfig))


def test_demo_config_tracks_to_its_own_experiment_and_output():
    config = load_job_config(DEMO_CONFIG)
    assert config.tracking.experiment == "padim-demo" and config.output == "outputs/demo"
    assert config.output_folder.is_absolute() and config.output_folder.name == "demo"


def test_overrides_reach_every_section():
    config = load_job_config(DEMO_CONFIG, [
        "tasks.num_gpus=0.5", "tasks.num_cpus=2", "fit.heatmap_examples=0", "scoring.map_columns=true",
        "tracking.tracking_uri=http://127.0.0.1:5000", "output=elsewhere", "padim.n_features=50",
    ])
    assert config.tasks.num_gpus == 0.5 and config.tasks.num_cpus == 2.0 and isinstance(config.tasks.num_cpus, float)
    assert config.fit.heatmap_examples == 0 and config.scoring.map_columns is True
    assert config.tracking.tracking_uri == "http://127.0.0.1:5000" and config.output == "elsewhere"
    assert config.padim.n_features == 50


BAD_OVERRIDES = [
    ("tasks.device=tpu", ["tasks.device", "tpu", "auto", "cpu", "cuda"]),
    ("tasks.num_gpus=some", ["tasks.num_gpus", "some", "auto"]),
    ("tasks.num_gpus=1.5", ["tasks.num_gpus", "1.5", "whole numbers above 1"]),
    ("tasks.num_gpus=-1", ["tasks.num_gpus", "-1", ">= 0"]),
    ("tasks.num_cpus=-1", ["tasks.num_cpus", "-1", ">= 0"]),
    ("tasks.max_retries=false", ["tasks.max_retries", "False", "integer"]),
    ("fit.heatmap_examples=-1", ["fit.heatmap_examples", "-1", ">= 0"]),
    # keys that moved: the fit section no longer sizes tasks or sets the threshold
    ("fit.num_gpus=1", ["fit.num_gpus", "unknown key", "heatmap_examples"]),
    ("fit.threshold_quantile=0.9", ["fit.threshold_quantile", "unknown key", "heatmap_examples"]),
    ("scoring.actors=0", ["scoring.actors", "0", ">= 1"]),
    ("scoring.num_gpus=2.5", ["scoring.num_gpus", "2.5", "whole numbers above 1"]),
    ("scoring.map_columns=1", ["scoring.map_columns", "1", "true or false"]),
    ("scoring.map_size=0", ["scoring.map_size", "0", ">= 1"]),
    ("tracking.alias=latest", ["tracking.alias", "latest", "reserved"]),
    ("tracking.alias=v3", ["tracking.alias", "v3", "reserved"]),
    ("tracking.alias=my alias", ["tracking.alias", "my alias", "letters, digits"]),
    ("tracking.experiment=", ["tracking.experiment", "None", "non-empty string"]),
    ("tracking.register_models=yes please", ["tracking.register_models", "yes please", "true or false"]),
    ("output=", ["output", "None", "non-empty string"]),
    ("output.path=x", ["output", "'path': 'x'", "non-empty string"]),
    ("paddim.backbone=resnet18", ["paddim", "unknown section", "padim", "tasks", "tracking"]),
]


@pytest.mark.parametrize(("override", "expected"), BAD_OVERRIDES, ids=[case[0] for case in BAD_OVERRIDES])
def test_bad_values_name_the_key_value_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as caught:
        load_job_config(None, [override])
    for text in expected:
        assert text in str(caught.value)


def test_an_override_cannot_descend_into_a_value():
    with pytest.raises(ConfigError, match=r"output\.path=x.*output is not a section"):
        load_job_config(DEMO_CONFIG, ["output.path=x"])


def test_a_cuda_task_needs_gpus():
    with pytest.raises(ConfigError, match=r"tasks\.num_gpus: 0 with tasks\.device 'cuda'"):
        load_job_config(None, ["tasks.device=cuda", "tasks.num_gpus=0"])
    assert TasksConfig(device="cuda", num_gpus=0.25).num_gpus == 0.25


def test_sections_validate_when_built_directly():
    with pytest.raises(ConfigError, match=r"scoring\.batch_size"):
        ScoringConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"tracking\.alias"):
        TrackingConfig(alias="latest")
    with pytest.raises(ConfigError, match=r"padim\.n_features"):
        load_job_config(None, ["padim.n_features=0"])  # the detectors' checks still run
