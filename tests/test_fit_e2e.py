"""jobs.fit end to end: on a real Ray head through `ray job submit`, against a real `mlflow server`,
and with the embedded local Ray when one category is broken.

Servers bind to 127.0.0.1 only and are stopped at the end of each test, by process id: every
process they started is found through the process tree (`ray stop` would kill every Ray
process on the machine, other people's included).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest

from padim_core.demo_data import build_demo_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = REPO / "configs" / "demo.yaml"
FAST = ["--set", "padim.image_size=64", "--set", "fit.heatmap_examples=2", "--set", "data.batch_size=8"]
METRICS = {"image_auroc", "pixel_auroc", "aupro", "threshold", "fit_seconds", "images_per_second"}
PARAMS = {"backbone", "layers", "n_features", "image_size", "seed", "n_train"}


# ------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_tree(process: subprocess.Popen) -> None:
    """SIGTERM the process and everything it started (found before signalling), then SIGKILL stragglers."""
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=15)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until `url` answers at all (401 counts: Ray's dashboard wants a token); fail with the log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[:2]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def started(command: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield process
    finally:
        stop_process_tree(process)


def mlflow_server_command(folder: Path, port: int) -> list[str]:
    """`--artifacts-destination` (artifact serving is on by default) rather than
    `--default-artifact-root PATH`: new experiments then get `mlflow-artifacts:/` locations,
    so clients upload and download artifacts through the server over HTTP."""
    return [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"),
    ]


def ray_head_command(temp_dir: Path, gcs_port: int, dashboard_port: int) -> list[str]:
    """Every port chosen here, so a second Ray on the machine cannot collide with this one."""
    ports = {
        "--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(), "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    return [
        str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
        "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]


def ray_env(token_file: Path) -> dict[str, str]:
    """The venv's python first on PATH (the job's `python -m jobs.fit` runs with the head's
    environment), token authentication with this test's own token, and loopback addresses:
    Ray replaces 127.0.0.1 by the machine's network address unless told it is single-node."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def runs_by_name(client, experiment_id: str) -> tuple[object, dict[str, object]]:
    runs = client.search_runs([experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1, [run.info.run_name for run in parents]
    children = {run.info.run_name: run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    return parents[0], children


# -------------------------------------------------------------------------------- tests
def test_ray_job_submit_fits_categories_into_an_mlflow_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    import mlflow

    data = build_demo_dataset(tmp_path / "data", train=6, test_good=3, test_defect=1, size=64)
    output = tmp_path / "out"
    server_folder = tmp_path / "mlflow"
    server_folder.mkdir()
    # Ray's socket paths must stay under 107 characters: a short folder of our own in /tmp.
    ray_temp = Path(tempfile.mkdtemp(prefix="ray-e2e-", dir="/tmp"))
    token_file = tmp_path / "ray_token"
    token_file.write_text(secrets.token_hex(32))
    env = ray_env(token_file)
    mlflow_port, gcs_port, dashboard_port = free_port(), free_port(), free_port()
    uri = f"http://127.0.0.1:{mlflow_port}"
    categories = ["brick", "grass"]
    try:
        with started(mlflow_server_command(server_folder, mlflow_port), tmp_path / "mlflow.log") as server, \
                started(ray_head_command(ray_temp, gcs_port, dashboard_port), tmp_path / "ray.log", env) as head:
            wait_for_http(f"{uri}/health", server, tmp_path / "mlflow.log", timeout=120)
            wait_for_http(f"http://127.0.0.1:{dashboard_port}/api/version", head, tmp_path / "ray.log", timeout=120)
            submitted = time.monotonic()
            job = subprocess.run(
                [
                    str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard_port}",
                    "--working-dir", str(REPO),
                    "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": uri}}),
                    "--", "python", "-m", "jobs.fit", "--config", "configs/demo.yaml", "--data-root", str(data),
                    "--output", str(output), "--categories", ",".join(categories),
                    "--set", "tracking.experiment=padim-e2e", *FAST,
                ],
                env=env, capture_output=True, text=True, timeout=420,
            )
            log = job.stdout + job.stderr
            assert job.returncode == 0, log[-5000:]
            print(f"ray job submit took {time.monotonic() - submitted:.0f} s")
            assert "succeeded" in log
            for name in categories:
                assert f"[{name}] started: 6 train + 7 test images" in log
            assert "[2/2]" in log and "image AUROC" in log

            # What the driver left on the head's disk.
            summary = json.loads((output / "metrics.json").read_text())
            assert {name: entry["status"] for name, entry in summary["categories"].items()} == dict.fromkeys(categories, "ok")
            assert summary["tracking_uri"] == uri
            assert sorted(path.name for path in (output / "models").iterdir()) == [f"{name}.safetensors" for name in categories]
            assert not (output / "mlflow.db").exists()  # the server holds the runs, not a local file

            # What the MLflow server holds, read back over HTTP. `models:/` URIs resolve through
            # the default registry, which follows MLFLOW_TRACKING_URI (else ./mlflow.db).
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name("padim-e2e")
            assert experiment.artifact_location.startswith("mlflow-artifacts:")
            parent, children = runs_by_name(client, experiment.experiment_id)
            assert parent.info.status == "FINISHED"
            assert parent.data.params["padim.image_size"] == "64"
            assert parent.data.metrics["categories"] == 2 and parent.data.metrics["categories_failed"] == 0
            parent_files = {item.path for item in client.list_artifacts(parent.info.run_id, "config")}
            assert parent_files == {"config/demo.yaml", "config/resolved.yaml"}
            assert {item.path for item in client.list_artifacts(parent.info.run_id)} >= {"config", "metrics.json"}
            assert sorted(children) == categories
            for name, run in children.items():
                assert run.info.status == "FINISHED", run.data.tags.get("error")
                assert METRICS <= set(run.data.metrics)
                assert PARAMS <= set(run.data.params)
                assert run.data.params["n_train"] == "6" and run.data.params["image_size"] == "64x64"
                assert run.data.params["backbone"] == "efficientnet_lite0"
                assert 0.0 <= run.data.metrics["image_auroc"] <= 1.0
                assert run.data.metrics["image_auroc"] == pytest.approx(summary["categories"][name]["image_auroc"])
                top = {item.path for item in client.list_artifacts(run.info.run_id)}
                assert {"scores.parquet", "roc_curve.png", "score_histogram.png", "heatmaps"} <= top
                heatmaps = client.list_artifacts(run.info.run_id, "heatmaps")
                assert len(heatmaps) == 2 and all(item.path.endswith(".png") for item in heatmaps)
                version = client.get_model_version_by_alias(f"padim-{name}", "champion")
                assert version.run_id == run.info.run_id
                model_files = mlflow.artifacts.list_artifacts(
                    artifact_uri=f"models:/padim-{name}@champion", tracking_uri=uri
                )
                assert {"MLmodel", "python_model.pkl", "artifacts", "code"} <= {Path(item.path).name for item in model_files}
            # Artifacts went through the server into its artifact store.
            assert list((server_folder / "artifacts").rglob("scores.parquet"))

            # The registered model scores an image as the job did.
            run = children["brick"]
            table = pq.read_table(
                mlflow.artifacts.download_artifacts(
                    run_id=run.info.run_id, artifact_path="scores.parquet", dst_path=str(tmp_path / "dl"), tracking_uri=uri
                )
            ).to_pandas()
            assert len(table) == 7 and set(table.columns) >= {"source", "image_score", "is_anomalous", "label"}
            model = mlflow.pyfunc.load_model("models:/padim-brick@champion")
            defective = table[table.label == 1].iloc[0]
            image = Path(defective.source)
            scored = model.predict(pd.DataFrame({"image": [str(image), image.read_bytes()]}))
            assert list(scored.columns) == ["image_score", "is_anomalous", "error"]
            assert scored.image_score.tolist() == pytest.approx([defective.image_score] * 2, rel=1e-3)
            assert scored.is_anomalous.tolist() == [bool(defective.is_anomalous)] * 2
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)


