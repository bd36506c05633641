"""jobs.fit end to end: on a real Ray head through `ray job submit`, against a real `mlflow server`
(both detectors, then scored with p-values and the drift alarm, shifted and compared on the same
servers), and with the embedded local Ray when one category is broken.

Servers bind to 127.0.0.1 only and are stopped at the end of each test, by process id
(`support.servers`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from padim_core.demo_data import build_demo_dataset

from support.paths import BIN, DEMO_CONFIG, REPO_ROOT
from support.servers import local_env, running_cluster, stop_process_tree
from support.tracking import runs_by_name, version_files

pytestmark = pytest.mark.slow

FAST = ["--set", "padim.image_size=64", "--set", "patchcore.image_size=64", "--set", "fit.heatmap_examples=2",
        "--set", "data.batch_size=8"]
METRICS = {"image_auroc", "pixel_auroc", "aupro", "threshold", "fit_seconds", "images_per_second", "false_alarm_rate",
           "realised_false_alarm_rate", "recall", "oracle_f1_threshold"}
PARAMS = {"detector", "backbone", "layers", "n_features", "image_size", "seed", "n_train", "n_calibration", "split"}


# -------------------------------------------------------------------------------- tests
def test_ray_job_submit_fits_both_detectors_then_they_score_shift_and_compare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow import MlflowClient

    from padim_core.manifest import read_manifest
    from padim_core.padim import PadimModel

    data = build_demo_dataset(tmp_path / "data", train=6, test_good=3, test_defect=1, size=64)
    output = tmp_path / "out"
    categories = ["brick", "grass"]
    with running_cluster(tmp_path) as cluster:
        env, uri = cluster.env, cluster.tracking_uri
        submitted = time.monotonic()
        job = subprocess.run(
            [
                str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard,
                "--working-dir", str(REPO_ROOT),
                "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": uri}}),
                "--", "python", "-m", "jobs.fit", "--config", "configs/demo.yaml", "--data-root", str(data),
                "--output", str(output), "--categories", ",".join(categories), "--detectors", "padim,patchcore",
                "--set", "tracking.experiment=padim-e2e", *FAST,
            ],
            env=env, capture_output=True, text=True, check=False, timeout=420,
        )
        log = job.stdout + job.stderr
        assert job.returncode == 0, log[-5000:]
        print(f"ray job submit took {time.monotonic() - submitted:.0f} s")
        assert "succeeded" in log
        for name in categories:
            for kind in ("padim", "patchcore"):
                assert f"[{name}/{kind}] started: 5 fit + 1 calibration + 7 test images" in log
            assert f"padim-fit: {name}: 1 calibration images support a false-alarm rate of at least 1/2 = 0.5" in log
        assert "[4/4]" in log and "image AUROC" in log

        # What the driver left on the head's disk.
        summary = json.loads((output / "metrics.json").read_text())
        statuses = {name: {kind: entry["status"] for kind, entry in kinds.items()} for name, kinds in summary["categories"].items()}
        assert statuses == {name: {"padim": "ok", "patchcore": "ok"} for name in categories}
        assert summary["tracking_uri"] == uri
        assert sorted(path.name for path in (output / "models").iterdir()) == ["padim", "patchcore"]
        for kind in ("padim", "patchcore"):
            assert sorted(path.name for path in (output / "models" / kind).iterdir()) == [f"{name}.safetensors" for name in categories]
        assert not (output / "mlflow.db").exists()  # the server holds the runs, not a local file
        # the splits, beside the models: 1 of the 6 normal training images held out, never fitted on
        for name in categories:
            split = read_manifest(output / "manifests" / f"{name}.json", data / name).verify()
            assert split.counts() == {"fit": 5, "calibration": 1, "test": 7}
            model = PadimModel.load(output / "models" / "padim" / f"{name}.safetensors")
            assert model.calibration_.is_conformal and model.calibration_.false_alarm_rate == 0.5
            assert model.n_train_ == 5 and model.threshold_ == model.calibration_.scores[0]
            assert summary["categories"][name]["padim"]["threshold"] == pytest.approx(model.threshold_)

        # What the MLflow server holds, read back over HTTP. `models:/` URIs resolve through
        # the default registry, which follows MLFLOW_TRACKING_URI (else ./mlflow.db).
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("padim-e2e")
        assert experiment.artifact_location.startswith("mlflow-artifacts:")
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        parent, children = runs_by_name(client, experiment.experiment_id)
        assert parent.info.status == "FINISHED"
        assert parent.data.params["padim.image_size"] == "64"
        assert parent.data.metrics["units"] == 4 and parent.data.metrics["units_failed"] == 0
        assert parent.data.params["detectors"] == "padim,patchcore" and parent.data.params["categories"] == ",".join(categories)
        parent_files = {item.path for item in client.list_artifacts(parent.info.run_id, "config")}
        assert parent_files == {"config/demo.yaml", "config/resolved.yaml"}
        assert {item.path for item in client.list_artifacts(parent.info.run_id)} >= {"config", "metrics.json", "comparison"}
        assert sorted(children) == sorted(f"{name}-{kind}" for name in categories for kind in ("padim", "patchcore"))
        # The same metric names for both detectors, so the UI's Compare lines them up.
        assert {frozenset(run.data.metrics) for run in children.values()} == {frozenset(children["brick-padim"].data.metrics)}
        assert children["brick-patchcore"].data.params["coreset_ratio"] == "0.1"
        for name, kind in [(name, kind) for name in categories for kind in ("padim", "patchcore")]:
            run = children[f"{name}-{kind}"]
            assert run.info.status == "FINISHED", run.data.tags.get("error")
            assert (run.data.tags["category"], run.data.tags["detector"]) == (name, kind)
            assert METRICS <= set(run.data.metrics)
            assert PARAMS - {"n_features"} <= set(run.data.params)
            assert run.data.params["n_train"] == "5" and run.data.params["image_size"] == "64x64"
            assert run.data.params["n_calibration"] == "1" and run.data.metrics["false_alarm_rate"] == 0.5
            assert run.data.params["backbone"] == "efficientnet_lite0" and run.data.params["detector"] == kind
            assert 0.0 <= run.data.metrics["image_auroc"] <= 1.0
            assert run.data.metrics["image_auroc"] == pytest.approx(summary["categories"][name][kind]["image_auroc"])
            version = client.get_model_version_by_alias(f"{kind}-{name}", "champion")
            assert version.run_id == run.info.run_id
        # The comparison: one row per (category, detector), numbers equal to the runs' metrics.
        compared = pd.read_csv(output / "comparison" / "comparison.csv")
        assert len(compared) == 4 and (output / "comparison" / "report.md").is_file()
        for row in compared.itertuples():
            metrics = children[f"{row.category}-{row.detector}"].data.metrics
            assert row.image_auroc == pytest.approx(metrics["image_auroc"])
            assert row.pixel_auroc == pytest.approx(metrics["pixel_auroc"])
            assert row.model_size_mb == pytest.approx(metrics["model_size_mb"])
        for name in categories:
            run = children[f"{name}-padim"]
            assert {item.path for item in client.list_artifacts(run.info.run_id, "manifest")} == {f"manifest/{name}.json"}
            top = {item.path for item in client.list_artifacts(run.info.run_id)}
            assert {"scores.parquet", "roc_curve.png", "score_histogram.png", "heatmaps"} <= top
            heatmaps = client.list_artifacts(run.info.run_id, "heatmaps")
            assert len(heatmaps) == 2 and all(item.path.endswith(".png") for item in heatmaps)
            version = client.get_model_version_by_alias(f"padim-{name}", "champion")
            assert version.run_id == run.info.run_id
            assert str(version.version) == summary["categories"][name]["padim"]["model_version"]
            # logged from code through the server: the model holds no pickle
            model_files = version_files(client, f"padim-{name}", "champion")
            assert {"MLmodel", f"artifacts/{name}.safetensors", "code/jobs/common/pyfunc_model.py"} <= set(model_files)
            assert not [path for path in model_files if path.endswith(".pkl")], model_files
        # Artifacts went through the server into its artifact store.
        assert list((tmp_path / "mlflow" / "artifacts").rglob("scores.parquet"))
        # the splits are the runs' dataset inputs, searchable over HTTP
        found = client.search_runs([experiment.experiment_id], "dataset.context = 'calibration'")
        assert sorted(run.info.run_name for run in found) == sorted(children)  # every (category, detector)
        inputs = {item.dataset.name: item.tags[0].value for item in children["brick-padim"].inputs.dataset_inputs}
        assert inputs == {"brick-fit": "training", "brick-calibration": "calibration", "brick-test": "testing"}

        # The registered model scores an image as the job did, and loads without unpickling anything.
        run = children["brick-padim"]
        table = pq.read_table(
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path="scores.parquet", dst_path=str(tmp_path / "dl"), tracking_uri=uri
            )
        ).to_pandas()
        assert len(table) == 7 and set(table.columns) >= {"source", "image_score", "is_anomalous", "label"}
        monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
        model = mlflow.pyfunc.load_model("models:/padim-brick@champion")
        defective = table[table.label == 1].iloc[0]
        image = Path(defective.source)
        scored = model.predict(pd.DataFrame({"image": [str(image), image.read_bytes()]}))
        assert list(scored.columns) == ["image_score", "p_value", "is_anomalous", "error"]
        assert scored.image_score.tolist() == pytest.approx([defective.image_score] * 2, rel=1e-3)
        assert scored.is_anomalous.tolist() == [bool(defective.is_anomalous)] * 2
        assert scored.p_value.tolist() == [defective.p_value] * 2
        assert scored.is_anomalous.tolist() == (scored.p_value <= 0.5).tolist()


        # Both kinds score from the one models folder and from the registry (the kind is read from
        # each file), and padim-shift evaluates a PatchCore model: drivers joining the same head.
        driver = {**env, "RAY_ADDRESS": f"127.0.0.1:{cluster.gcs_port}", "MLFLOW_TRACKING_URI": uri}
        tables = {kind: tmp_path / f"scores-{kind}" for kind in ("patchcore", "padim")}
        scoring = subprocess.run(
            [str(BIN / "padim-score"), "--input", str(data / "brick" / "test"), "--category", "brick",
             "--models", str(output / "models"), "--detector", "patchcore", "--output", str(tables["patchcore"]),
             "--set", "tracking.experiment=padim-e2e"],
            env=driver, capture_output=True, text=True, check=False, timeout=300,
        )
        assert scoring.returncode == 0, (scoring.stdout + scoring.stderr)[-4000:]
        # PaDiM from the registry through `ray job submit`, two inputs: p-values and the drift alarm per input.
        job = subprocess.run(
            [
                str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard,
                "--working-dir", str(REPO_ROOT),
                "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": uri}}),
                "--", "python", "-m", "jobs.score", "--input", str(data / "brick" / "test"), str(data / "brick" / "train"),
                "--models", "registry", "--detector", "padim", "--category", "brick", "--output", str(tables["padim"]),
                "--set", "tracking.experiment=padim-e2e",
            ],
            env=env, capture_output=True, text=True, check=False, timeout=420,
        )
        log = job.stdout + job.stderr
        assert job.returncode == 0, log[-5000:]
        assert "scored 13 images, 0 errors" in log and "brick     (whole job)" in log
        scored_rows = pq.read_table(tables["padim"]).to_pandas()
        assert len(scored_rows) == 13 and scored_rows.p_value.notna().all()
        assert (scored_rows.is_anomalous == (scored_rows.p_value <= 0.5)).all()
        assert (scored_rows.is_anomalous == (scored_rows.image_score > scored_rows.threshold)).all()
        drift = json.loads((tmp_path / "scores-padim.drift.json").read_text())
        assert [(item["category"], item["input"], item["images"]) for item in drift["results"]] == [
            ("brick", None, 13), ("brick", str(data / "brick" / "test"), 7), ("brick", str(data / "brick" / "train"), 6)]
        assert drift["results"][0]["verdict"] in ("ALARM", "no alarm")
        assert drift["results"][1]["verdict"] == "not tested: 7 images, fewer than 10"
        scoring_run = client.search_runs([experiment.experiment_id], "tags.job = 'jobs.score'", order_by=["attributes.start_time DESC"])[0]
        assert scoring_run.data.metrics["brick/drift_p_value"] == drift["results"][0]["p_value"]
        assert scoring_run.data.tags["drift/brick"] == drift["results"][0]["verdict"]
        assert "scores-padim.drift.json" in {item.path for item in client.list_artifacts(scoring_run.info.run_id)}
        for kind, table_path in tables.items():
            rows = pq.read_table(table_path).to_pandas()
            rows = rows[rows.source.str.contains("/test/")]
            assert len(rows) == 7 and set(rows.detector) == {kind} and rows.error.isna().all()
            fitted = pq.read_table(mlflow.artifacts.download_artifacts(
                run_id=children[f"brick-{kind}"].info.run_id, artifact_path="scores.parquet",
                dst_path=str(tmp_path / f"dl-{kind}"), tracking_uri=uri)).to_pandas()
            by_source = dict(zip(fitted.source, fitted.image_score))
            assert rows.image_score.tolist() == pytest.approx([by_source[source] for source in rows.source], rel=1e-3)
        shift = subprocess.run(
            [str(BIN / "padim-shift"), "--config", "configs/demo.yaml", "--data-root", str(data), "--output", str(output),
             "--categories", "brick", "--detectors", "patchcore", "--set", "shift.shifts={blur: [4]}",
             "--set", "tracking.experiment=padim-e2e", *FAST],
            cwd=REPO_ROOT, env=driver, capture_output=True, text=True, check=False, timeout=300,
        )
        assert shift.returncode == 0, (shift.stdout + shift.stderr)[-4000:]
        figures = pd.read_csv(output / "shift" / "figures.csv")
        unshifted = figures[(figures.detector == "patchcore") & (figures.severity == 0)].iloc[0]
        assert unshifted.image_auroc == pytest.approx(summary["categories"]["brick"]["patchcore"]["image_auroc"])
        compare = subprocess.run([str(BIN / "padim-compare"), "--output", str(output)], env=driver,
                                 capture_output=True, text=True, check=False, timeout=120)
        assert compare.returncode == 0, compare.stderr[-3000:]
        report = (output / "comparison" / "report.md").read_text()
        assert "| brick | patchcore |" in report and "not measured" in report  # padim's shifts were not run


def test_one_broken_category_fails_alone(tmp_path: Path) -> None:
    """Embedded local Ray and the default SQLite store, as `padim-fit` runs on a laptop."""
    from mlflow import MlflowClient

    data = build_demo_dataset(tmp_path / "data", train=5, test_good=2, test_defect=1, size=64)
    shutil.rmtree(data / "gravel" / "train")  # listed by name, so it fails in its task rather than stopping the job
    (data / "grass" / "train" / "good" / "002.png").write_bytes(b"not an image")
    output = tmp_path / "out"
    started_at = time.monotonic()
    job = subprocess.run(
        [str(BIN / "padim-fit"), "--config", str(DEMO_CONFIG), "--data-root", str(data), "--output", str(output),
         "--categories", "brick,grass,gravel", *FAST],
        cwd=tmp_path, env=local_env(), capture_output=True, text=True, check=False, timeout=400,
    )
    print(f"padim-fit took {time.monotonic() - started_at:.0f} s")
    log = job.stdout + job.stderr
    assert job.returncode == 1, log[-5000:]
    assert "[3/3]" in log and "; 2 FAILED" in log
    assert f"gravel/padim failed: DatasetError: {data / 'gravel'} is not an MVTec category: " in log

    summary = {name: kinds["padim"] for name, kinds in json.loads((output / "metrics.json").read_text())["categories"].items()}
    assert summary["brick"]["status"] == "ok" and summary["brick"]["error"] is None
    assert 0.0 <= summary["brick"]["image_auroc"] <= 1.0
    assert summary["gravel"]["status"] == "failed"
    assert "train/good is missing" in summary["gravel"]["error"]
    assert summary["grass"]["status"] == "failed"
    assert "002.png" in summary["grass"]["error"] and "ImageDecodeError" in summary["grass"]["error"]
    assert all(set(entry) >= {"image_auroc", "pixel_auroc", "aupro", "threshold", "n_train", "n_test", "fit_seconds",
                              "fit_images_per_second", "status", "error"} for entry in summary.values())
    # Only the category that succeeded has a model; nothing partial or temporary is left.
    assert [path.name for path in (output / "models" / "padim").iterdir()] == ["brick.safetensors"]
    assert sorted(path.name for path in (output / "manifests").iterdir()) == ["brick.json", "grass.json"]
    assert summary["brick"]["model_path"] == str(output / "models" / "padim" / "brick.safetensors")

    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("padim-demo")
    assert experiment.artifact_location == (output / "mlartifacts").as_uri()
    parent, children = runs_by_name(client, experiment.experiment_id)
    assert parent.info.status == "FAILED" and "2 of 3 failed" in parent.data.tags["error"]
    assert children["brick-padim"].info.status == "FINISHED"
    for name in ("grass", "gravel"):
        run = children[f"{name}-padim"]
        assert run.info.status == "FAILED"
        assert run.data.tags["error"] == summary[name]["error"]
        assert "error.txt" in {item.path for item in client.list_artifacts(run.info.run_id)}
    assert [model.name for model in client.search_registered_models()] == ["padim-brick"]
    assert f"mlflow ui --backend-store-uri sqlite:///{output / 'mlflow.db'}" in log


def test_bottle_auroc_matches_padim_core_evaluate(mvtec_root: Path, tmp_path: Path) -> None:
    """Through Ray and MLflow, the figures are padim_core's own: the job adds orchestration, not maths."""
    config = tmp_path / "bottle.yaml"
    config.write_text(DEMO_CONFIG.read_text())
    overrides = ["--set", "padim.image_size=64", "--set", "fit.heatmap_examples=0", "--set", "tasks.device=cpu"]
    commands = {
        "fit": [sys.executable, "-m", "jobs.fit", "--config", str(config), "--data-root", str(mvtec_root),
                "--categories", "bottle", "--output", str(tmp_path / "out"), *overrides],
        "evaluate": [str(BIN / "padim-evaluate"), str(mvtec_root / "bottle"), "--config", str(config),
                     "--image-size", "64", "--device", "cpu", "--json", str(tmp_path / "evaluate.json")],
    }
    # Side by side: each spends much of its time starting up (Ray, imports) rather than computing.
    running = {name: subprocess.Popen(command, cwd=tmp_path, env=local_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True) for name, command in commands.items()}
    try:
        logs = {name: process.communicate(timeout=900)[0] for name, process in running.items()}
    finally:
        for process in running.values():
            if process.poll() is None:
                stop_process_tree(process)
    for name, process in running.items():
        assert process.returncode == 0, f"{name}: {logs[name][-5000:]}"
    job = json.loads((tmp_path / "out" / "metrics.json").read_text())["categories"]["bottle"]["padim"]
    reference = json.loads((tmp_path / "evaluate.json").read_text())
    print(f"bottle image AUROC: jobs.fit {job['image_auroc']:.6f}, padim_core.evaluate {reference['image_auroc']:.6f}")
    assert job["n_train"] == reference["n_train"] and job["n_test"] == reference["n_test"]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert job[key] == pytest.approx(reference[key], abs=1e-4), key
