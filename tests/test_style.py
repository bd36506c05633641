"""The code style of the whole tree, as `ruff check` sees it with the settings in pyproject.toml."""

from __future__ import annotations

import subprocess

from support.paths import BIN, REPO_ROOT


def test_ruff_finds_nothing() -> None:
    result = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