def test_one_broken_category_fails_alone(tmp_path: Path) -> None:
    """Embedded local Ray and the default SQLite store, as `python -m jobs.fit` runs on a laptop."""
    from mlflow import MlflowClient

    data = build_demo_dataset(tmp_path / "data", train=5, test_good=2, test_defect=1, size=64)
    for extra in sorted((data / "gravel" / "train" / "good").iterdir())[1:]:
        extra.unlink()  # one training image: no covariance can be estimated
    (data / "grass" / "train" / "good" / "002.png").write_bytes(b"not an image")
    output = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    started_at = time.monotonic()
    job = subprocess.run(
        [sys.executable, "-m", "jobs.fit", "--config", str(CONFIG), "--data-root", str(data), "--output", str(output), *FAST],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )
    print(f"jobs.fit took {time.monotonic() - started_at:.0f} s")
    log = job.stdout + job.stderr
    assert job.returncode == 1, log[-5000:]
    assert "[3/3]" in log and "2 categories FAILED" in log

    summary = json.loads((output / "metrics.json").read_text())["categories"]
    assert summary["brick"]["status"] == "ok" and summary["brick"]["error"] is None
    assert 0.0 <= summary["brick"]["image_auroc"] <= 1.0
    assert summary["gravel"]["status"] == "failed"
    assert "at least 2 training images, got 1" in summary["gravel"]["error"]
    assert summary["grass"]["status"] == "failed"
    assert "002.png" in summary["grass"]["error"] and "ImageDecodeError" in summary["grass"]["error"]
    assert all(set(entry) >= {"image_auroc", "pixel_auroc", "aupro", "threshold", "n_train", "n_test", "fit_seconds",
                              "fit_images_per_second", "status", "error"} for entry in summary.values())
    # Only the category that succeeded has a model; nothing partial or temporary is left.
    assert [path.name for path in (output / "models").iterdir()] == ["brick.safetensors"]

    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("padim-demo")
    assert experiment.artifact_location == (output / "mlartifacts").as_uri()
    parent, children = runs_by_name(client, experiment.experiment_id)
    assert parent.info.status == "FAILED"
    assert children["brick"].info.status == "FINISHED"
    for name in ("grass", "gravel"):
        run = children[name]
        assert run.info.status == "FAILED"
        assert run.data.tags["error"] == summary[name]["error"]
        assert "error.txt" in {item.path for item in client.list_artifacts(run.info.run_id)}
    assert [model.name for model in client.search_registered_models()] == ["padim-brick"]
    assert f"mlflow ui --backend-store-uri sqlite:///{output / 'mlflow.db'}" in log


