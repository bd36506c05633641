"""jobs.score.drift: counting score rows per category and input as they stream past, the verdicts
per category and job (and per input), and where they are reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs.common.config import DriftConfig
from jobs.common.outputs import drift_file
from jobs.score.drift import (
    DriftCounter,
    drift_lines,
    drift_metrics,
    write_drift_file,
)
from jobs.score.table import row_schema
from padim_core.calibration import Calibration
from padim_core.drift import drift_test, level_counts

RNG = np.random.default_rng(0)
BOTTLE = Calibration.conformal(RNG.normal(size=42), 1 / 43)
CABLE = Calibration("fixed", 1.0, (0.5, 0.7))  # an older model: no conformal calibration


def rows(category: str, scores: np.ndarray, calibration: Calibration, input_index: int) -> pa.Table:
    """Score rows as the actors emit them (skipped rows already gone); one row failed to decode."""
    schema = row_schema(False, False)
    count = len(scores) + 1
    p_values = calibration.p_values(scores).tolist() if calibration.is_conformal else [None] * len(scores)
    values = {name: [None] * count for name in schema.names}
    values.update(source=[f"/in/{i}.png" for i in range(count)], category=[category] * count, input=[input_index] * count,
                  image_score=[*scores.tolist(), None], p_value=[*p_values, None], skipped=[False] * count,
                  error=[None] * len(scores) + ["cannot decode"])
    return pa.table(values, schema=schema)


def test_counts_per_category_and_input_give_the_same_test_as_the_scores() -> None:
    settings = DriftConfig(draws=2000)
    first, second = RNG.normal(size=30), RNG.normal(1.5, 1, size=25)  # the second input drifted
    counter = DriftCounter({"bottle": BOTTLE, "cable": CABLE})
    counter.add(rows("bottle", first[:10], BOTTLE, 0))
    counter.add(pa.concat_tables([rows("bottle", first[10:], BOTTLE, 0), rows("bottle", second, BOTTLE, 1),
                                  rows("cable", RNG.normal(size=12), CABLE, 1)]))
    assert sorted(counter.counts) == [("bottle", 0), ("bottle", 1)]
    assert counter.counts[("bottle", 0)].sum() == 30 and counter.counts[("bottle", 1)].sum() == 25

    results = counter.results(["a.tar", "b.tar"], settings, {"bottle": 55, "cable": 12, "screw": 0})
    assert [(r.category, r.input, r.index) for r in results] == [
        ("bottle", None, None), ("bottle", "a.tar", 0), ("bottle", "b.tar", 1), ("cable", None, None)]
    whole = drift_test(level_counts(BOTTLE.exceeding(np.concatenate([first, second])), 42), 42, draws=2000)
    assert results[0].test == whole
    assert results[1].test.alarm is False and results[2].test.alarm is True
    assert results[3].test.verdict == "not tested: the model has no conformal calibration" and results[3].test.images == 12
    # one input: no per-input lines
    assert len(counter.results(["a.tar"], settings, {"bottle": 55})) == 1


def test_verdicts_are_printed_logged_and_written_beside_the_table(tmp_path: Path) -> None:
    settings = DriftConfig(draws=500, min_images=5)
    counter = DriftCounter({"bottle": BOTTLE, "metal nut": BOTTLE})
    counter.add(rows("bottle", RNG.normal(2, 1, size=20), BOTTLE, 0))
    counter.add(rows("metal nut", RNG.normal(size=3), BOTTLE, 0))
    results = counter.results(["in/"], settings, {"bottle": 20, "metal nut": 3})

    lines = drift_lines(results)
    assert lines[0].startswith("drift: do the images look like each model's calibration images? (mean p-value after "
                               "dropping the smallest 0.5; up to 0.1 defects allowed; alarm when the test's p-value < 0.01)")
    assert lines[1].split() == ["category", "input", "images", "statistic", "p-value", "verdict"]
    assert lines[3].split()[:3] == ["bottle", "(whole", "job)"] and lines[3].endswith("ALARM")
    assert lines[4].split()[:4] == ["metal", "nut", "(whole", "job)"] and lines[4].endswith("not tested: 3 images, fewer than 5")

    metrics, tags = drift_metrics(results)
    assert metrics["bottle/drift_alarm"] == 1.0 and metrics["bottle/drift_p_value"] == results[0].test.p_value
    assert metrics["metal nut/drift_alarm"] is None and metrics["drift_alarms"] == 1
    assert tags == {"drift/bottle": "ALARM", "drift/metal nut": "not tested: 3 images, fewer than 5", "drift": "ALARM: bottle"}

    output = tmp_path / "scores"
    path = write_drift_file(output, results, "job1", settings)
    assert path == drift_file(output) == tmp_path / "scores.drift.json"
    report = json.loads(path.read_text())
    assert report["table"] == str(output) and report["job_id"] == "job1"
    assert [item["verdict"] for item in report["results"]] == ["ALARM", "not tested: 3 images, fewer than 5"]
    assert report["results"][0]["p_value"] == results[0].test.p_value and report["test"]["min_images"] == 5
    assert report["test"]["defects_allowed"] == "up to 0.1 of the images" and report["results"][0]["defect_share"] == 0.1
