"""The drift alarm of jobs.score: do a job's images still look like each model's calibration images?

The driver sees every score row once. `DriftCounter` keeps, per (category, input), how many rows
fall on each of the n + 1 conformal p-value levels of the category's model: n + 1 integers, so
memory does not grow with the table. Once the table is written, `padim_core.drift.drift_test`
runs on each category's counts over the whole job, and over each input when the job had
several. The verdicts go to the printed summary, the MLflow run and `<output>.drift.json`. The
alarm never changes a score or a decision.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.common.outputs import drift_file
from jobs.common.tracking import metric_segment
from padim_core.calibration import Calibration
from padim_core.drift import DriftTest, level_counts, levels_of_p_values
from padim_core.safe_write import write_file


@dataclass(frozen=True)
class DriftResult:
    """The test of one category's images: over the whole job (`input` None) or one input."""

    category: str
    input: str | None  # as given on the command line
    index: int | None  # its position among the inputs
    test: DriftTest

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "input": self.input, **self.test.to_dict()}


@dataclass
class DriftCounter:
    """Level counts per (category, input index) of the rows scored by conformal models."""

    calibrations: Mapping[str, Calibration | None]
    counts: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)

    def add(self, rows: pa.Table) -> None:
        """Count scored rows (`row_schema`, skipped rows removed); rows without a p-value are left out."""
        scored = rows.filter(pc.is_valid(rows["p_value"]))
        if scored.num_rows == 0:
            return
        keys = pa.table({"category": scored["category"], "input": scored["input"]}).group_by(["category", "input"])
        for group in keys.aggregate([]).to_pylist():
            category, index = group["category"], group["input"]
            calibration = self.calibrations.get(category)
            if calibration is None or not calibration.is_conformal:
                continue
            mask = pc.and_(pc.equal(scored["category"], category), pc.equal(scored["input"], index))
            p_values = scored.filter(mask).column("p_value").to_numpy()
            found = level_counts(levels_of_p_values(p_values, calibration.count), calibration.count)
            key = (category, index)
            self.counts[key] = self.counts.get(key, 0) + found

    def results(self, inputs: Sequence[str], settings: Any, scored: Mapping[str, int]) -> list[DriftResult]:
        """Per category with scored images (`scored`: category -> count), the job's test, then one
        per input when there are several inputs; `settings` is the config's `drift` section."""
        found = []
        for category in sorted(name for name, count in scored.items() if count):
            calibration = self.calibrations.get(category)
            by_input = {index: counts for (name, index), counts in sorted(self.counts.items()) if name == category}
            if calibration is None or not calibration.is_conformal:
                note = "the model has no conformal calibration"
                test = DriftTest(scored[category], 0, settings.trim, settings.defect_share, settings.alpha, None, None,
                                 None, note)
                found.append(DriftResult(category, None, None, test))
                continue
            total = sum(by_input.values(), np.zeros(calibration.count + 1, dtype=np.int64))
            found.append(DriftResult(category, None, None, settings.test(total, calibration.count)))
            if len(inputs) > 1:
                found += [DriftResult(category, inputs[index], index, settings.test(counts, calibration.count))
                          for index, counts in by_input.items()]
        return found


# ------------------------------------------------------------------------------ reporting
def write_drift_file(output: Path, results: Sequence[DriftResult], job_id: str, settings: Any) -> Path:
    report = {
        "table": str(output), "job_id": job_id,
        "test": {"statistic": f"mean conformal p-value after dropping the smallest {settings.trim:g}",
                 "defects_allowed": f"up to {settings.defect_share:g} of the images",
                 "alarm": f"one-sided Monte Carlo p-value below {settings.alpha:g} ({settings.draws} draws, seed "
                          f"{settings.seed})", "min_images": settings.min_images},
        "results": [result.to_dict() for result in results],
    }
    return write_file(drift_file(output), json.dumps(report, indent=2) + "\n")


def drift_lines(results: Sequence[DriftResult]) -> list[str]:
    """The summary's drift table."""
    if not results:
        return []
    test = results[0].test
    header = ("category", "input", "images", "statistic", "p-value", "verdict")
    rows = [
        (result.category, result.input or "(whole job)", str(result.test.images),
         "-" if result.test.statistic is None else f"{result.test.statistic:.3f}",
         "-" if result.test.p_value is None else f"{result.test.p_value:.4f}", result.test.verdict)
        for result in results
    ]
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]
    lines = [(f"drift: do the images look like each model's calibration images? (mean p-value after dropping the "
              f"smallest {test.trim:g}; up to {test.defect_share:g} defects allowed; alarm when the test's p-value < "
              f"{test.alpha:g})")]
    for cells in [header, tuple("-" * width for width in widths), *rows]:
        lines.append("  ".join(cell.ljust(width) if i in (0, 1, 5) else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(cells, widths))).rstrip())
    return lines


def drift_metrics(results: Sequence[DriftResult]) -> tuple[dict[str, float | None], dict[str, str]]:
    """MLflow metrics `<category>/drift_statistic|drift_p_value|drift_alarm` (per input:
    `<category>/input_<i>/...`, i the position in the run's `inputs` param) and tags `drift/<category>`."""
    metrics: dict[str, float | None] = {}
    tags: dict[str, str] = {}
    for result in results:
        name = metric_segment(result.category)
        prefix = name if result.index is None else f"{name}/input_{result.index}"
        test = result.test
        metrics.update({f"{prefix}/drift_statistic": test.statistic, f"{prefix}/drift_p_value": test.p_value,
                        f"{prefix}/drift_alarm": None if test.alarm is None else float(test.alarm)})
        if result.index is None:
            tags[f"drift/{name}"] = test.verdict
    alarms = sorted({result.category for result in results if result.test.alarm})
    metrics["drift_alarms"] = len(alarms)
    tags["drift"] = f"ALARM: {', '.join(alarms)}" if alarms else "no alarm"
    return metrics, tags

