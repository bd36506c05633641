"""Split manifests: which images fit, which calibrate, which test; reproducible, checked against
the files' content, and refused with the names of the files when they changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from padim_core.datasets import MvtecCategory
from padim_core.demo_data import build_demo_dataset
from padim_core.errors import DatasetError
from padim_core.manifest import (
    FORMAT,
    category_manifest,
    file_sha256,
    read_manifest,
    split_by_fraction,
    split_with_folder,
)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return build_demo_dataset(tmp_path / "data", train=10, test_good=2, test_defect=1, size=32)


def test_a_seeded_fraction_of_train_good_is_held_out_and_the_rest_fits(data: Path) -> None:
    category = MvtecCategory.from_folder(data / "brick")
    split = split_by_fraction(category, 0.2, seed=0)
    assert split.counts() == {"fit": 8, "calibration": 2, "test": 2 + 4}
    fit, held = set(split.paths("fit")), set(split.paths("calibration"))
    assert not fit & held and fit | held == set(category.train_images)
    assert split.method == "fraction 0.2 of train/good, seed 0"
    assert split == split_by_fraction(category, 0.2, seed=0)  # the same files and seed, the same split
    assert set(split_by_fraction(category, 0.2, seed=1).paths("calibration")) != held
    assert split_by_fraction(category, 0.34, seed=0).counts()["calibration"] == 3  # 3.4
    assert split_by_fraction(category, 0.25, seed=0).counts()["calibration"] == 3  # 2.5: halves round up
    assert split_by_fraction(category, 0.01, seed=0).counts()["calibration"] == 1  # at least one
    entry = split.fit[0]
    assert entry.path == "train/good/000.png" and entry.sha256 == file_sha256(data / "brick" / "train" / "good" / "000.png")
    samples = split.test_samples()
    assert [(s.path, s.defect, s.label, s.mask_path) for s in samples] == [
        (s.path, s.defect, s.label, s.mask_path) for s in category.test_samples
    ]
    assert split.test[-1].mask_sha256 == file_sha256(category.test_samples[-1].mask_path)


def test_a_manifest_reproduces_its_split_exactly(data: Path, tmp_path: Path) -> None:
    category = MvtecCategory.from_folder(data / "brick")
    split = split_by_fraction(category, 0.3, seed=5)
    path = split.save(tmp_path / "manifests" / "brick.json")
    assert json.loads(path.read_text())["format"] == FORMAT
    assert path.read_text().count("\n") > len(split.fit) + len(split.calibration) + len(split.test)  # a line per file
    shutil.copy(data / "brick" / "train" / "good" / "000.png", data / "brick" / "train" / "good" / "new.png")
    again = category_manifest(MvtecCategory.from_folder(data / "brick"), fraction=0.5, seed=0, manifest=str(path.parent))
    assert again == split  # the fraction and seed of the config, and the new image, play no part
    # the same split read where the data now lives
    moved = tmp_path / "moved"
    shutil.copytree(data / "brick", moved)
    assert read_manifest(path, moved).verify().paths("fit")[0] == moved / "train" / "good" / split.fit[0].path.split("/")[-1]


def test_a_manifest_whose_files_changed_is_refused_naming_them(data: Path, tmp_path: Path) -> None:
    split = split_by_fraction(MvtecCategory.from_folder(data / "brick"), 0.2, seed=0)
    path = split.save(tmp_path / "brick.json")
    (data / "brick" / split.calibration[0].path).unlink()
    (data / "brick" / split.fit[1].path).write_bytes(b"other content")
    (data / "brick" / split.test[-1].mask).write_bytes(b"other mask")
    with pytest.raises(DatasetError) as caught:
        category_manifest(MvtecCategory.from_folder(data / "brick"), fraction=0.2, seed=0, manifest=str(path))
    message = str(caught.value)
    assert message.startswith("split manifest of 'brick': 3 files under ")
    assert f"{split.calibration[0].path} (missing)" in message and f"{split.fit[1].path} (content changed)" in message
    assert f"{split.test[-1].mask} (content changed)" in message


def test_many_changed_files_are_counted_and_ten_named(data: Path, tmp_path: Path) -> None:
    split = split_by_fraction(MvtecCategory.from_folder(data / "brick"), 0.2, seed=0)
    shutil.rmtree(data / "brick" / "train")
    with pytest.raises(DatasetError, match=r": 10 files under ") as caught:
        split.verify()
    assert str(caught.value).count("(missing)") == 10 and " more" not in str(caught.value)
    shutil.rmtree(data / "brick" / "test")
    with pytest.raises(DatasetError, match=r"16 files under .* and 6 more; restore them"):
        split.verify()


def test_a_fraction_that_leaves_too_few_images_to_fit_is_refused(tmp_path: Path) -> None:
    root = build_demo_dataset(tmp_path / "data", train=2, test_good=0, test_defect=0, size=32) / "grass"
    one = tmp_path / "one"
    shutil.copytree(root, one)
    (one / "train" / "good" / "001.png").unlink()
    with pytest.raises(DatasetError, match=r"calibration.fraction 0.2 of the 1 images in .* holds out 1 and leaves none to fit on"):
        split_by_fraction(MvtecCategory.from_folder(one), 0.2, seed=0)
    with pytest.raises(DatasetError, match=r"leaves 1 images to fit on; the detector needs at least 2"):
        category_manifest(MvtecCategory.from_folder(root), fraction=0.2, seed=0, min_fit=2)
    assert category_manifest(MvtecCategory.from_folder(root), fraction=0.2, seed=0).counts()["fit"] == 1


def test_a_calibration_folder_calibrates_and_all_of_train_good_fits(data: Path, tmp_path: Path) -> None:
    category = MvtecCategory.from_folder(data / "brick")
    folder = tmp_path / "calibration"
    (folder / "brick").mkdir(parents=True)
    for name in ("000.png", "001.png"):
        shutil.copy(data / "brick" / "test" / "good" / name, folder / "brick" / f"held-{name}")
    split = category_manifest(category, fraction=0.2, seed=0, folder=str(folder))
    assert split.counts() == {"fit": 10, "calibration": 2, "test": 6}
    assert split.calibration[0].path == str(folder / "brick" / "held-000.png")  # outside the category folder: absolute
    assert split.paths("calibration")[0] == folder / "brick" / "held-000.png"
    shutil.copy(data / "brick" / "train" / "good" / "003.png", folder / "brick" / "copy.png")
    with pytest.raises(DatasetError, match=r"1 calibration images are also fit images \(same file or same content\), "
                                           r"e.g. .*copy.png; the fit must never see them"):
        category_manifest(category, fraction=0.2, seed=0, folder=str(folder))
    with pytest.raises(DatasetError, match="does not exist or is not a folder"):
        split_with_folder(MvtecCategory.from_folder(data / "grass"), folder)


def test_manifests_that_cannot_be_used_are_refused(data: Path, tmp_path: Path) -> None:
    category = MvtecCategory.from_folder(data / "brick")
    split = split_by_fraction(category, 0.2, seed=0)
    with pytest.raises(DatasetError, match=r"split manifest .*grass.json for category 'grass' does not exist"):
        category_manifest(MvtecCategory.from_folder(data / "grass"), fraction=0.2, seed=0, manifest=str(tmp_path))
    path = split.save(tmp_path / "brick.json")
    shutil.copy(path, tmp_path / "grass.json")
    with pytest.raises(DatasetError, match="is for category 'brick', not 'grass'"):
        category_manifest(MvtecCategory.from_folder(data / "grass"), fraction=0.2, seed=0, manifest=str(tmp_path))
    values = json.loads(path.read_text())
    path.write_text(json.dumps({**values, "calibration": []}))
    with pytest.raises(DatasetError, match="holds no calibration image"):
        category_manifest(category, fraction=0.2, seed=0, manifest=str(path))
    path.write_text(json.dumps({**values, "fit": [{"path": "train/good/000.png"}]}))
    with pytest.raises(DatasetError, match=r"brick.json: malformed"):
        read_manifest(path, category.root)
    path.write_text("{")
    with pytest.raises(DatasetError, match="brick.json: not JSON"):
        read_manifest(path, category.root)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DatasetError, match="not a padim-split-manifest version 1 file"):
        read_manifest(path, category.root)
