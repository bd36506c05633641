"""The pieces of jobs.fit: tracking URI resolution, the fail-fast server check, GPU and device
choice, the summary table, config flags, a failing category's run, and the pyfunc model."""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
from mlflow import MlflowClient

from jobs import fit, ray_runtime, tracking
from padim_core.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------- tracking URIs
def test_tracking_uri_prefers_config_then_environment_then_sqlite_in_output(tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": "http://tracking.example:5000"}
    assert tracking.resolve_tracking_uri("sqlite:///x.db", tmp_path, env) == "sqlite:///x.db"
    assert tracking.resolve_tracking_uri(None, tmp_path, env) == "http://tracking.example:5000"
    assert tracking.resolve_tracking_uri(None, tmp_path, {"MLFLOW_TRACKING_URI": ""}) == f"sqlite:///{tmp_path}/mlflow.db"


def test_default_sqlite_uri_is_absolute_even_for_a_relative_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = tracking.resolve_tracking_uri(None, "outputs/demo", {})
    assert uri == f"sqlite:///{tmp_path}/outputs/demo/mlflow.db"
    assert tracking.ui_hint(uri, "1", "abc") == f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/outputs/demo/mlflow.db"
    assert tracking.ui_hint("http://127.0.0.1:5000/", "3", "abc") == "open http://127.0.0.1:5000/#/experiments/3/runs/abc"


def test_unreachable_server_is_a_clear_error_within_seconds() -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(tracking.TrackingError) as caught:
        tracking.check_reachable(uri)
    assert time.monotonic() - started < 3
    message = str(caught.value)
    assert uri in message and "unreachable" in message and "MLFLOW_TRACKING_URI" in message


def test_any_http_answer_counts_as_reachable() -> None:
    """A proxy or server without /health still answers: only no answer at all is an error."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        tracking.check_reachable(f"http://127.0.0.1:{server.server_port}")
        tracking.check_reachable("sqlite:///anything.db")  # local stores are checked by using them
    finally:
        server.shutdown()
        server.server_close()


def test_job_with_unreachable_server_stops_before_ray_and_fitting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data" / "widget" / "train" / "good").mkdir(parents=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = time.monotonic()
    code = fit.main(["--config", str(CONFIG), "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "out")])
    assert code == 2
    assert time.monotonic() - started < 10
    assert "unreachable" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()


def test_flat_params_and_model_params_name_every_value() -> None:
    config = load_config(CONFIG, ["padim.image_size=64"])
    flat = tracking.flat_params(config.to_dict())
    assert flat["padim.layers"] == "blocks.1,blocks.2,blocks.4" and flat["fit.num_gpus"] == "auto"
    params = tracking.model_params(config)
    assert params["image_size"] == "64x64" and params["backbone"] == "efficientnet_lite0"
    assert {"backbone", "layers", "n_features", "image_size", "seed"} <= set(params)


# ----------------------------------------------------------------- resources and device
@pytest.mark.parametrize(
    ("setting", "available", "expected"),
    [("auto", 0.0, 0.0), ("auto", 4.0, 1.0), ("auto", 0.5, 0.0), (0.0, 2.0, 0.0), (0.25, 1.0, 0.25), (2.0, 2.0, 2.0)],
)
def test_num_gpus_per_task(setting: str | float, available: float, expected: float) -> None:
    assert ray_runtime.resolve_num_gpus(setting, available) == expected


def test_asking_for_more_gpus_than_the_cluster_has_is_an_error_not_a_hang() -> None:
    with pytest.raises(ValueError, match="has 0 GPUs"):
        ray_runtime.resolve_num_gpus(1.0, 0.0)


def test_unreachable_ray_address_is_a_clear_error_within_seconds() -> None:
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="unreachable"):
        ray_runtime.check_reachable(f"127.0.0.1:{closed_port()}")
    with pytest.raises(ConnectionError, match="dashboard URL"):
        ray_runtime.check_reachable("http://127.0.0.1:8265")
    assert time.monotonic() - started < 3
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        ray_runtime.check_reachable(f"127.0.0.1:{listening.getsockname()[1]}")
    ray_runtime.check_reachable("auto")  # left to Ray


def test_task_device_follows_the_gpu_share() -> None:
    assert ray_runtime.task_device("auto", 1.0) == "cuda"
    assert ray_runtime.task_device("auto", 0.0) == "cpu"
    assert ray_runtime.task_device("cpu", 1.0) == "cpu"
    with pytest.raises(ValueError, match="no GPUs"):
        ray_runtime.task_device("cuda", 0.0)
    assert ray_runtime.torch_threads(0.5) == 1 and ray_runtime.torch_threads(2.0) == 2


# ---------------------------------------------------------------------- driver output
def _result(category: str, **values: object) -> dict[str, object]:
    result = fit._empty_result(category, "run")
    result.update(values)
    return result


def test_summary_table_fits_a_screen_and_lists_failures() -> None:
    results = [
        _result("bottle", status="ok", n_train=209, n_test=83, image_auroc=0.99841, pixel_auroc=0.9812, aupro=0.9123,
                threshold=12.3456, fit_seconds=41.25, fit_images_per_second=5.07),
        _result("cable", status="ok", n_train=224, n_test=150, image_auroc=None, fit_seconds=3.0, fit_images_per_second=74.7),
        _result("broken_category", error="ValueError: a covariance needs at least 2 training images, got 1", n_train=1),
    ]
    table = fit.format_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["category", "status", "train", "test", "img", "AUROC", "px", "AUROC", "AUPRO", "threshold", "fit", "s", "img/s"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["bottle", "ok", "209", "83", "0.998", "0.981", "0.912", "12.35", "41.2", "5.1"]
    assert lines[3].split() == ["cable", "ok", "224", "150", "-", "-", "-", "-", "3.0", "74.7"]
    assert lines[4].split()[:3] == ["broken_category", "failed", "1"]
    assert lines[-1] == "broken_category failed: ValueError: a covariance needs at least 2 training images, got 1"
    # columns line up: every row's numbers end where their header ends
    assert len({len(line) for line in lines[:4]}) == 1
    assert max(len(line) for line in lines[:5]) <= 100


def test_progress_lines_say_what_finished() -> None:
    done = _result("bottle", status="ok", n_train=209, n_test=83, image_auroc=0.9984, seconds=50.04)
    assert fit.progress_line(1, 3, done) == "[1/3] bottle: done in 50.0 s: 209 train + 83 test images, image AUROC 0.998"
    failed = _result("cable", error="DatasetError: no training images in /d/cable/train/good", seconds=0.4)
    assert fit.progress_line(2, 3, failed) == "[2/3] cable: FAILED after 0.4 s: DatasetError: no training images in /d/cable/train/good"


@pytest.mark.parametrize(
    ("labels", "count", "normal", "defective"),
    [([0] * 5 + [1] * 10, 4, 2, 2), ([0] * 1 + [1] * 10, 4, 1, 3), ([0] * 6, 4, 4, 0), ([0, 1], 0, 0, 0)],
)
def test_heatmap_sample_mixes_normal_and_defective(labels: list[int], count: int, normal: int, defective: int) -> None:
    labels = np.array(labels)
    chosen = fit.heatmap_sample(labels, count)
    assert len(chosen) == len(set(chosen)) == normal + defective
    assert (labels[chosen] == 0).sum() == normal and (labels[chosen] == 1).sum() == defective


def test_defective_heatmaps_spread_over_the_group() -> None:
    labels = np.array([0] * 4 + [1] * 9)
    assert fit.heatmap_sample(labels, 4) == [0, 3, 4, 12]


# ------------------------------------------------------------------------ config flags
def test_flags_override_the_config_and_paths_stay_verbatim(tmp_path: Path) -> None:
    args = fit.parse_args([
        "--config", str(CONFIG), "--data-root", str(tmp_path / "on"), "--categories", "brick, grass",
        "--output", str(tmp_path / "1e3"), "--set", "padim.n_features=50",
    ])
    config = fit.build_config(args)
    assert config.data.root == str(tmp_path / "on") and config.output == str(tmp_path / "1e3")
    assert config.data.categories == ("brick", "grass") and config.padim.n_features == 50
    assert fit.build_config(fit.parse_args(["--config", str(CONFIG), "--categories", "all"])).data.categories == "all"
    with pytest.raises(ConfigError, match="n_features"):
        fit.build_config(fit.parse_args(["--config", str(CONFIG), "--set", "padim.n_features=0"]))


def test_select_categories(tmp_path: Path) -> None:
    for name in ("b", "a"):
        (tmp_path / name / "train" / "good").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    assert fit.select_categories("all", tmp_path) == ["a", "b"]
    # A listed category that is missing is kept: it fails alone, with the reason, in its own run.
    assert fit.select_categories(("b", "missing"), tmp_path) == ["b", "missing"]
    with pytest.raises(ConfigError, match="not a category folder name"):
        fit.select_categories(("../etc",), tmp_path)


def test_metrics_json_is_written_atomically(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    fit.write_json(target, {"categories": {"a": {"image_auroc": None}}})
    assert json.loads(target.read_text()) == {"categories": {"a": {"image_auroc": None}}}
    assert [path.name for path in tmp_path.iterdir()] == ["metrics.json"]


# --------------------------------------------------------------- a failing category's run
def test_failing_category_returns_the_reason_and_marks_its_run_failed(tmp_path: Path) -> None:
    """The task function itself, without Ray: it must never raise, and must leave a FAILED run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = tracking.prepare_experiment(client, "unit", uri, tmp_path)
    config = load_config(CONFIG, ["padim.image_size=64"])
    parent = tracking.start_parent_run(client, experiment, "fit", {}, {})
    run_id = tracking.start_child_run(client, experiment, parent, "missing", tracking.model_params(config))
    request = fit.FitRequest("missing", str(tmp_path / "missing"), config, str(tmp_path / "models"), uri, run_id, "cpu", 1)
    result = fit.fit_category(request)
    assert result["status"] == "failed"
    assert result["error"].startswith("DatasetError: ") and "train/good is missing" in result["error"]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == result["error"]
    assert run.data.tags["mlflow.parentRunId"] == parent
    trace = Path(client.download_artifacts(run_id, "error.txt", str(tmp_path))).read_text()
    assert trace.startswith("Traceback") and "DatasetError" in trace
    assert not (tmp_path / "models").exists()
    assert experiment and client.get_experiment(experiment).artifact_location == (tmp_path / "mlartifacts").as_uri()


# --------------------------------------------------------------------- the pyfunc model
@pytest.mark.slow
def test_pyfunc_model_scores_paths_and_bytes_and_reports_bad_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from padim_core.demo_data import build_demo_dataset
    from padim_core.loader import image_batches
    from padim_core.model import PadimModel

    data = build_demo_dataset(tmp_path / "data", train=4, test_good=1, test_defect=1, size=64)
    model = PadimModel("efficientnet_lite0", n_features=20, image_size=64, device="cpu")
    train = sorted((data / "brick" / "train" / "good").iterdir())
    model.fit(image_batches(train, model.transform, batch_size=4, workers=1))
    test_image = data / "brick" / "test" / "hole" / "000.png"
    expected, _ = model.predict_one(test_image)
    model.calibrate(expected - 1.0)  # this image is just above the threshold
    model_file = model.save(tmp_path / "brick.safetensors")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # models:/ URIs resolve through the default registry
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = MlflowClient(uri)
    experiment = tracking.prepare_experiment(client, "pyfunc", uri, tmp_path)
    versions = []
    for _ in range(2):
        run_id = client.create_run(experiment).info.run_id
        versions.append(tracking.log_pyfunc_model(uri, run_id, model_file, "padim-unit", "champion"))
        assert client.get_run(run_id).info.status == "FINISHED"
    assert versions == ["1", "2"]
    # no fluent state left behind in this process
    assert mlflow.tracking._tracking_service.utils._tracking_uri is None and os.environ["MLFLOW_TRACKING_URI"] == uri
    assert str(client.get_model_version_by_alias("padim-unit", "champion").version) == "2"  # the alias follows the newest

    loaded = mlflow.pyfunc.load_model("models:/padim-unit@champion")
    frame = pd.DataFrame({"image": [str(test_image), test_image.read_bytes(), b"\x89PNG broken", str(tmp_path / "nope.png")]})
    scored = loaded.predict(frame)
    assert list(scored.columns) == ["image_score", "is_anomalous", "error"] and len(scored) == 4
    assert scored.image_score[:2].tolist() == pytest.approx([expected, expected], rel=1e-4)
    assert scored.is_anomalous[:2].tolist() == [True, True]
    assert scored.image_score[2:].isna().all() and scored.is_anomalous[2:].isna().all()
    assert "cannot decode" in scored.error[2] and "nope.png" in scored.error[3]
    assert scored.error[:2].isna().all()
    by_path = loaded.predict(pd.DataFrame({"path": [str(test_image)] * 3}), params={"batch_size": 2})
    assert by_path.image_score.tolist() == pytest.approx([expected] * 3, rel=1e-4)
    with pytest.raises(Exception, match="column 'image' or 'path'"):
        loaded.predict(pd.DataFrame({"file": [str(test_image)]}))
