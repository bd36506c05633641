"""jobs.score.summary: what the driver counts as rows stream past, and the summary it prints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs.score.drift import DriftResult
from jobs.score.summary import (
    ScoreSample,
    ScoreSummary,
    Tally,
    format_summary,
    progress_line,
)
from jobs.score.table import row_schema
from padim_core.drift import DriftTest


def test_score_sample_keeps_everything_up_to_capacity_then_a_uniform_sample() -> None:
    sample = ScoreSample(capacity=100)
    sample.add(np.arange(60, dtype=np.float32))
    sample.add(np.arange(60, 80, dtype=np.float32))
    assert sorted(sample.values.tolist()) == list(range(80))
    for start in range(80, 10_000, 500):
        sample.add(np.arange(start, start + 500, dtype=np.float32))
    assert sample.values.size == 100 and sample.seen == 10_080
    assert 3_000 < sample.values.mean() < 7_000  # drawn from the whole range, not the first 100


def rows() -> pa.Table:
    schema = row_schema(False, False)
    values = {name: [None] * 5 for name in schema.names}
    values.update(
        source=list("abcde"), category=["bottle", "bottle", "bottle", "cable", "bottle"],
        image_score=[1.0, 3.0, None, 2.0, None], is_anomalous=[False, True, None, None, None],
        error=[None, None, "bad", None, None], skipped=[False, False, False, False, True],
    )
    return pa.table(values, schema=schema)


def test_tally_counts_scored_errors_skipped_and_anomalies_per_category() -> None:
    tally = Tally()
    kept = tally.add(rows())
    assert kept.num_rows == 4 and tally.skipped == 1 and tally.skipped_examples == ["e"]
    bottle, cable = tally.categories["bottle"], tally.categories["cable"]
    assert (bottle.scored, bottle.errors, bottle.anomalous, bottle.anomaly_rate) == (2, 1, 1, 0.5)
    assert (cable.scored, cable.anomaly_rate) == (1, None)  # no threshold: no rate
    assert tally.error_examples == ["bad"] and sorted(bottle.sample.values.tolist()) == [1.0, 3.0]
    assert (tally.images, tally.scored, tally.errors, tally.anomalous, tally.anomaly_rate) == (4, 3, 1, 1, 0.5)


def test_the_summary_describes_the_table_that_was_written(tmp_path: Path) -> None:
    tally = Tally()
    tally.add(rows())
    summary = ScoreSummary(
        tmp_path / "scores", tally, {"bottle": "models:/padim-bottle/3", "cable": "/m/cable.safetensors"},
        {"bottle": 2.0, "cable": None}, seconds=10.0, first_rows=(6.0, 2), files=2, heatmaps=0,
        run_id="abc", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_id="1",
        drift=[DriftResult("bottle", None, None, DriftTest(2, 42, 0.2, 0.1, 0.01, None, None, None, "2 images, fewer than 10"))],
    )
    assert summary.images_per_second == 0.4 and summary.steady_images_per_second == 0.5  # 2 images in the last 4 s
    plain = summary.to_dict()
    assert (plain["images"], plain["scored"], plain["errors"], plain["skipped"], plain["files"]) == (4, 3, 1, 1, 2)
    assert plain["categories"][0] == {"category": "bottle", "model_uri": "models:/padim-bottle/3", "scored": 2,
                                      "errors": 1, "anomalous": 1, "anomaly_rate": 0.5}
    text = format_summary(summary)
    assert text.startswith("scored 3 images, 1 errors, 1 non-image files skipped, in 10.0 s")
    header, rule, bottle, cable = (line.split() for line in text.splitlines()[2:6])
    assert header == ["category", "scored", "errors", "anomalous", "rate", "model"] and set("".join(rule)) == {"-"}
    assert bottle == ["bottle", "2", "1", "1", "50.0%", "models:/padim-bottle/3"]
    assert cable == ["cable", "1", "0", "0", "-", "/m/cable.safetensors"]
    assert "errors, for example:\n  bad" in text and f"table:   {tmp_path / 'scores'} (2 files)" in text
    assert "\nbottle    (whole job)       2          -        -  not tested: 2 images, fewer than 10\n" in text
    assert f"drift:   {tmp_path / 'scores.drift.json'}" in text and plain["drift"][0]["verdict"].startswith("not tested")
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in text
    assert progress_line(tally, 2.0) == "padim-score: 4 images after 2 s: 3 scored, 1 errors, 1 skipped; 2.0 images/s"
