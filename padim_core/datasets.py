"""Where the images are: the MVTec AD folder layout, and plain folders of images.

MVTec AD layout, per category:

    <root>/<category>/train/good/*.png                        normal training images
    <root>/<category>/test/<defect>/*.png                     "good" is normal (label 0), others label 1
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png   defect masks
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from padim_core.errors import DatasetError
from padim_core.image_files import is_image_name

NORMAL_DEFECT = "good"
EXPECTED_LAYOUT = "<root>/<category>/train/good/<images>, with optional test/<defect>/ and ground_truth/<defect>/"


@dataclass(frozen=True)
class TestSample:
    """One test image; `mask_path` is None for normal images and for defective ones without a mask.

    A defective image with no mask still counts for image-level metrics; whether it is left
    out of pixel metrics or scored against an empty mask is the caller's decision.
    """

    __test__ = False  # the name starts with "Test": keep pytest from collecting it

    path: Path
    defect: str
    label: int
    mask_path: Path | None


@dataclass(frozen=True)
class MvtecCategory:
    """One category of an MVTec-AD-style dataset; `root` is the category's own folder."""

    name: str
    root: Path
    train_images: tuple[Path, ...]
    test_samples: tuple[TestSample, ...]

    @classmethod
    def from_folder(cls, folder: str | Path) -> MvtecCategory:
        """Read a category folder. The test split is optional; `train/good` must hold images.

        Test images are read from `test/<defect>/` only; images lying directly in `test/` are ignored.
        """
        root = Path(folder)
        train_folder = root / "train" / NORMAL_DEFECT
        if not train_folder.is_dir():
            raise DatasetError(
                f"{root} is not an MVTec category: {train_folder} is missing (expected {EXPECTED_LAYOUT})"
            )
        train_images = tuple(list_images(train_folder))
        if not train_images:
            raise DatasetError(f"no training images in {train_folder}")
        return cls(name=root.name, root=root, train_images=train_images, test_samples=tuple(_test_samples(root)))


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under `folder` (by suffix, any case), sorted.

    Hidden files and, when recursive, hidden folders (names starting with ".") are skipped, so
    `.DS_Store`-style debris and `.ipynb_checkpoints` never become training images. Symlinked
    sub-folders are not followed.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a folder")
    images = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if recursive and not name.startswith(".")]
        images.extend(Path(directory, name) for name in files if not name.startswith(".") and is_image_name(name))
    return sorted(images)


def discover_categories(root: str | Path) -> list[str]:
    """Sorted names of the category folders under `root` (those with a `train/good` folder)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    names = sorted(
        entry.name
        for entry in root.iterdir()
        if not entry.name.startswith(".") and (entry / "train" / NORMAL_DEFECT).is_dir()
    )
    if not names:
        raise DatasetError(f"no categories found in {root}: expected {EXPECTED_LAYOUT}")
    return names


def _test_samples(root: Path) -> list[TestSample]:
    test_folder = root / "test"
    if not test_folder.is_dir():
        return []
    samples = []
    defects = sorted(entry.name for entry in test_folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    for defect in defects:
        label = int(defect != NORMAL_DEFECT)
        for path in list_images(test_folder / defect, recursive=False):
            mask_path = root / "ground_truth" / defect / f"{path.stem}_mask.png"
            has_mask = label == 1 and mask_path.is_file()
            samples.append(TestSample(path=path, defect=defect, label=label, mask_path=mask_path if has_mask else None))
    return samples
