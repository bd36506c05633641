"""What a scoring job counts as its rows stream past, and how it reports them.

The driver sees every score row once, on its way to the Parquet writer; `Tally` keeps the
counts per category and a bounded sample of scores for the histograms, so the summary and the
MLflow run describe exactly the table that was written, in memory that does not grow with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.common import tracking
from jobs.common.outputs import drift_file
from jobs.score.drift import DriftResult, drift_lines

HISTOGRAM_SAMPLE = 100_000  # scores kept per category for its histogram (a uniform sample beyond that)


class ScoreSample:
    """A uniform sample of at most `capacity` scores (reservoir sampling), for the histograms."""

    def __init__(self, capacity: int = HISTOGRAM_SAMPLE, seed: int = 0) -> None:
        self.capacity = capacity
        self.values = np.empty(0, dtype=np.float32)
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def add(self, scores: np.ndarray) -> None:
        room = max(0, self.capacity - self.values.size)
        self.values = np.concatenate([self.values, scores[:room]])
        rest = scores[room:]
        if rest.size:
            slots = self._rng.integers(0, self.seen + room + np.arange(rest.size) + 1)
            keep = slots < self.capacity
            self.values[slots[keep]] = rest[keep]
        self.seen += scores.size


@dataclass
class CategoryTally:
    scored: int = 0
    errors: int = 0
    anomalous: int = 0
    judged: int = 0  # scored rows with a threshold, the denominator of the anomaly rate
    sample: ScoreSample = field(default_factory=ScoreSample)

    @property
    def anomaly_rate(self) -> float | None:
        return self.anomalous / self.judged if self.judged else None


@dataclass
class Tally:
    """Counts kept by the driver as rows stream past: what the summary and MLflow report."""

    categories: dict[str, CategoryTally] = field(default_factory=dict)
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    error_examples: list[str] = field(default_factory=list)

    def add(self, rows: pa.Table) -> pa.Table:
        """Count a batch of score rows; returns it without the skipped (non-image) rows."""
        skipped = rows.column("skipped")
        for source in rows.filter(skipped).column("source").to_pylist():
            self.skipped += 1
            if len(self.skipped_examples) < 5:
                self.skipped_examples.append(source)
        rows = rows.filter(pc.invert(skipped))
        for category in rows.column("category").unique().to_pylist():
            part = rows.filter(pc.equal(rows["category"], category))
            tally = self.categories.setdefault(category, CategoryTally())
            failed = pc.is_valid(part["error"])
            tally.errors += pc.sum(failed).as_py() or 0
            scores = part.filter(pc.invert(failed))
            tally.scored += scores.num_rows
            flags = scores.column("is_anomalous").drop_null()
            tally.judged += len(flags)
            tally.anomalous += pc.sum(flags).as_py() or 0
            tally.sample.add(scores.column("image_score").to_numpy(zero_copy_only=False).astype(np.float32))
            for message in part.filter(failed).column("error").to_pylist():
                if len(self.error_examples) < 5:
                    self.error_examples.append(message)
        return rows

    @property
    def scored(self) -> int:
        return sum(tally.scored for tally in self.categories.values())

    @property
    def errors(self) -> int:
        return sum(tally.errors for tally in self.categories.values())

    @property
    def images(self) -> int:
        return self.scored + self.errors

    @property
    def anomalous(self) -> int:
        return sum(tally.anomalous for tally in self.categories.values())

    @property
    def anomaly_rate(self) -> float | None:
        judged = sum(tally.judged for tally in self.categories.values())
        return self.anomalous / judged if judged else None


@dataclass
class ScoreSummary:
    """What a finished job reports (and logs to MLflow)."""

    output: Path
    tally: Tally
    models: dict[str, str]
    thresholds: dict[str, float | None]
    seconds: float
    first_rows: tuple[float, int]  # (seconds, images) when the first score rows arrived: start-up
    files: int
    heatmaps: int
    run_id: str
    tracking_uri: str
    experiment_id: str
    ray_stats: str = ""
    drift: list[DriftResult] = field(default_factory=list)  # the drift alarm's verdicts

    @property
    def images_per_second(self) -> float:
        return self.tally.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_second(self) -> float:
        """The rate once the pipeline was running: start-up (worker imports, model loads) left out."""
        seconds, images = self.first_rows
        rest = self.seconds - seconds
        return (self.tally.images - images) / rest if rest > 0 and self.tally.images > images else self.images_per_second

    def categories(self) -> list[dict[str, Any]]:
        ordered = sorted(self.tally.categories.items())
        return [
            {"category": name, "model_uri": self.models.get(name), "scored": tally.scored, "errors": tally.errors,
             "anomalous": tally.anomalous, "anomaly_rate": tally.anomaly_rate}
            for name, tally in ordered
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output), "images": self.tally.images, "scored": self.tally.scored,
            "errors": self.tally.errors, "skipped": self.tally.skipped, "anomalous": self.tally.anomalous,
            "seconds": self.seconds, "images_per_second": self.images_per_second,
            "startup_seconds": self.first_rows[0], "steady_images_per_second": self.steady_images_per_second,
            "files": self.files,
            "heatmaps": self.heatmaps, "models": self.models, "categories": self.categories(),
            "skipped_examples": self.tally.skipped_examples, "error_examples": self.tally.error_examples,
            "mlflow_run_id": self.run_id, "tracking_uri": self.tracking_uri,
            "drift": [result.to_dict() for result in self.drift],
        }


def progress_line(tally: Tally, seconds: float) -> str:
    rate = tally.images / seconds if seconds > 0 else 0.0
    return (f"padim-score: {tally.images} images after {seconds:.0f} s: {tally.scored} scored, {tally.errors} errors, "
            f"{tally.skipped} skipped; {rate:.1f} images/s")


def format_summary(summary: ScoreSummary) -> str:
    tally = summary.tally
    lines = [
        (f"scored {tally.scored} images, {tally.errors} errors, {tally.skipped} non-image files skipped, "
         f"in {summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s; "
         f"{summary.steady_images_per_second:.1f} images/s after {summary.first_rows[0]:.1f} s of start-up)"),
        "",
    ]
    header = ("category", "scored", "errors", "anomalous", "rate", "model")
    rows = [
        (str(row["category"]), str(row["scored"]), str(row["errors"]), str(row["anomalous"]),
         "-" if row["anomaly_rate"] is None else f"{row['anomaly_rate']:.1%}", row["model_uri"] or "-")
        for row in summary.categories()
    ]
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]
    for cells in [header, tuple("-" * width for width in widths), *rows]:
        lines.append("  ".join(cell.ljust(width) if i in (0, 5) else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(cells, widths))).rstrip())
    if tally.error_examples:
        lines += ["", "errors, for example:"] + [f"  {message}" for message in tally.error_examples]
    if tally.skipped_examples:
        lines += ["", "skipped (not images), for example:"] + [f"  {source}" for source in tally.skipped_examples]
    if summary.drift:
        lines += ["", *drift_lines(summary.drift)]
    lines += [
        "",
        f"table:   {summary.output} ({summary.files} files" + (f", {summary.heatmaps} heatmaps" if summary.heatmaps else "") + ")",
        f"drift:   {drift_file(summary.output)}",
        f"MLflow:  run {summary.run_id}; view: {tracking.ui_hint(summary.tracking_uri, summary.experiment_id, summary.run_id)}",
    ]
    return "\n".join(lines)
