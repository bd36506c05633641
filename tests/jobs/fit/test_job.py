"""The pieces of jobs.fit that need no Ray: the fail-fast start, the splits made (or refused)
before any fitting, one unit's task, the summary table, progress lines and metrics.json's shape."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from jobs.common import runner, tracking
from jobs.common.config import load_job_config
from jobs.common.runner import FAILED, OK, TaskResult, Unit
from jobs.fit import job as fit
from padim_core.datasets import MvtecCategory
from padim_core.demo_data import build_demo_dataset
from padim_core.padim import PadimModel
from padim_core.statistics import read_statistics

from support.paths import DEMO_CONFIG
from support.servers import free_port


def result(category: str, status: str = OK, error: str | None = None, seconds: float | None = None,
           **values: object) -> TaskResult:
    return TaskResult(category, "padim", status=status, error=error, seconds=seconds, values=dict(values))


def test_job_with_unreachable_server_stops_before_ray_and_fitting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data" / "widget" / "train" / "good").mkdir(parents=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = time.monotonic()
    code = fit.main(["--config", str(DEMO_CONFIG), "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "out")])
    assert code == 2
    assert time.monotonic() - started < 10
    error = capsys.readouterr().err
    assert error.startswith("padim-fit: error: MLflow tracking server") and "unreachable" in error
    assert error.rstrip().endswith("(nothing was started)")
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()


def test_a_missing_data_root_is_refused_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = fit.main(["--config", str(DEMO_CONFIG), "--data-root", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"),
                     "--categories", "bottle"])
    assert code == 2 and "nowhere" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


def test_a_failing_unit_returns_the_reason_and_saves_nothing(tmp_path: Path) -> None:
    """The task function itself, without Ray: it must never raise."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = tracking.prepare_experiment(client, "unit", uri, tmp_path)
    config = load_job_config(DEMO_CONFIG, ["padim.image_size=64"])
    parent = tracking.start_parent_run(client, experiment, "fit", {}, {})
    run_id = tracking.start_child_run(client, experiment, parent, "missing", "padim", tracking.detector_params(config, "padim"))
    request = fit.FitRequest(Unit("missing", "padim"), str(tmp_path / "missing"), None, config, str(tmp_path / "models"),
                             uri, run_id, "cpu", 1)
    done = fit.fit_unit(request)
    assert done.status == FAILED and (done.category, done.detector) == ("missing", "padim")
    assert done.error.startswith("DatasetError: ") and "train/good is missing" in done.error
    assert done.traceback.startswith("Traceback") and "DatasetError" in done.traceback
    assert not (tmp_path / "models").exists()
    assert client.get_run(run_id).info.status == "RUNNING"  # the driver closes it, with the reason


