"""jobs.score against what a hostile user or a crash can do: a corpus of bad inputs, a killed
driver, two jobs on one output, and the network ports an embedded Ray opens."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from jobs.common.config import load_job_config
from jobs.score.job import ScoreRequest, prepare, run, score

from support.hostile import build_corpus
from support.images import bottle_photos
from support.paths import BIN, REPO_ROOT
from support.servers import kill_processes, wait_for_line

pytestmark = pytest.mark.slow


def settings(tmp_path: Path):
    return load_job_config(None, [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])


def test_every_image_named_input_is_one_row_and_no_row_appears_twice(
    bottle: Path, model_file: Path, ray_session: None, tmp_path: Path
) -> None:
    corpus = build_corpus(tmp_path / "in", [path.read_bytes() for path in bottle_photos(bottle)[:2]])
    summary = score(ScoreRequest(inputs=tuple(map(str, corpus.inputs)), output=tmp_path / "scores",
                                 models=str(model_file.parent), config=settings(tmp_path)))
    table = pq.read_table(tmp_path / "scores").to_pandas()
    assert not table.source.duplicated().any()
    assert sorted(table.source) == sorted(corpus.expected)
    by_source = table.set_index("source")
    for source, problem in corpus.expected.items():
        row = by_source.loc[source]
        if problem is None:
            assert pd.isna(row.error) and not pd.isna(row.image_score), (source, row.error)
        else:
            assert problem in row.error, (source, row.error)
    # Counts add up: rows = scored + errors, in the summary and in MLflow; skipped files counted once.
    tally = summary.tally
    assert tally.images == len(table) and tally.scored == table.error.isna().sum() and tally.skipped == corpus.skipped
    metrics = MlflowClient(summary.tracking_uri).get_run(summary.run_id).data.metrics
    assert metrics["images"] == len(table) and metrics["skipped"] == corpus.skipped
    assert metrics["__unknown__/errors"] == (table.category == "__unknown__").sum() == 3
    assert not (tmp_path / "escape.png").exists() and not (tmp_path.parent / "escape.png").exists()


def test_a_killed_driver_leaves_nothing_that_the_next_job_does_not_clean(
    bottle: Path, model_file: Path, ray_session: None, tmp_path: Path
) -> None:
    folder = tmp_path / "in" / "bottle"
    folder.mkdir(parents=True)
    photo = bottle_photos(bottle)[0].read_bytes()
    for index in range(300):
        (folder / f"{index:03d}.png").write_bytes(photo)
    output = tmp_path / "scores"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [str(BIN / "padim-score"), "--input", str(folder.parent), "--output", str(output), "--model",
               str(model_file), "--category", "bottle", "--set", f"tracking.tracking_uri={uri}"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "RAY_ADDRESS": ""}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    started: list[psutil.Process] = []
    try:
        wait_for_line(process, "padim-score: models:", timeout=240)
        time.sleep(3)
        started = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGKILL)  # nothing runs on SIGKILL: no cleanup, no run closed
        process.wait(timeout=60)
    finally:
        kill_processes([psutil.Process(process.pid)] if process.poll() is None else [])
        kill_processes(started)
    (staging,) = [path for path in tmp_path.iterdir() if ".staging-" in path.name]
    dead_run = json.loads((staging / "job.json").read_text())["run_id"]
    client = MlflowClient(uri)
    assert client.get_run(dead_run).info.status == "RUNNING" and not output.exists()

    summary = score(ScoreRequest(inputs=(str(folder.parent),), output=output, model=str(model_file), category="bottle",
                                 config=settings(tmp_path)))
    assert pq.read_table(output).num_rows == 300 == summary.tally.scored
    assert not [path for path in tmp_path.iterdir() if ".staging-" in path.name]
    killed = client.get_run(dead_run)
    assert killed.info.status == "KILLED" and "cleaned by a later job" in killed.data.tags["error"]


def test_two_jobs_on_one_output_end_with_one_table_and_one_clear_refusal(
    bottle: Path, model_file: Path, ray_session: None, tmp_path: Path
) -> None:
    folder = tmp_path / "in" / "bottle"
    folder.mkdir(parents=True)
    for path in bottle_photos(bottle)[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    output = tmp_path / "scores"
    request = ScoreRequest(inputs=(str(folder.parent),), output=output, model=str(model_file), category="bottle",
                           config=settings(tmp_path), mode="overwrite")
    first = prepare(request)  # holds the output from here to the end of `run`
    second = subprocess.run(
        [str(BIN / "padim-score"), "--input", str(folder.parent), "--output", str(output), "--model", str(model_file),
         "--category", "bottle", "--mode", "overwrite", "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=REPO_ROOT, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=300, check=False,
    )
    assert second.returncode == 2, second.stdout + second.stderr
    assert "is being written by another padim-score job" in second.stderr and f"pid {os.getpid()}" in second.stderr
    run(first)
    table = pq.read_table(output).to_pandas()
    assert len(table) == 3 and table.run_id.nunique() == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == [".scores.lock", "in", "mlartifacts", "mlflow.db", "scores", "scores.drift.json"]


LISTENERS = r"""
import json, psutil, ray
from jobs.common import ray_runtime
ray_runtime.connect(num_cpus=1)
ray.get(ray.remote(lambda: 1).remote())
session = ray._private.worker._global_node.get_session_dir_path()
processes = [psutil.Process()] + [p for p in psutil.process_iter(["cmdline"])
                                  if any(session in part for part in (p.info["cmdline"] or []))]
