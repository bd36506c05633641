"""MLflow for the jobs: where runs go, the fail-fast server check, and the run layout."""

from __future__ import annotations

import http.server
import math
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from jobs.common import tracking
from jobs.common.config import load_job_config
from padim_core.datasets import MvtecCategory
from padim_core.demo_data import build_demo_dataset
from padim_core.errors import PadimError
from padim_core.manifest import split_by_fraction

from support.paths import DEMO_CONFIG
from support.servers import free_port


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
    assert tracking.ui_hint("file:///runs", "3", "abc") == "MLFLOW_TRACKING_URI=file:///runs mlflow ui"


def test_unreachable_server_is_a_clear_error_within_seconds() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(tracking.TrackingError) as caught:
        tracking.check_reachable(uri)
    assert time.monotonic() - started < 3
    message = str(caught.value)
    assert uri in message and "unreachable" in message and "MLFLOW_TRACKING_URI" in message
    assert isinstance(caught.value, PadimError)


def test_any_http_answer_counts_as_reachable() -> None:
    """A proxy or server without /health still answers: only no answer at all is an error."""

    asked: list[str] = []

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        tracking.check_reachable(f"http://127.0.0.1:{server.server_port}/")  # raises nothing
        assert asked == ["/health"]
        tracking.check_reachable("sqlite:///anything.db")  # local stores are checked by using them
        assert asked == ["/health"]
    finally:
        server.shutdown()
        server.server_close()


def test_flat_params_and_detector_params_name_every_value() -> None:
    config = load_job_config(DEMO_CONFIG, ["padim.image_size=[64, 96]"])
    flat = tracking.flat_params(config.to_dict())
    assert flat["padim.layers"] == "blocks.1,blocks.2,blocks.4" and flat["tasks.num_gpus"] == "auto"
    assert flat["calibration.fraction"] == "0.2" and flat["calibration.false_alarm_rate"] == "None"
    assert flat["drift.trim"] == "0.5" and flat["output"] == "outputs/demo"
    params = tracking.detector_params(config, "padim")
    assert params["detector"] == "padim" and params["image_size"] == "64x96"
    assert params["backbone"] == "efficientnet_lite0" and params["layers"] == "blocks.1,blocks.2,blocks.4"
    assert {"n_features", "seed", "regularization", "distance_metric", "blur_sigma", "pretrained"} <= set(params)
    assert all(isinstance(value, str) for value in params.values())


def test_registered_models_are_named_detector_then_category() -> None:
    assert tracking.registered_name("padim", "bottle") == "padim-bottle"
    assert tracking.registered_name("patchcore", "metal_nut") == "patchcore-metal_nut"


def test_metric_segments_keep_only_what_mlflow_accepts() -> None:
    assert tracking.metric_segment("metal_nut") == "metal_nut"
    assert tracking.metric_segment("a/b+c (v2)") == "a_b_c _v2_"


def test_a_split_becomes_the_runs_dataset_inputs(tmp_path: Path) -> None:
    """Fit, calibration and test files show as three datasets with their contexts; the digest
    follows the files' content, so a run on other files shows another digest."""
    root = build_demo_dataset(tmp_path / "data", train=5, test_good=1, test_defect=1, size=32) / "brick"
    split = split_by_fraction(MvtecCategory.from_folder(root), 0.4, seed=0)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracking.prepare_experiment(client, "e", client.tracking_uri, tmp_path)
    first, second = (client.create_run(experiment).info.run_id for _ in range(2))
    tracking.log_split_inputs(client, first, split)
    other = split_by_fraction(MvtecCategory.from_folder(root), 0.4, seed=1)  # other calibration images
    tracking.log_split_inputs(client, second, other)

    def inputs(run_id: str) -> dict[str, tuple[str, str, str]]:
        found = client.get_run(run_id).inputs.dataset_inputs
        return {item.dataset.name: (item.tags[0].value, item.dataset.digest, item.dataset.profile) for item in found}

    logged = inputs(first)
    assert {name: context for name, (context, _, _) in logged.items()} == {
        "brick-fit": "training", "brick-calibration": "calibration", "brick-test": "testing"}
    assert logged["brick-calibration"][2] == '{"num_rows": 2}' and logged["brick-fit"][2] == '{"num_rows": 3}'
    again = inputs(second)
    assert again["brick-test"][1] == logged["brick-test"][1]
    assert again["brick-calibration"][1] != logged["brick-calibration"][1]
    found = client.search_runs([experiment], "dataset.context = 'calibration' and dataset.name = 'brick-calibration'")
    assert {run.info.run_id for run in found} == {first, second}


def test_runs_follow_the_layout_parent_then_one_child_per_category_and_detector(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = tracking.prepare_experiment(client, "layout", uri, tmp_path)
    assert tracking.prepare_experiment(client, "layout", uri, tmp_path) == experiment  # found, not created again
    assert client.get_experiment(experiment).artifact_location == (tmp_path / "mlartifacts").as_uri()
    config = load_job_config(DEMO_CONFIG)
    parent = tracking.start_parent_run(client, experiment, "fit", {"categories": "bottle"}, {"ray": "local"},
                                       config=config, config_file=DEMO_CONFIG)
    child = tracking.start_child_run(client, experiment, parent, "bottle", "padim", tracking.detector_params(config, "padim"))
    run = client.get_run(child)
    assert run.info.run_name == "bottle-padim" and run.info.status == "RUNNING"
    assert {key: run.data.tags[key] for key in ("category", "detector", "mlflow.parentRunId")} == {
        "category": "bottle", "detector": "padim", "mlflow.parentRunId": parent}
    assert run.data.params["detector"] == "padim" and run.data.params["image_size"] == "128x128"
    top = client.get_run(parent)
    assert top.info.run_name.startswith("fit-") and top.data.tags["job"] == "jobs.fit" and top.data.tags["ray"] == "local"
    assert {item.path for item in client.list_artifacts(parent, "config")} == {"config/demo.yaml", "config/resolved.yaml"}

    tracking.log_values(client, child, metrics={"image_auroc": None, "threshold": 1.5})
    metrics = client.get_run(child).data.metrics
    assert math.isnan(metrics["image_auroc"]) and metrics["threshold"] == 1.5  # the same names on every run
    tracking.fail_run(client, child, "x" * 10_000)
    failed = client.get_run(child)
    assert failed.info.status == "FAILED" and len(failed.data.tags[tracking.ERROR_TAG]) == 4000
    tracking.end_run(client, parent)
    assert client.get_run(parent).info.status == "FINISHED"


def test_a_deleted_experiment_is_a_clear_error(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.delete_experiment(tracking.prepare_experiment(client, "gone", uri, tmp_path))
    with pytest.raises(tracking.TrackingError, match="'gone' is deleted.*mlflow experiments restore"):
        tracking.prepare_experiment(client, "gone", uri, tmp_path)
