"""The detectors side by side: per category and detector, accuracy, speed, size and memory, and
which domain shifts break each first, from what `padim-fit` and `padim-shift` left in an output
folder. Written to `OUTPUT/comparison/` (report.md, comparison.csv, comparison.png) as a whole."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from padim_core.errors import PadimError
from padim_core.robustness import verdicts
from padim_core.safe_write import StagedFolder
from padim_core.viz import comparison_figure

FOLDER = "comparison"
COLUMNS = {
    "image_auroc": ("Image AUROC", ".3f"), "pixel_auroc": ("Pixel AUROC", ".3f"), "aupro": ("AUPRO", ".3f"),
    "threshold": ("Threshold", ".4g"), "fit_seconds": ("Fit s", ".1f"),
    "fit_images_per_second": ("Fit img/s", ".1f"), "predict_images_per_second": ("Predict img/s", ".1f"),
    "model_size_mb": ("Model MB", ".1f"), "peak_rss_mb": ("Peak RSS MB", ".0f"),
}
"""metrics.json figure -> (its title, its format), in the order the report shows them."""


class ComparisonError(PadimError):
    """An output folder that holds nothing to compare."""


def comparison_rows(output: Path) -> list[dict[str, Any]]:
    """One row per (category, detector) that `padim-fit` fitted, with its figures, and the shifts
    that break it first when `padim-shift` results exist."""
    metrics_file = output / "metrics.json"
    try:
        fitted = json.loads(metrics_file.read_text())["categories"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ComparisonError(f"{metrics_file}: no padim-fit figures to compare ({error})") from None
    shifted = _shift_rows(output)
    rows = []
    for category, detectors in sorted(fitted.items()):
        for detector, figures in sorted(detectors.items()):
            if figures.get("status") != "ok":
                continue
            row = {"category": category, "detector": detector, **{key: figures.get(key) for key in COLUMNS}}
            found = shifted.get((category, detector))
            row["breaks_first"] = None if found is None else breaks_first(found["figures"], found["tolerance"])
            rows.append(row)
    if not rows:
        raise ComparisonError(f"{metrics_file}: no successful fit to compare")
    return rows


def _shift_rows(output: Path) -> dict[tuple[str, str], dict[str, Any]]:
    results = output / "shift" / "results.json"
    if not results.is_file():
        return {}
    found = {}
    for row in json.loads(results.read_text()):
        if row.get("status") == "ok" and row.get("figures"):
            found[row["category"], row["detector"]] = {"figures": row["figures"], "tolerance": row.get("tolerance", 0.05)}
    return found


def breaks_first(figures: Sequence[Mapping[str, Any]], tolerance: float) -> str:
    """`shift (severity)` for the shifts that break ranking, first first; or that none does."""
    broken = [f"{v.shift} ({v.ranking_breaks_at})" for v in verdicts(figures, tolerance) if v.ranking_breaks_at is not None]
    return ", ".join(broken) if broken else "none"


def report_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    titles = [title for title, _ in COLUMNS.values()]
    lines = [
        "# Detectors side by side", "",
        ("Per category and detector, from `metrics.json` (padim-fit) and `shift/results.json` (padim-shift, when it "
         "ran): test-split accuracy, the threshold, fitting and scoring speed, the model file's size and the fit "
         "task's peak memory; the last column lists the shifts that break each model, first first, with the severity "
         "at which they do."), "",
        "![figures per category and detector](comparison.png)", "",
        "| category | detector | " + " | ".join(titles) + " | breaks first |",
        "|---|---|" + "---|" * len(titles) + "---|",
    ]
    for row in rows:
        cells = ["-" if row[key] is None else format(row[key], spec) for key, (_, spec) in COLUMNS.items()]
        breaks = "not measured" if row["breaks_first"] is None else row["breaks_first"]
        lines.append(f"| {row['category']} | {row['detector']} | " + " | ".join(cells) + f" | {breaks} |")
    return "\n".join(lines) + "\n"


def write_comparison(output: Path, rows: list[dict[str, Any]] | None = None) -> Path:
    """Write `OUTPUT/comparison/` from the output folder's figures (`rows`, when already read);
    returns the folder."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rows = comparison_rows(output) if rows is None else rows
    folder = output / FOLDER
    with StagedFolder(folder) as staged:
        pacsv.write_csv(pa.Table.from_pylist(rows), staged.path / "comparison.csv")
        (staged.path / "comparison.png").write_bytes(comparison_figure(rows, {key: title for key, (title, _) in COLUMNS.items()}))
        (staged.path / "report.md").write_text(report_markdown(rows))
    return folder