processes += [child for p in list(processes) for child in p.children(recursive=True)]
found = set()
for process in processes:
    try:
        for connection in process.net_connections(kind="inet"):
            if connection.status == psutil.CONN_LISTEN or not connection.raddr:
                found.add((connection.laddr.ip, connection.laddr.port, " ".join(process.cmdline()[:1])))
    except psutil.Error:
        pass
ray.shutdown()
print(json.dumps(sorted(found)))
"""


def test_an_embedded_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", LISTENERS], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "RAY_ADDRESS": ""}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    listeners = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(listeners) >= 5  # the GCS, the raylet, the agents, workers: all found
    exposed = [entry for entry in listeners if entry[0] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert exposed == [], exposed


def bad_model_files(data: bytes) -> dict[str, tuple[bytes, str]]:
    """Model files that a careless or hostile hand made, and what jobs.score must say of each."""
    from support.models import model_metadata, rewrite_model_file

    calibration = model_metadata(data)["calibration"] or {"method": "m", "false_alarm_rate": None, "count": 0, "scores": []}
    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(3)}, buffer)
    return {
        "threshold": (rewrite_model_file(data, calibration={**calibration, "threshold": "abc"}), "calibration.threshold"),
        "blur": (rewrite_model_file(data, blur_sigma=float("nan")), "blur_sigma"),
        "huge": (rewrite_model_file(data, image_size=[100000, 100000]), "integers from 1 to 2048"),
        "grid": (rewrite_model_file(data, image_size=[1024, 1024]), "grid_shape"),
        "pickle": (buffer.getvalue(), "not a safetensors file"),
    }


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the cases below: creating its tables is most of what each would cost."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.mark.parametrize("case", ["threshold", "blur", "huge", "grid", "pickle"])
def test_a_model_file_that_would_break_scoring_is_refused_before_any_image_is_read(
    case: str, tiny_padim_file: bytes, tracking_store: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from jobs.score.job import main

    data, message = bad_model_files(tiny_padim_file)[case]
    model = tmp_path / "bottle.safetensors"
    model.write_bytes(data)
    (tmp_path / "in" / "bottle").mkdir(parents=True)
    (tmp_path / "in" / "bottle" / "a.png").write_bytes(b"x")
    code = main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(model),
                 "--category", "bottle", "--set", f"tracking.tracking_uri={tracking_store}"])
    error = capsys.readouterr().err
    assert code == 2 and message in error and str(model) in error and "(nothing was started)" in error
    assert not (tmp_path / "out").exists() and not [path for path in tmp_path.iterdir() if ".staging-" in path.name]