def test_summary_table_fits_a_screen_and_lists_failures() -> None:
    results = [
        result("bottle", n_train=167, n_test=83, image_auroc=0.99841, pixel_auroc=0.9812, aupro=0.9123,
               threshold=12.3456, false_alarm_rate=1 / 43, realised_false_alarm_rate=0.05, recall=0.98413,
               fit_seconds=41.25, fit_images_per_second=5.07),
        result("cable", n_train=179, n_test=150, image_auroc=None, false_alarm_rate=0.01, fit_seconds=3.0,
               fit_images_per_second=74.7),
        result("broken_category", FAILED, "ValueError: a covariance needs at least 2 training images, got 1", n_train=1),
    ]
    table = fit.format_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["category", "detector", "status", "fit", "test", "img", "AUROC", "px", "AUROC", "AUPRO",
                                "threshold", "alpha", "FA", "rate", "recall", "img/s"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["bottle", "padim", "ok", "167", "83", "0.998", "0.981", "0.912", "12.35", "0.0233", "0.050",
                                "0.984", "5.1"]
    assert lines[3].split() == ["cable", "padim", "ok", "179", "150", "-", "-", "-", "-", "0.01", "-", "-", "74.7"]
    assert lines[4].split()[:4] == ["broken_category", "padim", "failed", "1"]
    assert lines[-1] == "broken_category/padim failed: ValueError: a covariance needs at least 2 training images, got 1"
    # columns line up: every row's numbers end where their header ends
    assert len({len(line) for line in lines[:4]}) == 1
    assert max(len(line) for line in lines[:5]) <= 120


def test_progress_lines_say_what_finished() -> None:
    job = fit.FitJob(load_job_config(DEMO_CONFIG), DEMO_CONFIG)
    done = result("bottle", seconds=50.04, n_train=167, n_calibration=42, n_test=83, image_auroc=0.9984,
                  realised_false_alarm_rate=0.05, false_alarm_rate=1 / 43)
    assert job.progress_line(done) == ("done in 50.0 s: 167 fit + 42 calibration + 83 test images, image AUROC 0.998, "
                                       "false alarms on normal test images 0.050 (calibrated for 0.0233)")
    failed = result("cable", FAILED, "DatasetError: no training images in /d/cable/train/good", seconds=0.4)
    assert job.progress_line(failed) == "FAILED after 0.4 s: DatasetError: no training images in /d/cable/train/good"
    assert job.progress_line(result("grid", FAILED, "RayTaskError: worker died")) == "FAILED after -: RayTaskError: worker died"


def test_metrics_json_lists_every_category_and_detector_with_the_same_keys() -> None:
    found = fit.metrics_by_category([
        result("bottle", seconds=3.0, image_auroc=0.99, n_train=10, model_path="/m/padim/bottle.safetensors", model_version="3"),
        result("cable", FAILED, "DatasetError: gone"),
    ])
    assert list(found) == ["bottle", "cable"] and list(found["bottle"]) == ["padim"]
    bottle, cable = found["bottle"]["padim"], found["cable"]["padim"]
    assert bottle.keys() == cable.keys() >= {"status", "error", *fit.SUMMARY_FIELDS, "seconds", "model_path", "model_version"}
    assert (bottle["status"], bottle["image_auroc"], bottle["model_version"]) == ("ok", 0.99, "3")
    assert (cable["status"], cable["error"], cable["image_auroc"], cable["model_path"]) == ("failed", "DatasetError: gone", None, None)


# ------------------------------------------------------------------- splits, before any fit
@pytest.fixture
def demo_root(tmp_path: Path) -> Path:
    return build_demo_dataset(tmp_path / "data", train=6, test_good=1, test_defect=1, size=32)


def refused(root: Path, output: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> str:
    """Run padim-fit's main with the overrides; it must stop before Ray, fitting or any model."""
    arguments = ["--config", str(DEMO_CONFIG), "--data-root", str(root), "--output", str(output)]
    code = fit.main([*arguments, *(item for override in overrides for item in ("--set", override))])
    error = capsys.readouterr().err
    assert code == 2, error
    assert error.rstrip().endswith("(nothing was started)") and not ray.is_initialized()
    assert not (output / "models").exists() and not (output / "manifests").exists()
    return error


def test_bad_calibration_settings_are_refused_before_any_fitting(demo_root: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out"
    error = refused(demo_root, output, capsys, "calibration.false_alarm_rate=1.5")
    assert "calibration.false_alarm_rate: 1.5 is out of range; allowed: 0 < rate < 1, or null/auto" in error
    error = refused(demo_root, output, capsys, "calibration.false_alarm_rate=0")
    assert "calibration.false_alarm_rate: 0 is out of range" in error
    error = refused(demo_root, output, capsys, "calibration.fraction=0.95")
    assert "calibration.fraction 0.95 of the 6 images in" in error and "holds out 6 and leaves none to fit on" in error
    error = refused(demo_root, output, capsys, "calibration.fraction=0.75")  # 4.5 -> 5 held out, 1 left: PaDiM needs 2
    assert "split of 'brick' (fraction 0.75 of train/good, seed 0) leaves 1 images to fit on; the detector needs at least 2" in error
    error = refused(demo_root, output, capsys, "calibration.false_alarm_rate=0.1")  # 1 calibration image of 6
    assert "calibration.false_alarm_rate 0.1 needs at least 9 calibration images, got 1" in error


def test_a_manifest_naming_missing_files_is_refused_before_any_fitting(demo_root: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    job = runner.prepare_job(fit.FitJob(load_job_config(DEMO_CONFIG, [
        f"data.root={demo_root}", f"output={tmp_path / 'first'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]),
        DEMO_CONFIG))
    manifests = tmp_path / "first" / "manifests"
    assert sorted(path.name for path in manifests.iterdir()) == ["brick.json", "grass.json", "gravel.json"]
    split = job.splits["grass"]
    assert split.counts() == {"fit": 5, "calibration": 1, "test": 5}
    assert (manifests / "grass.json").read_text() == split.to_json()
    assert "grass: 1 calibration images support a false-alarm rate of at least 1/2 = 0.5" in capsys.readouterr().out

    # the same manifests give the same splits, whatever the fraction says now
    again = runner.prepare_job(fit.FitJob(load_job_config(DEMO_CONFIG, [
        f"data.root={demo_root}", f"output={tmp_path / 'second'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        f"calibration.manifest={manifests}", "calibration.fraction=0.5"]), DEMO_CONFIG))
    assert again.splits == job.splits
    assert (tmp_path / "second" / "manifests" / "grass.json").read_text() == split.to_json()

    (demo_root / "grass" / split.calibration[0].path).unlink()
    error = refused(demo_root, tmp_path / "third", capsys, f"calibration.manifest={manifests}")
    assert f"split manifest of 'grass': 1 files under {demo_root / 'grass'} are not as the manifest says: " \
           f"{split.calibration[0].path} (missing)" in error


@pytest.mark.slow
def test_a_unit_fits_on_its_split_and_logs_it(demo_root: Path, tmp_path: Path) -> None:
    """The task function without Ray: fit, calibration and test images as the split says, the
    split as an artifact and as the run's dataset inputs, a conformal threshold in the model."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = tracking.prepare_experiment(client, "unit", uri, tmp_path)
    config = load_job_config(DEMO_CONFIG, ["padim.image_size=32", "fit.heatmap_examples=0", "tracking.register_models=false",
                                           "calibration.fraction=0.34"])
    split = config.calibration.split(MvtecCategory.from_folder(demo_root / "brick"), 2)
    parent = tracking.start_parent_run(client, experiment, "fit", {}, {})
    run_id = tracking.start_child_run(client, experiment, parent, "brick", "padim", tracking.detector_params(config, "padim"))
    request = fit.FitRequest(Unit("brick", "padim"), str(demo_root / "brick"), split, config, str(tmp_path / "models"),
                             uri, run_id, "cpu", 1)
    done = fit.fit_unit(request)
    assert done.ok, done.traceback
    assert (done.values["n_train"], done.values["n_calibration"], done.values["n_test"]) == (4, 2, 5)
    assert done.values["false_alarm_rate"] == 1 / 3 and 0 <= done.values["realised_false_alarm_rate"] <= 1
    model = PadimModel.load(done.values["model_path"])
    assert model.calibration_.is_conformal and model.calibration_.count == 2 and model.n_train_ == 4
    run = client.get_run(run_id)
    assert run.data.params["n_calibration"] == "2" and run.data.params["split"] == split.method
    assert {"false_alarm_rate", "realised_false_alarm_rate", "recall", "oracle_f1_threshold"} <= set(run.data.metrics)
    assert run.data.tags["threshold_method"] == "conformal on 2 held-out normal images"
    assert {item.dataset.name for item in run.inputs.dataset_inputs} == {"brick-fit", "brick-calibration", "brick-test"}
    logged = client.download_artifacts(run_id, "manifest/brick.json", str(tmp_path))
    assert Path(logged).read_text() == split.to_json()
    # fit.keep_statistics: the running sums beside the model and in the run, with the split they came from
    assert run.data.params["shards"] == "1"
    kept = Path(done.values["statistics_path"])
    assert kept == tmp_path / "statistics" / "padim" / "brick.safetensors" and kept.stat().st_size == done.values["statistics_bytes"]
    logged = Path(client.download_artifacts(run_id, "statistics/brick.safetensors", str(tmp_path)))
    sums, meta, _ = read_statistics(logged)
    # every fit image and its augmented copies are samples of the sums
    assert sums.count == 4 * config.padim.augmentation.images_per_source == 8 and meta["manifest"] == split.to_dict() and kept.read_bytes() == logged.read_bytes()
