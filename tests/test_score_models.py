"""jobs.score_models: which model scores which category, and the clear errors when none can."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.score_models import ModelError, resolve_models
from padim_core.model import PadimModel


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    model = PadimModel("efficientnet_lite0", ["blocks.1", "blocks.2"], n_features=20, image_size=64)
    model.fit([torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))]).calibrate(1.5)
    for name in ("bottle", "cable"):
        model.save(folder / f"{name}.safetensors")
    (folder / "notes.txt").write_text("not a model")
    return folder


def resolve(tmp_path: Path, **arguments: str | None) -> dict:
    values = {"model": None, "category": None, "models": None}
    values.update(arguments)
    return resolve_models(**values, alias="champion", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", scratch=tmp_path)


def test_a_folder_gives_one_model_per_safetensors_file(models_dir: Path, tmp_path: Path) -> None:
    catalog = resolve(tmp_path, models=str(models_dir))
    assert sorted(catalog) == ["bottle", "cable"]
    entry = catalog["cable"]
    assert entry.uri == str(models_dir / "cable.safetensors") and entry.threshold == 1.5
    assert entry.transform.image_size == (64, 64)
    assert list(resolve(tmp_path, models=str(models_dir), category="bottle")) == ["bottle"]
    assert list(resolve(tmp_path, models=f"file://{models_dir}")) == ["bottle", "cable"]


def test_one_model_file_needs_its_category(models_dir: Path, tmp_path: Path) -> None:
    catalog = resolve(tmp_path, model=str(models_dir / "bottle.safetensors"), category="screw")
    assert list(catalog) == ["screw"]
    with pytest.raises(ModelError, match="needs --category"):
        resolve(tmp_path, model=str(models_dir / "bottle.safetensors"))


def test_missing_and_broken_models_are_refused_with_the_reason(models_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such model file"):
        resolve(tmp_path, model=str(tmp_path / "absent.safetensors"), category="bottle")
    with pytest.raises(ModelError, match="has no model for category 'screw'; it has: \\['bottle', 'cable'\\]"):
        resolve(tmp_path, models=str(models_dir), category="screw")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bottle.safetensors").write_bytes((models_dir / "bottle.safetensors").read_bytes()[:1000])
    with pytest.raises(ModelError, match="'bottle' .* is not usable: .*truncated"):
        resolve(tmp_path, models=str(broken))
    with pytest.raises(ModelError, match="either --model"):
        resolve(tmp_path)


def test_registry_without_matching_models_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no registered model padim-<category> with alias 'champion'.*jobs.fit"):
        resolve(tmp_path, models="registry")
    with pytest.raises(ModelError, match="not found in the MLflow registry"):
        resolve(tmp_path, model="models:/padim-bottle@champion", category="bottle")
    with pytest.raises(ModelError, match="expected models:/NAME@ALIAS"):
        resolve(tmp_path, model="models:/padim-bottle", category="bottle")
