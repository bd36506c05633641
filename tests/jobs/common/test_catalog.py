"""jobs.common.catalog: which model scores which category, and the clear errors when none can."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.common.catalog import ModelError, model_path, resolve_models
from padim_core.calibration import Calibration
from padim_core.detector import KINDS
from padim_core.errors import PadimError
from padim_core.padim import PadimModel


@pytest.fixture(scope="module")
def models_dir(tiny_padim_file: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<folder>/padim/<category>.safetensors` for bottle and cable, as jobs.fit writes them (threshold 1.5)."""
    folder = tmp_path_factory.mktemp("models")
    model = PadimModel.load(tiny_padim_file).calibrate(Calibration("fixed", 1.5, (1.0, 1.2)))
    for name in ("bottle", "cable"):
        model.save(model_path(folder, "padim", name))
    (folder / "padim" / "notes.txt").write_text("not a model")
    (folder / "padim" / ".bottle.safetensors.tmp").write_text("a temporary file of an interrupted save")
    return folder


def resolve(tmp_path: Path, **arguments: str | None) -> dict:
    values = {"model": None, "category": None, "models": None, "detector": "padim"}
    values.update(arguments)
    return resolve_models(**values, alias="champion", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", scratch=tmp_path)


def test_model_path_is_detector_then_category(tmp_path: Path) -> None:
    assert model_path(tmp_path, "padim", "bottle") == tmp_path / "padim" / "bottle.safetensors"
    assert model_path(str(tmp_path), "patchcore", "cable") == tmp_path / "patchcore" / "cable.safetensors"


def test_a_models_folder_gives_one_model_per_category_of_the_detector(models_dir: Path, tmp_path: Path) -> None:
    catalog = resolve(tmp_path, models=str(models_dir))
    assert sorted(catalog) == ["bottle", "cable"]
    entry = catalog["cable"]
    assert entry.uri == str(models_dir / "padim" / "cable.safetensors") and entry.file == models_dir / "padim" / "cable.safetensors"
    assert entry.detector == "padim" and entry.category == "cable"
    assert entry.threshold == 1.5 and entry.calibration.scores == (1.0, 1.2)
    assert entry.transform.image_size == (64, 64)
    assert list(resolve(tmp_path, models=str(models_dir), category="bottle")) == ["bottle"]
    assert list(resolve(tmp_path, models=f"file://{models_dir}")) == ["bottle", "cable"]


def test_a_flat_folder_of_model_files_works_too(models_dir: Path, tmp_path: Path) -> None:
    catalog = resolve(tmp_path, models=str(models_dir / "padim"))
    assert sorted(catalog) == ["bottle", "cable"] and catalog["bottle"].detector == "padim"


def test_a_folder_without_the_chosen_detector_says_which_it_has(models_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(KINDS, "other", "padim_core.padim:PadimModel")
    with pytest.raises(ModelError, match=f"--models {models_dir} has no other models \\(it has: padim\\); choose the detector"):
        resolve(tmp_path, models=str(models_dir), detector="other")


def test_one_model_file_needs_its_category(models_dir: Path, tmp_path: Path) -> None:
    catalog = resolve(tmp_path, model=str(models_dir / "padim" / "bottle.safetensors"), category="screw")
    assert list(catalog) == ["screw"] and catalog["screw"].threshold == 1.5
    with pytest.raises(ModelError, match="needs --category"):
        resolve(tmp_path, model=str(models_dir / "padim" / "bottle.safetensors"))


def test_missing_and_broken_models_are_refused_with_the_reason(models_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such model file"):
        resolve(tmp_path, model=str(tmp_path / "absent.safetensors"), category="bottle")
    with pytest.raises(ModelError, match="has no model for category 'screw'; it has: \\['bottle', 'cable'\\]"):
        resolve(tmp_path, models=str(models_dir), category="screw")
    with pytest.raises(ModelError, match="no such folder"):
        resolve(tmp_path, models=str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bottle.safetensors").write_bytes((models_dir / "padim" / "bottle.safetensors").read_bytes()[:1000])
    with pytest.raises(ModelError, match="'bottle' .* is not usable: .*truncated"):
        resolve(tmp_path, models=str(broken))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no <category>.safetensors files"):
        resolve(tmp_path, models=str(empty))
    with pytest.raises(ModelError, match="either --model"):
        resolve(tmp_path)
    with pytest.raises(ModelError, match="either --model"):
        resolve(tmp_path, model="a.safetensors", models=str(models_dir))


def test_registry_without_matching_models_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no registered model padim-<category> with alias 'champion'.*jobs.fit"):
        resolve(tmp_path, models="registry")
    with pytest.raises(ModelError, match="no registered model padim-bottle with alias 'champion'"):
        resolve(tmp_path, models="models:/", category="bottle")
    with pytest.raises(ModelError, match="not found in the MLflow registry"):
        resolve(tmp_path, model="models:/padim-bottle@champion", category="bottle")
    with pytest.raises(ModelError, match="expected models:/NAME@ALIAS"):
        resolve(tmp_path, model="models:/padim-bottle", category="bottle")
    with pytest.raises(ModelError, match="use 'registry'"):
        resolve(tmp_path, models="models:/padim-bottle@champion")


def test_model_errors_are_padim_errors() -> None:
    assert issubclass(ModelError, PadimError)
