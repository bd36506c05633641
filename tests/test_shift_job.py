"""jobs.shift end to end on the demo data, after jobs.fit: embedded Ray, the default SQLite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.csv as pacsv
import pytest
from mlflow import MlflowClient

from jobs import shift, shift_report
from padim_core.demo_data import build_demo_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
FAST = ["--set", "padim.image_size=64", "--set", "fit.heatmap_examples=0", "--set", "data.batch_size=8"]
SHIFTS = ["--set", "shift.shifts={blur: [2, 12], noise: [0.05]}", "--set", "shift.seed=1"]


def run_job(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return subprocess.run([sys.executable, "-m", module, "--config", str(CONFIG), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def figures(folder: Path) -> dict[tuple[str, str, int], dict]:
    rows = pacsv.read_csv(folder / "figures.csv").to_pylist()
    return {(row["category"], row["shift"], row["severity"]): row for row in rows}


@pytest.mark.slow
def test_shift_job_reproduces_the_fit_and_reports_what_breaks(tmp_path: Path) -> None:
    data = build_demo_dataset(tmp_path / "data", train=10, test_good=4, test_defect=2, size=64)
    output = tmp_path / "out"
    common = ["--data-root", str(data), "--output", str(output), *FAST]
    fitted = run_job("jobs.fit", *common, cwd=tmp_path)
    assert fitted.returncode == 0, (fitted.stdout + fitted.stderr)[-5000:]
    fit_metrics = json.loads((output / "metrics.json").read_text())["categories"]
    (output / "models" / "gravel.safetensors").unlink()  # gravel now has no model file: it fails alone

    first = run_job("jobs.shift", *common, *SHIFTS, cwd=tmp_path)
    log = first.stdout + first.stderr
    assert first.returncode == 1, log[-5000:]
    assert "1 categories FAILED" in log and "[3/3]" in log
    report = output / "shift"
    table = figures(report)
    assert len(table) == 2 * (2 + 3)  # brick and grass: severity 0 of each shift, then 3 shifted variants
    for category in ("brick", "grass"):
        for name in ("blur", "noise"):
            unshifted = table[category, name, 0]
            assert unshifted["image_auroc"] == fit_metrics[category]["image_auroc"]
            assert unshifted["pixel_auroc"] == fit_metrics[category]["pixel_auroc"]
        assert table[category, "blur", 2]["level"] == 12
        assert table[category, "blur", 2]["pixel_auroc"] < table[category, "blur", 0]["pixel_auroc"] - 0.02
    markdown = (report / "report.md").read_text()
    assert "## brick" in markdown and "![brick: figures against severity](brick.png)" in markdown
    assert "## gravel\n\nNot evaluated: ModelError" in markdown and "no model for category 'gravel'" in markdown
    assert "Breaks first under **blur" in markdown or "Holds within" in markdown
    assert sorted(path.name for path in report.iterdir()) == ["brick.png", "figures.csv", "grass.png", "report.md", "results.json"]

    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("padim-demo").experiment_id
    parent = client.search_runs([experiment], "tags.job = 'jobs.shift'")[0]
    assert parent.info.status == "FAILED"
    children = {run.data.tags["category"]: run for run in client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert children["gravel"].info.status == "FAILED" and "gravel" in children["gravel"].data.tags["error"]
    brick = children["brick"]
    assert brick.info.status == "FINISHED"
    assert brick.data.metrics["shift/blur/2/pixel_auroc"] == pytest.approx(table["brick", "blur", 2]["pixel_auroc"])
    assert set(brick.data.metrics) >= {f"shift/noise/1/{key}" for key in shift_report.PANELS}
    assert [item.path for item in client.list_artifacts(brick.info.run_id, "shift")] == ["shift/brick.png", "shift/summary.md"]
    assert "report/report.md" in {item.path for item in client.list_artifacts(parent.info.run_id, "report")}

    # The registered models (padim-<category>@champion) give the same figures: reproducible,
    # and the same models whether read from files or from the registry.
    second = run_job("jobs.shift", *common, *SHIFTS, "--models", "registry", cwd=tmp_path)
    assert second.returncode == 0, (second.stdout + second.stderr)[-5000:]
    again = figures(report)
    assert {key: row for key, row in again.items() if key[0] != "gravel"} == table
    results = {result["category"]: result for result in json.loads((report / "results.json").read_text())}
    assert results["brick"]["model_uri"] == "models:/padim-brick/1"
    assert not [path for path in output.iterdir() if path.name.startswith(".shift")]


def test_missing_models_folder_fails_each_category_with_the_reason(tmp_path: Path) -> None:
    """The task itself, without Ray: it must never raise."""
    data = build_demo_dataset(tmp_path / "data", train=2, test_good=1, test_defect=1, size=32)
    request = shift.ShiftRequest("brick", str(data / "brick"), str(tmp_path / "nowhere"), "champion",
                                 f"sqlite:///{tmp_path / 'mlflow.db'}", {"blur": (1.0,)}, 0, 8, 1, "cpu", 1)
    result = shift.shift_category(request)
    assert result["status"] == "failed" and result["figures"] == []
    assert result["error"].startswith("ModelError: ") and "nowhere: no such folder" in result["error"]


def test_report_ranks_the_shifts_that_break_first() -> None:
    def row(name: str, severity: int, image: float, pixel: float, fpr: float = 0.0, fnr: float = 0.0) -> dict:
        return {"shift": name, "severity": severity, "level": None if severity == 0 else float(severity),
                "image_auroc": image, "pixel_auroc": pixel, "false_positive_rate": fpr, "false_negative_rate": fnr}

    rows = [
        row("blur", 0, 1.0, 0.98), row("blur", 1, 0.99, 0.97), row("blur", 2, 0.80, 0.90),
        row("noise", 0, 1.0, 0.98), row("noise", 1, 0.90, 0.97), row("noise", 2, 0.70, 0.90),
        row("brightness", 0, 1.0, 0.98), row("brightness", 1, 1.0, 0.98, fpr=0.5), row("brightness", 2, 0.99, 0.98, fpr=1.0),
        row("jpeg", 0, 1.0, 0.98), row("jpeg", 1, 1.0, 0.91), row("jpeg", 2, 1.0, 0.90),
    ]
    found = shift_report.verdicts(rows, tolerance=0.05)
    assert [(v.shift, v.ranking_breaks_at, v.threshold_breaks_at) for v in found] == [
        ("noise", 1, None), ("jpeg", 1, None), ("blur", 2, None), ("brightness", None, 1),
    ]
    sentence = shift_report.summary_sentence(rows, tolerance=0.05)
    assert sentence.startswith("Breaks first under **noise at severity 1 (level 1: image AUROC 0.900, pixel AUROC 0.970)**")
    assert "Holds within 0.05 AUROC at every level tried under brightness." in sentence
    assert "threshold fails first under brightness at severity 1 (false-positive rate 0.500" in sentence
    table = shift_report.figures_table(rows).splitlines()
    assert table[2].startswith("| (none) | 0 | - | 1.000 | 0.980 |") and len(table) == 2 + 1 + 8
    assert shift_report.flat_metrics(rows[:2])["shift/blur/1/pixel_auroc"] == 0.97


def test_a_report_that_fails_midway_leaves_the_previous_one(tmp_path: Path) -> None:
    from padim_core.config import load_config

    config = load_config(CONFIG, ["shift.shifts={blur: [2]}"])
    rows = [{"shift": "blur", "severity": severity, "level": level, "image_auroc": auroc, "pixel_auroc": 0.9,
             "false_positive_rate": 0.1, "false_negative_rate": 0.0} for severity, level, auroc in ((0, None, 1.0), (1, 2.0, 0.8))]
    good = {"category": "brick", "status": "ok", "error": None, "figures": rows, "n_test": 12,
            "model_uri": "models/brick.safetensors", "threshold": 1.5, "seconds": 1.0}
    folder = shift.write_report(tmp_path, [good], config, "models")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert "Breaks first under **blur at severity 1" in before["report.md"].decode()
    # Fails at the last file (results.json: a set is not JSON), after the plot, table and report.
    broken = {**good, "figures": [{**row, "image_auroc": 0.5} for row in rows], "seconds": {1.0}}
    with pytest.raises(TypeError, match="not JSON serializable"):
        shift.write_report(tmp_path, [broken], config, "models")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["shift"]  # no staging folder left behind
