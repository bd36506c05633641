"""Files a job writes beside its output, at paths another job may print."""

from __future__ import annotations

from pathlib import Path

DRIFT_SUFFIX = ".drift.json"


def drift_file(output: Path) -> Path:
    """`<output>.drift.json`, padim-score's drift verdicts beside the table folder: inside it,
    every Parquet reader of the folder would try to read it as a table file."""
    return output.with_name(output.name + DRIFT_SUFFIX)