def test_bottle_auroc_matches_padim_core_evaluate(mvtec_root: Path, tmp_path: Path) -> None:
    """Through Ray and MLflow, the figures are padim_core's own: the job adds orchestration, not maths."""
    config = tmp_path / "bottle.yaml"
    config.write_text(CONFIG.read_text())
    overrides = ["--set", "padim.image_size=64", "--set", "fit.heatmap_examples=0", "--set", "fit.device=cpu"]
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    fit = subprocess.run(
        [sys.executable, "-m", "jobs.fit", "--config", str(config), "--data-root", str(mvtec_root),
         "--categories", "bottle", "--output", str(tmp_path / "out"), *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert fit.returncode == 0, (fit.stdout + fit.stderr)[-5000:]
    evaluate = subprocess.run(
        [sys.executable, "-m", "padim_core.evaluate", str(mvtec_root / "bottle"), "--config", str(config),
         "--image-size", "64", "--device", "cpu", "--json", str(tmp_path / "evaluate.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert evaluate.returncode == 0, (evaluate.stdout + evaluate.stderr)[-5000:]
    job = json.loads((tmp_path / "out" / "metrics.json").read_text())["categories"]["bottle"]
    reference = json.loads((tmp_path / "evaluate.json").read_text())
    print(f"bottle image AUROC: jobs.fit {job['image_auroc']:.6f}, padim_core.evaluate {reference['image_auroc']:.6f}")
    assert job["n_train"] == reference["n_train"] and job["n_test"] == reference["n_test"]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert job[key] == pytest.approx(reference[key], abs=1e-4), key
