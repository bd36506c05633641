"""jobs.score end to end, on real Ray and a real MLflow store, with bottle images from MVTec AD.

Folders, tar, tar.gz, zip and Parquet inputs built here hold real photos, oddly encoded images,
broken files and non-image files. Every image input must come out as exactly one row, every
score must equal what the model gives for the same bytes in this process, and a job that fails
or is killed must leave no table behind.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from jobs.common import tracking
from jobs.common.config import load_job_config
from jobs.common.pyfunc import log_pyfunc_model
from jobs.score.job import ScoreRequest, prepare, run, score
from padim_core.padim import PadimModel

from support.images import bottle_photos, broken_images, odd_images
from support.paths import BIN, REPO_ROOT
from support.servers import kill_processes, wait_for_line

pytestmark = pytest.mark.slow

SIZE = 64


def members(bottle: Path) -> dict[str, bytes]:
    """Everything put in each input: name under the category folder -> bytes."""
    items = {f"{path.parent.name}_{path.name}": path.read_bytes() for path in bottle_photos(bottle)}
    items.update({f"odd/{name}": data for name, data in odd_images().items()})
    items.update({f"broken/{name}": data for name, data in broken_images().items()})
    items["notes.txt"] = b"not an image"
    return items


def build_inputs(root: Path, items: dict[str, bytes]) -> list[Path]:
    """The same members as a folder, a tar (with ./ names), a tar.gz, a zip and a Parquet file."""
    for name, data in items.items():
        (root / "folder" / "bottle" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "folder" / "bottle" / name).write_bytes(data)
    for suffix, mode, prefix in ((".tar", "w", "./"), (".tar.gz", "w:gz", "")):
        with tarfile.open(root / f"images{suffix}", mode) as tar:
            for name, data in items.items():
                info = tarfile.TarInfo(f"{prefix}bottle/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(root / "images.zip", "w") as bundle:
        for name, data in items.items():
            bundle.writestr(f"bottle/{name}", data)
    images = {name: data for name, data in items.items() if not name.endswith(".txt")}
    pq.write_table(pa.table({"path": [f"bottle/{n}" for n in images], "image": list(images.values())}), root / "images.parquet")
    return [root / "folder", root / "images.tar", root / "images.tar.gz", root / "images.zip", root / "images.parquet"]


def config(tmp_path: Path, *overrides: str):
    return load_job_config(None, [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides])


def expected_scores(model_file: Path, items: dict[str, bytes]) -> dict[str, float]:
    model = PadimModel.load(model_file, device="cpu")
    return {name: model.predict_one(data)[0] for name, data in items.items()
            if not name.startswith("broken/") and not name.endswith(".txt")}


def member_of(source: str) -> str:
    """The name under `bottle/` that a table row came from, whatever the input kind."""
    return source.replace("::", "/").split("/bottle/", 1)[1]


def test_archives_folders_and_parquet_score_exactly_like_predict(
    bottle: Path, model_file: Path, ray_session: None, tmp_path: Path
) -> None:
    items = members(bottle)
    inputs = build_inputs(tmp_path / "in", items)
    output = tmp_path / "scores"
    request = ScoreRequest(
        inputs=tuple(map(str, inputs)), output=output, model=str(model_file), category="bottle",
        config=config(tmp_path, "scoring.map_columns=true", "scoring.map_size=8", "scoring.heatmaps_above_threshold=true",
                      "scoring.batch_size=8"),
    )
    summary = score(request)

    table = pq.read_table(output).to_pandas()
    images = [name for name in items if not name.endswith(".txt")]
    assert len(table) == len(inputs) * len(images) == summary.tally.images
    assert table["source"].is_unique and set(table["category"]) == {"bottle"}
    assert sorted(table["source"].map(member_of)) == sorted(images * len(inputs))
    assert summary.tally.skipped == 4  # notes.txt in the folder, the tar, the tar.gz and the zip (not in the Parquet)

    failed = table[table["error"].notna()]
    assert sorted(failed["source"].map(member_of)) == sorted([name for name in images if name.startswith("broken/")] * len(inputs))
    assert failed["image_score"].isna().all() and failed["is_anomalous"].isna().all() and failed["height"].isna().all()
    assert all(member_of(source) in error for source, error in zip(failed["source"], failed["error"]))

    scored = table[table["error"].isna()]
    expected = expected_scores(model_file, items)
    for source, value in zip(scored["source"], scored["image_score"]):
        assert value == pytest.approx(expected[member_of(source)], rel=1e-4), source
    calibration = PadimModel.load(model_file, device="cpu").calibration_
    threshold = calibration.threshold
    flags = scored["is_anomalous"].astype(bool)
    assert (flags == (scored["image_score"] > threshold)).all()
    assert 0 < flags.sum() < len(scored)
    # the p-values are the model's own, and decide exactly as the threshold does
    np.testing.assert_array_equal(scored["p_value"], calibration.p_values(scored["image_score"].to_numpy()))
    assert (flags == (scored["p_value"] <= 0.5)).all() and failed["p_value"].isna().all()
    assert (scored["threshold"] == threshold).all() and (scored["model_uri"] == str(model_file)).all()
    assert (table["detector"] == "padim").all()
    photo = scored[scored["source"].str.endswith("good_000.png")]
    assert (photo["height"] == 900).all() and (photo["width"] == 900).all()
    odd = scored[scored["source"].str.contains("/odd/")]
    assert ((odd["height"] == 40) & (odd["width"] == 60)).all()

    # map columns: the pooled map keeps the peak, which lies inside the image
    peaks = scored["anomaly_map"].map(max)
    np.testing.assert_allclose(peaks, scored["image_score"], rtol=1e-5)
    assert (scored["anomaly_map"].map(len) == 64).all()
    assert ((scored["max_y"] >= 0) & (scored["max_y"] < scored["height"]) & (scored["max_x"] < scored["width"])).all()
    assert scored[flags]["heatmap"].map(lambda path: (output / path).is_file()).all()
    assert scored[~flags]["heatmap"].isna().all()

    # decoding runs in its own tasks, not fused into the scoring actors
    assert "MapBatches(decode_batch):" in summary.ray_stats and "MapBatches(ScoreActor):" in summary.ray_stats

    run_data = MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    assert run_data.info.status == "FINISHED"
    metrics = run_data.data.metrics
    assert metrics["images"] == len(table) and metrics["errors"] == len(failed) and metrics["skipped"] == 4
    assert metrics["bottle/anomaly_rate"] == pytest.approx(flags.mean())
    assert run_data.data.params["model.bottle"] == str(model_file)
    artifacts = {item.path for item in MlflowClient(summary.tracking_uri).list_artifacts(summary.run_id, "histograms")}
    assert artifacts == {"histograms/bottle.png"}

    # the drift alarm: the whole job, then each of the five inputs; beside the table, in the run
    per_input = len(scored) // len(inputs)
    assert [(r.category, r.input, r.test.images) for r in summary.drift] == [
        ("bottle", None, len(scored)), *(("bottle", str(path), per_input) for path in inputs)]
    report = json.loads((tmp_path / "scores.drift.json").read_text())
    assert [item["p_value"] for item in report["results"]] == [r.test.p_value for r in summary.drift]
    assert metrics["bottle/drift_p_value"] == summary.drift[0].test.p_value
    assert metrics["bottle/input_4/drift_p_value"] == summary.drift[5].test.p_value
    assert run_data.data.tags["drift/bottle"] == summary.drift[0].test.verdict
    assert not any(path.name.endswith(".json") for path in output.rglob("*"))  # readers of the table never see it


def test_models_from_the_registry_by_alias_and_appending_to_a_table(
    bottle: Path, model_file: Path, ray_session: None, tmp_path: Path
) -> None:
    settings = config(tmp_path)
    uri = settings.tracking.tracking_uri
    client = MlflowClient(uri)
    experiment = tracking.prepare_experiment(client, settings.tracking.experiment, uri, tmp_path)
    run_id = client.create_run(experiment).info.run_id
    assert log_pyfunc_model(uri, run_id, model_file, "padim-bottle", "champion") == "1"
    folder = tmp_path / "in" / "bottle"
    folder.mkdir(parents=True)
    for path in bottle_photos(bottle)[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    output = tmp_path / "scores"

    first = score(ScoreRequest(inputs=(str(folder.parent),), output=output, models="registry", config=settings))
    table = pq.read_table(output).to_pandas()
    assert first.models == {"bottle": "models:/padim-bottle/1"} and (table["model_uri"] == "models:/padim-bottle/1").all()
    expected = expected_scores(model_file, {path.name: path.read_bytes() for path in bottle_photos(bottle)[:2]})
    for source, value in zip(table["source"], table["image_score"]):
        assert value == pytest.approx(expected[Path(source).name], rel=1e-4)

    again = ScoreRequest(inputs=(str(folder),), output=output, model="models:/padim-bottle@champion", category="bottle",
                         config=settings, mode="append")
    score(again)
    assert len(pq.read_table(output)) == 4
    # no staging leftovers; the drift verdicts of the latest job beside the table
    assert sorted(os.listdir(tmp_path)) == sorted([".scores.lock", "in", "scores", "scores.drift.json", "mlflow.db", "mlartifacts"])


def test_a_job_that_fails_after_its_checks_leaves_no_table(bottle: Path, model_file: Path, ray_session: None, tmp_path: Path) -> None:
    copy = tmp_path / "bottle.safetensors"
    copy.write_bytes(model_file.read_bytes())
    folder = tmp_path / "in" / "bottle"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(bottle_photos(bottle)[0].read_bytes())
    job = prepare(ScoreRequest(inputs=(str(folder.parent),), output=tmp_path / "scores", model=str(copy),
                               category="bottle", config=config(tmp_path)))
    copy.write_bytes(copy.read_bytes()[:5000])  # broken after the checks: the actors cannot load it
    with pytest.raises(Exception, match="truncated"):
        run(job)
    assert not job.scratch.exists()
    assert not (tmp_path / "scores").exists()
    assert not [name for name in os.listdir(tmp_path) if "staging" in name]
    runs = MlflowClient(job.tracking_uri).search_runs([job.experiment_id])
    assert runs[0].info.status == "FAILED" and "truncated" in runs[0].data.tags["error"]


def test_cli_killed_mid_run_leaves_no_table(
    bottle: Path, model_file: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "many.tar"
    photo = bottle_photos(bottle)[0].read_bytes()
    with tarfile.open(archive, "w") as tar:
        for index in range(400):
            info = tarfile.TarInfo(f"bottle/{index:04d}.png")
            info.size = len(photo)
            tar.addfile(info, io.BytesIO(photo))
    output = tmp_path / "scores"
    command = [
        str(BIN / "padim-score"), "--input", str(archive), "--output", str(output),
        "--model", str(model_file), "--category", "bottle",
        "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    environment = {**os.environ, "RAY_ADDRESS": ""}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started: list[psutil.Process] = []
    try:
        wait_for_line(process, "padim-score: models:", timeout=240)  # the run exists; scoring starts
        time.sleep(3)
        started = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        log, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        kill_processes(started)
    assert process.returncode != 0, log
    assert not output.exists(), log
    assert not [name for name in os.listdir(tmp_path) if "staging" in name]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("padim").experiment_id])
    assert found.info.status == "KILLED" and found.data.tags["error"] == "interrupted"

