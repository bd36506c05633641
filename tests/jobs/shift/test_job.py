"""jobs.shift: end to end on the demo data after jobs.fit (embedded Ray, the default SQLite store),
one unit's task without Ray, and the report written as a whole or not at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.csv as pacsv
import pytest
from mlflow import MlflowClient

from jobs.common.config import load_job_config
from jobs.common.runner import FAILED, Unit
from jobs.shift import job as shift
from jobs.shift import report as shift_report
from padim_core.demo_data import build_demo_dataset

from support.paths import BIN, DEMO_CONFIG
from support.servers import local_env

FAST = ["--set", "padim.image_size=64", "--set", "fit.heatmap_examples=0", "--set", "data.batch_size=8"]
SHIFTS = ["--set", "shift.shifts={blur: [2, 12], noise: [0.05]}", "--set", "shift.seed=1"]


def run_job(command: list[str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*command, "--config", str(DEMO_CONFIG), *args],
                          cwd=cwd, env=local_env(), capture_output=True, text=True, check=False, timeout=600)


def figures(folder: Path) -> dict[tuple[str, str, int], dict]:
    rows = pacsv.read_csv(folder / "figures.csv").to_pylist()
    return {(row["category"], row["shift"], row["severity"]): row for row in rows}


@pytest.mark.slow
def test_shift_job_reproduces_the_fit_and_reports_what_breaks(tmp_path: Path) -> None:
    data = build_demo_dataset(tmp_path / "data", train=10, test_good=4, test_defect=2, size=64)
    output = tmp_path / "out"
    common = ["--data-root", str(data), "--output", str(output), *FAST]
    fitted = run_job([str(BIN / "padim-fit")], *common, "--categories", "brick,grass", cwd=tmp_path)
    assert fitted.returncode == 0, (fitted.stdout + fitted.stderr)[-5000:]
    fit_metrics = {name: kinds["padim"] for name, kinds in json.loads((output / "metrics.json").read_text())["categories"].items()}
    assert sorted(path.name for path in (output / "models" / "padim").iterdir()) == ["brick.safetensors", "grass.safetensors"]
    # every category of the data root is evaluated: gravel has no model, so it fails alone

    first = run_job([sys.executable, "-m", "jobs.shift"], *common, *SHIFTS, cwd=tmp_path)
    log = first.stdout + first.stderr
    assert first.returncode == 1, log[-5000:]
    assert "; 1 FAILED" in log and "[3/3]" in log
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
    assert "## brick (padim)" in markdown and "![brick/padim: figures against severity](brick-padim.png)" in markdown
    assert "## gravel (padim)\n\nNot evaluated: ModelError" in markdown and "no model for category 'gravel'" in markdown
    assert "Breaks first under **blur" in markdown or "Holds within" in markdown
    assert sorted(path.name for path in report.iterdir()) == [
        "brick-padim.png", "figures.csv", "grass-padim.png", "report.md", "results.json"]
    assert {row["detector"] for row in pacsv.read_csv(report / "figures.csv").to_pylist()} == {"padim"}

    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("padim-demo").experiment_id
    parent = client.search_runs([experiment], "tags.job = 'jobs.shift'")[0]
    assert parent.info.status == "FAILED"
    children = {run.data.tags["category"]: run for run in client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert {run.info.run_name for run in children.values()} == {"brick-padim", "grass-padim", "gravel-padim"}
    assert children["gravel"].info.status == "FAILED" and "gravel" in children["gravel"].data.tags["error"]
    brick = children["brick"]
    assert brick.info.status == "FINISHED"
    assert brick.data.metrics["shift/blur/2/pixel_auroc"] == pytest.approx(table["brick", "blur", 2]["pixel_auroc"])
    assert set(brick.data.metrics) >= {f"shift/noise/1/{key}" for key in shift_report.PANELS}
    assert [item.path for item in client.list_artifacts(brick.info.run_id, "shift")] == ["shift/brick-padim.png", "shift/summary.md"]
    assert "report/report.md" in {item.path for item in client.list_artifacts(parent.info.run_id, "report")}

    # The registered model (padim-brick@champion) gives the same figures: reproducible, and the
    # same model whether read from a file or from the registry.
    second = run_job([str(BIN / "padim-shift")], *common, *SHIFTS, "--models", "registry", "--categories", "brick",
                     cwd=tmp_path)
    assert second.returncode == 0, (second.stdout + second.stderr)[-5000:]
    again = figures(report)
    assert again == {key: row for key, row in table.items() if key[0] == "brick"}
    results = {result["category"]: result for result in json.loads((report / "results.json").read_text())}
    assert list(results) == ["brick"] and results["brick"]["model_uri"] == "models:/padim-brick/1"
    assert not [path for path in output.iterdir() if path.name.startswith(".shift")]


def test_missing_models_folder_fails_each_category_with_the_reason(tmp_path: Path) -> None:
    """The task itself, without Ray: it must never raise."""
    data = build_demo_dataset(tmp_path / "data", train=2, test_good=1, test_defect=1, size=32)
    request = shift.ShiftRequest(Unit("brick", "padim"), str(data / "brick"), str(tmp_path / "nowhere"), "champion",
                                 f"sqlite:///{tmp_path / 'mlflow.db'}", {"blur": (1.0,)}, 0, 8, 1, "cpu", 1)
    result = shift.shift_unit(request)
    assert result.status == FAILED and result.values == {} and (result.category, result.detector) == ("brick", "padim")
    assert result.error.startswith("ModelError: ") and "nowhere: no such folder" in result.error
    row = shift.as_row(result)
    assert row["figures"] == [] and row["status"] == "failed" and row["error"] == result.error


def test_a_report_that_fails_midway_leaves_the_previous_one(tmp_path: Path) -> None:
    config = load_job_config(DEMO_CONFIG, ["shift.shifts={blur: [2]}"])
    rows = [{"shift": "blur", "severity": severity, "level": level, "image_auroc": auroc, "pixel_auroc": 0.9,
             "false_positive_rate": 0.1, "false_negative_rate": 0.0} for severity, level, auroc in ((0, None, 1.0), (1, 2.0, 0.8))]
    good = {"category": "brick", "detector": "padim", "status": "ok", "error": None, "figures": rows, "n_test": 12,
            "model_uri": "models/padim/brick.safetensors", "threshold": 1.5, "seconds": 1.0}
    folder = shift.write_report(tmp_path / "shift", [good], config, "models")
    assert sorted(path.name for path in folder.iterdir()) == ["brick-padim.png", "figures.csv", "report.md", "results.json"]
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert "Breaks first under **blur at severity 1" in before["report.md"].decode()
    # Fails at the last file (results.json: a set is not JSON), after the plot, table and report.
    broken = {**good, "figures": [{**row, "image_auroc": 0.5} for row in rows], "seconds": {1.0}}
    with pytest.raises(TypeError, match="not JSON serializable"):
        shift.write_report(tmp_path / "shift", [broken], config, "models")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["shift"]  # no staging folder left behind


def _fit_demo_model(data: Path, folder: Path, **options) -> None:
    """A calibrated PaDiM on the demo brick at 64 px, saved where padim-fit would put it under `folder`."""
    from padim_core.calibration import Calibration
    from padim_core.datasets import MvtecCategory
    from padim_core.loader import image_batches
    from padim_core.padim import PadimModel

    category = MvtecCategory.from_folder(data / "brick")
    model = PadimModel("resnet18", ["layer1", "layer2"], n_features=20, image_size=64, pretrained=False, **options)
    model.fit(image_batches(category.train_images, model.transform.to_pixels, 8, 1))
    model.calibrate(Calibration("test", 1e6, ()))
    model.save(folder / "models" / "padim" / "brick.safetensors")


def test_a_compared_config_is_scored_on_the_same_shifts_and_reported_side_by_side(tmp_path: Path) -> None:
    """The task without Ray, then the report: both configs' figures, side by side."""
    data = build_demo_dataset(tmp_path / "data", train=6, test_good=2, test_defect=1, size=64)
    _fit_demo_model(data, tmp_path / "paper")
    _fit_demo_model(data, tmp_path / "robust", shrinkage="oas", augmentation={"copies": 1})
    request = shift.ShiftRequest(Unit("brick", "padim"), str(data / "brick"), str(tmp_path / "paper" / "models"), "champion",
                                 f"sqlite:///{tmp_path / 'mlflow.db'}", {"noise": (0.05,)}, 0, 8, 1, "cpu", 1,
                                 str(tmp_path / "robust" / "models"), "robust")
    result = shift.shift_unit(request)
    assert result.ok, result.error
    compare = result.values["compare"]
    assert compare["config"] == "robust" and compare["model_uri"].endswith("robust/models/padim/brick.safetensors")
    assert [(row["shift"], row["severity"]) for row in compare["figures"]] == [("noise", 0), ("noise", 1)]
    assert compare["figures"] != result.values["figures"]  # another model, other figures

    config = load_job_config(DEMO_CONFIG, ["shift.shifts={noise: [0.05]}"])
    folder = shift.write_report(tmp_path / "shift", [shift.as_row(result)], config, "models", "paper")
    assert sorted(path.name for path in folder.iterdir()) == [
        "brick-padim-compared.png", "brick-padim.png", "figures.csv", "report.md", "results.json"]
    rows = pacsv.read_csv(folder / "figures.csv").to_pylist()
    assert [(row["config"], row["severity"]) for row in rows] == [("paper", 0), ("paper", 1), ("robust", 0), ("robust", 1)]
    markdown = (folder / "report.md").read_text()
    ours, theirs = result.values["figures"][1], compare["figures"][1]
    assert "### Side by side: paper / robust" in markdown
    assert "| shift | severity | level | Image AUROC (paper / robust) |" in markdown
    assert f"| noise | 1 | 0.05 | {ours['image_auroc']:.3f} / {theirs['image_auroc']:.3f} |" in markdown
    assert "![brick/padim (robust): figures against severity](brick-padim-compared.png)" in markdown


@pytest.mark.parametrize(("flags", "message"), [
    (["--compare-models", "elsewhere"], "--compare-models needs --compare-config FILE"),
    (["--compare-config", "COMPARE"], "--compare-config: no models folder"),
])
def test_compare_flags_without_their_models_stop_before_anything_starts(tmp_path: Path, capsys, flags, message) -> None:
    data = build_demo_dataset(tmp_path / "data", train=2, test_good=1, test_defect=1, size=32)
    compared = tmp_path / "compared.yaml"
    compared.write_text(f"output: {tmp_path / 'never-fitted'}\n")
    flags = [str(compared) if flag == "COMPARE" else flag for flag in flags]
    code = shift.main(["--config", str(DEMO_CONFIG), "--data-root", str(data), "--output", str(tmp_path / "out"), *flags])
    assert code == 2 and message in capsys.readouterr().err
