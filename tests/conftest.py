"""Shared fixtures. Real test data lives outside the repo: `PADIM_TEST_DATA`, default `../shared/data`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _require_folder(folder: Path) -> Path:
    """Skip when test data is absent, but fail under CI, where missing data is a broken setup."""
    if not folder.is_dir():
        message = f"test data folder {folder} not found (set PADIM_TEST_DATA to the folder holding mvtec_ad/)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return folder


@pytest.fixture(scope="session")
def test_data_root() -> Path:
    """The folder holding the real test data sets."""
    return _require_folder(Path(os.environ.get("PADIM_TEST_DATA", REPO_ROOT.parent / "shared" / "data")))


@pytest.fixture(scope="session")
def mvtec_root(test_data_root: Path) -> Path:
    """Real MVTec AD data (at least the bottle category)."""
    return _require_folder(test_data_root / "mvtec_ad")
