"""Split manifests: which images of a category fit the model, which calibrate it, which test it.

Calibration images are normal images the fit never sees: the conformal threshold
(`padim_core.calibration`) holds only for them. By default a seeded `fraction` of `train/good`
is held out; an explicit folder of normal images, or a manifest written earlier, can say
otherwise. Entries name files relative to the category folder (absolute when they lie outside
it) with their sha256, so a manifest reproduces a split exactly on any machine that has the
same files, and a file that went missing or changed is found before any fitting.

    {"format": "padim-split-manifest", "version": 1, "category": "bottle", "method": "...",
     "fit": [{"path": "train/good/000.png", "sha256": "..."}, ...],
     "calibration": [...],
     "test": [{"path": "test/broken_large/000.png", "sha256": "...", "defect": "broken_large",
               "label": 1, "mask": "ground_truth/broken_large/000_mask.png", "mask_sha256": "..."}, ...]}
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from padim_core.datasets import NORMAL_DEFECT, MvtecCategory, TestSample, list_images
from padim_core.errors import DatasetError
from padim_core.safe_write import write_file

FORMAT = "padim-split-manifest"
VERSION = 1
ROLES = ("fit", "calibration", "test")
_SHOWN = 10  # files named in an error at most


@dataclass(frozen=True)
class Entry:
    """One file of a split: where it is (relative to the category folder), its content hash,
    and for test images the defect, label and mask."""

    path: str
    sha256: str
    defect: str | None = None
    label: int | None = None
    mask: str | None = None
    mask_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value is not None}


@dataclass(frozen=True)
class SplitManifest:
    """A category's split; `root` is the category folder its relative paths are read under."""

    category: str
    root: Path
    method: str
    fit: tuple[Entry, ...]
    calibration: tuple[Entry, ...]
    test: tuple[Entry, ...]

    def paths(self, role: str) -> list[Path]:
        """The files of `fit`, `calibration` or `test`, resolved under `root`."""
        return [self._resolve(entry.path) for entry in getattr(self, role)]

    def test_samples(self) -> list[TestSample]:
        return [
            TestSample(self._resolve(entry.path), entry.defect or NORMAL_DEFECT, int(entry.label or 0),
                       None if entry.mask is None else self._resolve(entry.mask))
            for entry in self.test
        ]

    def counts(self) -> dict[str, int]:
        return {role: len(getattr(self, role)) for role in ROLES}

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "category": self.category, "method": self.method,
                **{role: [entry.to_dict() for entry in getattr(self, role)] for role in ROLES}}

    def to_json(self) -> str:
        """JSON with one line per file, so a diff of two manifests shows which files moved."""
        values = self.to_dict()
        head = ",\n".join(f" {json.dumps(key)}: {json.dumps(values[key])}" for key in values if key not in ROLES)
        lists = ",\n".join(
            f" {json.dumps(role)}: [" + ",".join(f"\n  {json.dumps(item)}" for item in values[role]) + ("\n ]" if values[role] else "]")
            for role in ROLES
        )
        return "{\n" + head + ",\n" + lists + "\n}\n"

    def save(self, path: str | Path) -> Path:
        return write_file(path, self.to_json())

    def adding_fit(self, images: Sequence[Path]) -> SplitManifest:
        """This split with `images` added to its fit images (new normal images of an update)."""
        added = tuple(_entry(self.root, Path(path)) for path in images)
        return replace(self, method=f"{self.method}; {len(added)} images added", fit=self.fit + added)

    def at(self, root: str | Path) -> SplitManifest:
        """The same split read under another category folder (the data moved or is mounted elsewhere)."""
        return replace(self, root=Path(root))

    def verify(self) -> SplitManifest:
        """Every file exists under `root` with the hash the manifest names; else a `DatasetError` naming them."""
        problems = []
        for role in ROLES:
            for entry in getattr(self, role):
                for path, digest in ((entry.path, entry.sha256), (entry.mask, entry.mask_sha256)):
                    if path is None:
                        continue
                    found = self._resolve(path)
                    if not found.is_file():
                        problems.append(f"{path} (missing)")
                    elif digest is not None and file_sha256(found) != digest:
                        problems.append(f"{path} (content changed)")
        if problems:
            shown = ", ".join(problems[:_SHOWN]) + (f" and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else "")
            raise DatasetError(
                f"split manifest of {self.category!r}: {len(problems)} files under {self.root} are not as the manifest "
                f"says: {shown}; restore them, or fit without this manifest to make a new split"
            )
        return self

    def check(self, min_fit: int = 1) -> SplitManifest:
        """At least `min_fit` fit images and one calibration image, and no calibration image
        (by path or by content) among the fit images."""
        if len(self.fit) < min_fit:
            raise DatasetError(f"split of {self.category!r} ({self.method}) leaves {len(self.fit)} images to fit on; "
                               f"the detector needs at least {min_fit}")
        if not self.calibration:
            raise DatasetError(f"split of {self.category!r} ({self.method}) holds no calibration image; "
                               "hold out normal images with calibration.fraction, calibration.folder or calibration.manifest")
        fit_paths = {self._resolve(entry.path) for entry in self.fit}
        fit_hashes = {entry.sha256 for entry in self.fit}
        shared = [entry.path for entry in self.calibration
                  if self._resolve(entry.path) in fit_paths or entry.sha256 in fit_hashes]
        if shared:
            raise DatasetError(f"split of {self.category!r}: {len(shared)} calibration images are also fit images "
                               f"(same file or same content), e.g. {shared[0]}; the fit must never see them")
        return self

    def _resolve(self, path: str) -> Path:
        return self.root / path


# ------------------------------------------------------------------------------- making
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _entry(root: Path, path: Path) -> Entry:
    return Entry(_relative(root, path), file_sha256(path))


def _relative(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path.resolve())


def _test_entries(category: MvtecCategory) -> tuple[Entry, ...]:
    return tuple(
        replace(_entry(category.root, sample.path), defect=sample.defect, label=sample.label,
                mask=None if sample.mask_path is None else _relative(category.root, sample.mask_path),
                mask_sha256=None if sample.mask_path is None else file_sha256(sample.mask_path))
        for sample in category.test_samples
    )


def split_by_fraction(category: MvtecCategory, fraction: float, seed: int) -> SplitManifest:
    """Hold out fraction * n of `train/good` (rounded half up, at least one), chosen by a generator
    seeded with `seed`, for calibration; the rest fit. The same files and seed give the same split."""
    if not 0 < fraction < 1:
        raise DatasetError(f"calibration.fraction must be in (0, 1), got {fraction!r}")
    images = sorted(category.train_images)
    held = max(1, math.floor(fraction * len(images) + 0.5))
    if held >= len(images):
        raise DatasetError(
            f"calibration.fraction {fraction:g} of the {len(images)} images in {category.root / 'train' / NORMAL_DEFECT} "
            f"holds out {held} and leaves none to fit on; lower calibration.fraction or add training images"
        )
    chosen = set(np.random.default_rng(seed).permutation(len(images))[:held].tolist())
    entries = [_entry(category.root, path) for path in images]
    return SplitManifest(
        category.name, category.root, f"fraction {fraction:g} of train/good, seed {seed}",
        fit=tuple(entry for i, entry in enumerate(entries) if i not in chosen),
        calibration=tuple(entry for i, entry in enumerate(entries) if i in chosen),
        test=_test_entries(category),
    )


def split_with_folder(category: MvtecCategory, folder: str | Path) -> SplitManifest:
    """All of `train/good` fits; the normal images in `folder/<category>/` calibrate."""
    images = list_images(Path(folder) / category.name)
    if not images:
        raise DatasetError(f"calibration folder {Path(folder) / category.name} holds no images")
    return SplitManifest(
        category.name, category.root, f"calibration folder {Path(folder) / category.name}",
        fit=tuple(_entry(category.root, path) for path in sorted(category.train_images)),
        calibration=tuple(_entry(category.root, path) for path in images),
        test=_test_entries(category),
    )


# ------------------------------------------------------------------------------ reading
def read_manifest(path: str | Path, root: str | Path) -> SplitManifest:
    """A manifest file, read under the category folder `root`; not yet verified."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except OSError as error:
        raise DatasetError(f"split manifest {path}: cannot be read ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"split manifest {path}: not JSON ({error})") from None
    if not isinstance(values, dict) or values.get("format") != FORMAT or values.get("version") != VERSION:
        raise DatasetError(f"split manifest {path}: not a {FORMAT} version {VERSION} file")
    try:
        roles = {role: tuple(Entry(**item) for item in values[role]) for role in ROLES}
        for entry in (entry for entries in roles.values() for entry in entries):
            if not isinstance(entry.path, str) or not isinstance(entry.sha256, str):
                raise TypeError(f"entry {entry.to_dict()} needs a path and a sha256")
        return SplitManifest(str(values["category"]), Path(root), str(values["method"]), **roles)
    except (KeyError, TypeError) as error:
        raise DatasetError(f"split manifest {path}: malformed ({error})") from None


def manifest_file(source: str | Path, category: str) -> Path:
    """The manifest of `category` in `source`: the file itself, or `<category>.json` in a folder."""
    source = Path(source)
    path = source / f"{category}.json" if source.is_dir() else source
    if not path.is_file():
        raise DatasetError(f"split manifest {path} for category {category!r} does not exist")
    return path


def category_manifest(category: MvtecCategory, *, fraction: float, seed: int, folder: str | None = None,
                      manifest: str | None = None, min_fit: int = 1) -> SplitManifest:
    """The split of `category` as the `calibration` config section describes it: from a manifest
    file or folder (verified against the files), a calibration folder, or a seeded fraction;
    checked for at least `min_fit` fit images, a calibration image, and no overlap."""
    if manifest is not None:
        found = read_manifest(manifest_file(manifest, category.name), category.root)
        if found.category != category.name:
            raise DatasetError(f"split manifest {manifest} is for category {found.category!r}, not {category.name!r}")
        split = found.verify()
    elif folder is not None:
        split = split_with_folder(category, folder)
    else:
        split = split_by_fraction(category, fraction, seed)
    return split.check(min_fit)

