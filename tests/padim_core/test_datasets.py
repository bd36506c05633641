"""The MVTec AD layout and plain image folders, on small fake trees and on the real bottle category."""

from __future__ import annotations

from pathlib import Path

import pytest

from padim_core.datasets import (
    DatasetError,
    MvtecCategory,
    TestSample,
    discover_categories,
    list_images,
)


def touch(root: Path, *names: str) -> None:
    """Empty files are enough: listing goes by name and never decodes."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def test_list_images_filters_and_sorts(tmp_path: Path) -> None:
    touch(tmp_path, "b.png", "A.JPG", "c.txt", ".hidden.png", "sub/d.tiff", ".cache/e.png", "sub/.f.bmp")
    assert list_images(tmp_path) == [tmp_path / "A.JPG", tmp_path / "b.png", tmp_path / "sub" / "d.tiff"]
    assert list_images(tmp_path, recursive=False) == [tmp_path / "A.JPG", tmp_path / "b.png"]
    assert list_images(str(tmp_path / "sub")) == [tmp_path / "sub" / "d.tiff"]


def test_list_images_empty_and_missing(tmp_path: Path) -> None:
    assert list_images(tmp_path) == []
    with pytest.raises(DatasetError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    touch(tmp_path, "file.png")
    with pytest.raises(DatasetError, match="file.png"):
        list_images(tmp_path / "file.png")


def fake_category(root: Path) -> Path:
    touch(
        root,
        "train/good/000.png",
        "train/good/001.png",
        "test/good/000.png",
        "test/crack/000.png",
        "test/crack/001.png",
        "test/crack/notes.txt",
        "test/stray.png",
        "ground_truth/crack/000_mask.png",
        "ground_truth/good/000_mask.png",
    )
    return root


def test_category_from_folder(tmp_path: Path) -> None:
    root = fake_category(tmp_path / "widget")
    category = MvtecCategory.from_folder(root)
    assert (category.name, category.root) == ("widget", root)
    assert category.train_images == (root / "train/good/000.png", root / "train/good/001.png")
    assert category.test_samples == (
        TestSample(root / "test/crack/000.png", "crack", 1, root / "ground_truth/crack/000_mask.png"),
        TestSample(root / "test/crack/001.png", "crack", 1, None),  # defective but no mask
        TestSample(root / "test/good/000.png", "good", 0, None),  # normal: never a mask
    )


def test_category_without_test_split(tmp_path: Path) -> None:
    touch(tmp_path, "train/good/000.png")
    assert MvtecCategory.from_folder(str(tmp_path)).test_samples == ()


def test_category_needs_training_images(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"train/good is missing"):
        MvtecCategory.from_folder(tmp_path)
    (tmp_path / "train" / "good").mkdir(parents=True)
    touch(tmp_path, "train/good/readme.txt")
    with pytest.raises(DatasetError, match=r"no training images in .*train/good"):
        MvtecCategory.from_folder(tmp_path)


def test_category_is_immutable(tmp_path: Path) -> None:
    category = MvtecCategory.from_folder(fake_category(tmp_path))
    with pytest.raises(AttributeError):
        category.name = "other"  # type: ignore[misc]
    assert hash(category.test_samples[0])


def test_discover_categories(tmp_path: Path) -> None:
    fake_category(tmp_path / "zeta")
    fake_category(tmp_path / "alpha")
    fake_category(tmp_path / ".trash")
    touch(tmp_path, "notes/readme.txt", "file.png")
    assert discover_categories(tmp_path) == ["alpha", "zeta"]


def test_discover_categories_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="missing"):
        discover_categories(tmp_path / "missing")
    touch(tmp_path, "widget/test/good/000.png")
    with pytest.raises(DatasetError, match=r"no categories found .*<root>/<category>/train/good"):
        discover_categories(tmp_path)


def test_real_bottle_category(mvtec_root: Path) -> None:
    assert "bottle" in discover_categories(mvtec_root)
    bottle = MvtecCategory.from_folder(mvtec_root / "bottle")
    assert len(bottle.train_images) == 209
    assert len(bottle.test_samples) == 83
    good = [s for s in bottle.test_samples if s.label == 0]
    defective = [s for s in bottle.test_samples if s.label == 1]
    assert len(good) == 20 and {s.defect for s in good} == {"good"}
    assert len(defective) == 63
    assert {s.defect for s in defective} == {"broken_large", "broken_small", "contamination"}
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in defective)
    assert all(s.mask_path is None for s in good)
    assert all(s.mask_path.name == f"{s.path.stem}_mask.png" for s in defective)
