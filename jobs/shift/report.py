"""The domain-shift report: per category, which shifts break it first, in Markdown with plots.

A shift *breaks ranking* at the first severity where the image or pixel AUROC falls more than
`tolerance` below the unshifted figure, and *breaks the threshold* at the first severity where
the false-positive or false-negative rate at the calibrated threshold rises more than
`tolerance` above it. Shifts are ranked by the severity at which they break ranking, then by
how far the image AUROC fell there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from padim_core.robustness import FIGURES, verdicts
from padim_core.shifts import SHIFTS
from padim_core.viz import severity_figure

PANELS = {
    "image_auroc": "Image AUROC", "pixel_auroc": "Pixel AUROC",
    "false_positive_rate": "False-positive rate", "false_negative_rate": "False-negative rate",
}
"""Figure -> its title in plots and tables, in the order they are shown."""

Row = Mapping[str, Any]  # one padim_core.robustness.ShiftFigures as a dict


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _level(row: Row) -> str:
    return "-" if row["level"] is None else f"{row['level']:g}"


def summary_sentence(category_rows: Sequence[Row], tolerance: float) -> str:
    """Which shifts break the category, in order, and which it withstands."""
    found = verdicts(category_rows, tolerance)
    levels = {(row["shift"], row["severity"]): row for row in category_rows}
    broken = [v for v in found if v.ranking_breaks_at is not None]
    parts = []
    if broken:
        described = [
            f"{v.shift} at severity {v.ranking_breaks_at} (level {_level(levels[v.shift, v.ranking_breaks_at])}: image AUROC "
            f"{_number(levels[v.shift, v.ranking_breaks_at]['image_auroc'])}, pixel AUROC "
            f"{_number(levels[v.shift, v.ranking_breaks_at]['pixel_auroc'])})"
            for v in broken
        ]
        parts.append(f"Breaks first under **{described[0]}**" + (f", then {'; '.join(described[1:])}." if described[1:] else "."))
    held = [v.shift for v in found if v.ranking_breaks_at is None]
    if held:
        parts.append(f"Holds within {tolerance:g} AUROC at every level tried under {', '.join(held)}.")
    threshold = sorted((v for v in found if v.threshold_breaks_at is not None), key=lambda v: v.threshold_breaks_at)
    if threshold:
        first = threshold[0]
        row = levels[first.shift, first.threshold_breaks_at]
        parts.append(
            f"The calibrated threshold fails first under {first.shift} at severity {first.threshold_breaks_at} "
            f"(false-positive rate {_number(row['false_positive_rate'])}, false-negative rate {_number(row['false_negative_rate'])})."
        )
    return " ".join(parts)


def figures_table(category_rows: Sequence[Row]) -> str:
    """A Markdown table: the unshifted row once, then every shift and severity."""
    header = ["shift", "severity", "level", *PANELS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    baseline = [row for row in category_rows if row["severity"] == 0][:1]
    for row in [*baseline, *(row for row in category_rows if row["severity"] > 0)]:
        name = "(none)" if row["severity"] == 0 else row["shift"]
        cells = [name, str(row["severity"]), _level(row), *(_number(row[key]) for key in PANELS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def category_plot(category: str, category_rows: Sequence[Row]) -> bytes:
    """Every figure against severity, one line per shift, as PNG bytes."""
    panels: dict[str, dict[str, tuple[list[int], list[float | None]]]] = {}
    for key, title in PANELS.items():
        lines: dict[str, tuple[list[int], list[float | None]]] = {}
        for row in category_rows:
            severities, values = lines.setdefault(row["shift"], ([], []))
            severities.append(row["severity"])
            values.append(row[key])
        if any(value is not None for _, values in lines.values() for value in values):
            panels[title] = lines
    return severity_figure(panels, f"{category}: figures under domain shift")


def compare_table(category_rows: Sequence[Row], compared_rows: Sequence[Row], labels: tuple[str, str]) -> str:
    """A Markdown table of two configs' figures on the same shifts: `first / second` in each cell."""
    header = ["shift", "severity", "level", *(f"{title} ({labels[0]} / {labels[1]})" for title in PANELS.values())]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    other = {(row["shift"], row["severity"]): row for row in compared_rows}
    baseline = [row for row in category_rows if row["severity"] == 0][:1]
    for row in [*baseline, *(row for row in category_rows if row["severity"] > 0)]:
        twin = other.get((row["shift"], row["severity"]))
        if twin is None:
            continue
        name = "(none)" if row["severity"] == 0 else row["shift"]
        cells = [name, str(row["severity"]), _level(row), *(f"{_number(row[key])} / {_number(twin[key])}" for key in PANELS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(
    results: Sequence[Mapping[str, Any]], shifts: Mapping[str, Sequence[float]], seed: int, tolerance: float,
    plots: Mapping[str, str], source: str, label: str = "defaults",
) -> str:
    """The whole report: settings, then per category a summary, its plot and its table (and, with
    a compared config, its summary, plot and a side-by-side table)."""
    lines = [
        "# Domain shift report", "",
        (f"Models: {source}. Seed {seed}; a shift *breaks* a category when the image or pixel AUROC falls more than "
         f"{tolerance:g} below the unshifted figure (ranking), or the false-positive or false-negative rate at the "
         f"calibrated threshold rises more than {tolerance:g} (threshold). Severity 0 is the unshifted test split."), "",
        "| shift | levels (severity 1, 2, ...) | unit |", "|---|---|---|",
    ]
    lines += [f"| {name} | {', '.join(f'{v:g}' for v in levels)} | {SHIFTS[name].unit} |" for name, levels in shifts.items()]
    for result in results:
        lines += ["", f"## {result['category']} ({result['detector']})", ""]
        if result["status"] != "ok":
            lines.append(f"Not evaluated: {result['error']}")
            continue
        rows = result["figures"]
        baseline = next(row for row in rows if row["severity"] == 0)
        lines.append(
            f"{result['n_test']} test images; model {result['model_uri']}. Unshifted: image AUROC {_number(baseline['image_auroc'])}, "
            f"pixel AUROC {_number(baseline['pixel_auroc'])}; at the calibrated threshold ({_number(result['threshold'])}) "
            f"false-positive rate {_number(baseline['false_positive_rate'])}, false-negative rate "
            f"{_number(baseline['false_negative_rate'])}."
        )
        lines += ["", summary_sentence(rows, tolerance), ""]
        unit = f"{result['category']}/{result['detector']}"
        if unit in plots:
            lines += [f"![{unit}: figures against severity]({plots[unit]})", ""]
        lines.append(figures_table(rows))
        compare = result.get("compare")
        if compare:
            title = f"{unit} ({compare['config']})"
            other = compare["figures"]
            first = next(row for row in other if row["severity"] == 0)
            lines += [
                "", f"### Side by side: {label} / {compare['config']}", "",
                (f"Compared model {compare['model_uri']}. Unshifted: image AUROC {_number(first['image_auroc'])}, pixel "
                 f"AUROC {_number(first['pixel_auroc'])}; at its calibrated threshold ({_number(compare['threshold'])}) "
                 f"false-positive rate {_number(first['false_positive_rate'])}, false-negative rate "
                 f"{_number(first['false_negative_rate'])}."),
                "", f"{compare['config']}: {summary_sentence(other, tolerance)}", "",
            ]
            if title in plots:
                lines += [f"![{title}: figures against severity]({plots[title]})", ""]
            lines.append(compare_table(rows, other, (label, compare["config"])))
    return "\n".join(lines) + "\n"


def flat_metrics(category_rows: Sequence[Row]) -> dict[str, float | None]:
    """`shift/<name>/<severity>/<figure>` for MLflow: the same names for every category."""
    return {f"shift/{row['shift']}/{row['severity']}/{key}": row[key] for row in category_rows for key in FIGURES}
