"""The per-category runner's parts that need no Ray: choosing categories, turning a task's failure
into a result, and the checks made before anything starts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jobs.common import runner, tracking
from jobs.common.config import load_job_config
from jobs.common.runner import (
    PerCategoryJob,
    TaskResult,
    Unit,
    describe_error,
    prepare_job,
    run_unit,
    select_categories,
)
from padim_core.errors import ConfigError, DatasetError

from support.servers import free_port


def test_select_categories(tmp_path: Path) -> None:
    for name in ("b", "a"):
        (tmp_path / name / "train" / "good").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    assert select_categories("all", tmp_path) == ["a", "b"]
    # A listed category that is missing is kept: it fails alone, with the reason, in its own run.
    assert select_categories(("b", "missing"), tmp_path) == ["b", "missing"]
    for bad in ("../etc", "a/b", ".", "..", "my images", "-x", "x" * 101):
        with pytest.raises(ConfigError, match="is not a usable category name"):
            select_categories((bad,), tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        select_categories(("a",), tmp_path / "nowhere")
    with pytest.raises(DatasetError):
        select_categories("all", tmp_path / "nowhere")


def test_run_unit_turns_an_exception_into_a_failed_result_with_its_traceback() -> None:
    def broken(result: TaskResult) -> None:
        result.values["n_train"] = 1
        raise ValueError("a covariance needs at least 2 training images, got 1\nsecond line")

    result = run_unit(Unit("gravel", "padim"), broken)
    assert result.status == runner.FAILED and not result.ok
    assert result.error == "ValueError: a covariance needs at least 2 training images, got 1"
    assert result.traceback.startswith("Traceback") and "in broken" in result.traceback and "second line" in result.traceback
    assert result.values == {"n_train": 1}  # what the task learned before failing is kept
    assert (result.category, result.detector, result.label) == ("gravel", "padim", "gravel/padim")
    assert result.seconds is not None and result.seconds >= 0 and result.host


def test_run_unit_marks_a_unit_that_worked_ok() -> None:
    result = run_unit(Unit("brick", "padim"), lambda result: result.values.update(image_auroc=0.9))
    assert result.ok and result.status == runner.OK and result.error is None and result.traceback is None
    assert result.values == {"image_auroc": 0.9}


def test_describe_error_is_one_line() -> None:
    assert describe_error(KeyError("mean")) == "KeyError: 'mean'"
    assert describe_error(RuntimeError("  first\nsecond  ")) == "RuntimeError: first"
    assert describe_error(RuntimeError()) == "RuntimeError: no message"


class RecordingJob(PerCategoryJob):
    """A job whose hooks only record that they ran."""

    name = "record"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.prepared = False

    def prepare(self) -> None:
        self.prepared = True
        self.output.mkdir(parents=True)

    def task(self) -> Callable[[Any], TaskResult]:
        return lambda request: run_unit(request, lambda result: None)

    def request(self, unit: Unit, run_id: str, context: Any) -> Any:
        return unit

    def progress_line(self, result: TaskResult) -> str:
        return result.status

    def finish(self, results: list[TaskResult], context: Any) -> list[str]:
        return []


def test_prepare_job_checks_the_data_and_tracking_store_before_the_job_creates_anything(tmp_path: Path) -> None:
    (tmp_path / "data" / "widget" / "train" / "good").mkdir(parents=True)
    unreachable = f"http://127.0.0.1:{free_port()}"
    config = load_job_config(None, [f"data.root={tmp_path / 'data'}", f"output={tmp_path / 'out'}",
                                    f"tracking.tracking_uri={unreachable}"])
    job = RecordingJob(config, None)
    with pytest.raises(tracking.TrackingError, match="unreachable"):
        prepare_job(job)
    assert not job.prepared and not (tmp_path / "out").exists()
    assert job.categories == ["widget"] and job.prog == "padim-record"

    missing = RecordingJob(load_job_config(None, [f"data.root={tmp_path / 'none'}", f"output={tmp_path / 'out'}"]), None)
    with pytest.raises(DatasetError):
        prepare_job(missing)
    assert not missing.prepared


def test_prepare_job_opens_the_experiment_in_the_output_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "data" / "widget" / "train" / "good").mkdir(parents=True)
    config = load_job_config(None, [f"data.root={tmp_path / 'data'}", f"output={tmp_path / 'out'}", "tracking.experiment=rec"])
    job = prepare_job(RecordingJob(config, None))
    assert job.prepared and job.tracking_uri == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    assert job.client.get_experiment(job.experiment_id).name == "rec"
    assert job.kinds == ["padim"]
