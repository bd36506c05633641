"""The offline demo data set: deterministic, in the MVTec layout, exact masks, written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from padim_core import demo_data
from padim_core.datasets import MvtecCategory, discover_categories
from padim_core.demo_data import DEFECTS, TEXTURE_TINTS, build_demo_dataset, main
from padim_core.images import load_mask

TINY = {"train": 3, "test_good": 2, "test_defect": 2, "size": 48}


def files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "data", **TINY)


def test_layout_is_an_mvtec_dataset(tiny: Path) -> None:
    assert discover_categories(tiny) == sorted(TEXTURE_TINTS) == ["brick", "grass", "gravel"]
    for name in TEXTURE_TINTS:
        category = MvtecCategory.from_folder(tiny / name)
        assert len(category.train_images) == TINY["train"]
        assert sorted({s.defect for s in category.test_samples}) == sorted(("good", *DEFECTS))
        assert len(category.test_samples) == TINY["test_good"] + len(DEFECTS) * TINY["test_defect"]
        for path in (*category.train_images, *(s.path for s in category.test_samples)):
            with Image.open(path) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (48, 48))


def test_masks_are_non_empty_exactly_for_defective_images(tiny: Path) -> None:
    for name in TEXTURE_TINTS:
        for sample in MvtecCategory.from_folder(tiny / name).test_samples:
            assert (sample.mask_path is not None) == (sample.label == 1) == (sample.defect != "good")
            if sample.mask_path is not None:
                pixels = np.asarray(Image.open(sample.mask_path))
                assert pixels.shape == (48, 48) and set(np.unique(pixels)) == {0, 255}
                assert 0 < load_mask(sample.mask_path, (48, 48)).mean() < 0.3


def test_mask_holds_every_changed_pixel(tiny: Path) -> None:
    """Rebuild each defect's clean crop (same generator): outside the mask not one byte differs."""
    photo, tint = skimage.data.brick(), np.array(TEXTURE_TINTS["brick"])
    for defect_index, defect in enumerate(DEFECTS):
        rng = np.random.default_rng([0, 0, 2 + defect_index, 0])  # seed 0, brick, this defect, image 0
        clean = np.rint(demo_data._normal_crop(photo, tint, TINY["size"], rng) * 255).astype(np.uint8)
        image = np.asarray(Image.open(tiny / "brick" / "test" / defect / "000.png"))
        mask = np.asarray(Image.open(tiny / "brick" / "ground_truth" / defect / "000_mask.png")) > 0
        assert np.array_equal(image[~mask], clean[~mask]), defect
        assert (image[mask] != clean[mask]).any(axis=1).mean() > 0.5, defect  # and the defect shows


def test_same_seed_same_bytes(tiny: Path, tmp_path: Path) -> None:
    again = build_demo_dataset(tmp_path / "again", **TINY)
    assert files(again) == files(tiny)
    other = build_demo_dataset(tmp_path / "other", **TINY, seed=1)
    assert files(other).keys() == files(tiny).keys() and files(other) != files(tiny)


def test_refuses_a_non_empty_output(tmp_path: Path) -> None:
    output = tmp_path / "data"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{output}.*overwrite"):
        build_demo_dataset(output, **TINY)
    assert files(output) == {"keep.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging folder left behind


def test_overwrite_and_empty_output(tmp_path: Path) -> None:
    output = tmp_path / "data"
    output.mkdir()
    build_demo_dataset(output, **TINY)  # an empty folder is fine
    (output / "keep.txt").write_text("old")
    build_demo_dataset(output, **TINY, overwrite=True)
    assert not (output / "keep.txt").exists() and (output / "brick" / "train" / "good" / "000.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo_data, "_save", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        build_demo_dataset(tmp_path / "data", **TINY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [{"train": 0}, {"size": 16}, {"test_good": -1}, {"seed": -1}])
def test_bad_counts(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_demo_dataset(tmp_path / "data", **{**TINY, **bad})


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "data"
    args = [str(output), "--train", "2", "--test-good", "1", "--test-defect", "1", "--size", "32", "--seed", "3"]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert str(output.resolve()) in summary and "brick, grass, gravel" in summary and "2 train" in summary
    assert len(MvtecCategory.from_folder(output / "grass").test_samples) == 1 + len(DEFECTS)

    with pytest.raises(SystemExit) as refused:
        main(args)
    assert refused.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0

    with pytest.raises(SystemExit) as bad:
        main([str(tmp_path / "x"), "--train", "0"])
    assert bad.value.code == 2 and "--train" in capsys.readouterr().err
