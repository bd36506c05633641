"""The per-category Ray runner: one task per (category, detector), tracked in MLflow.

A per-category job (`jobs.fit`, `jobs.shift`, ...) says what its units are, what each task
does, what the driver logs when a result comes back and what it reports at the end; this module
does the rest, the same way for every job: check the data and the tracking store, start or join
Ray, open the parent run and one child run per unit, submit the tasks, collect them in the order
they finish, close every run still open when interrupted, shut Ray down.

Tasks never raise: they return a `TaskResult`, failed or not, so one category's failure never
stops the others. A task whose worker died (more often than Ray's retries allow) comes back as a
failed result too.
"""

from __future__ import annotations

import contextlib
import socket
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import ray
from mlflow import MlflowClient

from jobs.common import ray_runtime, tracking
from jobs.common.categories import category_problem
from jobs.common.config import JobConfig
from padim_core.datasets import discover_categories
from padim_core.errors import ConfigError, DatasetError

OK, FAILED = "ok", "failed"


@dataclass(frozen=True)
class Unit:
    """One task's work: a category and a detector kind."""

    category: str
    detector: str

    @property
    def label(self) -> str:
        return f"{self.category}/{self.detector}"


@dataclass
class TaskResult:
    """What a task returns: the status, the reason of a failure, and the job's own figures."""

    category: str
    detector: str
    status: str = FAILED
    error: str | None = None
    traceback: str | None = None
    seconds: float | None = None
    host: str | None = None
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def label(self) -> str:
        return f"{self.category}/{self.detector}"


def describe_error(error: BaseException) -> str:
    """The error's type and the first line of its message: short enough for a table cell."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else 'no message'}"


def run_unit(unit: Unit, work: Callable[[TaskResult], None]) -> TaskResult:
    """Inside a task: `work` fills the result's values; any exception becomes a failed result."""
    result = TaskResult(unit.category, unit.detector, host=socket.gethostname())
    started = time.perf_counter()
    try:
        work(result)
        result.status = OK
    except Exception as error:  # noqa: BLE001 - any failure belongs to this unit alone
        result.error = describe_error(error)
        result.traceback = traceback.format_exc()
    result.seconds = time.perf_counter() - started
    return result


def select_categories(setting: str | Sequence[str], root: Path) -> list[str]:
    """'all': every category folder under `root`; a list is taken as given, so a listed
    category with a missing train folder fails alone rather than stopping the job."""
    if setting == "all":
        names = discover_categories(root)
        for name in names:
            if category_problem(name):
                raise DatasetError(f"category folder {root / name}: {category_problem(name)}; rename it")
        return names
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    for name in setting:
        if category_problem(name):
            raise ConfigError(f"data.categories: {category_problem(name)}")
    return list(setting)


@dataclass
class RunContext:
    """What the runner set up, for the job's hooks."""

    client: MlflowClient
    tracking_uri: str
    experiment_id: str
    parent_id: str
    resources: ray_runtime.TaskResources
    cluster: str
    began: float


class PerCategoryJob(ABC):
    """A job made of one Ray task per unit. Subclasses fill in the hooks; `run_job` runs it."""

    name: ClassVar[str]  # "fit": prints as `padim-fit`, runs named `fit-<date>`

    def __init__(self, config: JobConfig, config_file: Path | None, detectors: Sequence[str] = ()) -> None:
        self.config = config
        self.config_file = config_file
        self.kinds = list(detectors) or [config.detector]
        self.output = config.output_folder
        self.root = Path(config.data.root).expanduser().resolve()
        self.categories: list[str] = []
        self.tracking_uri = ""  # the rest is set by `prepare_job`
        self.client: MlflowClient | None = None
        self.experiment_id = ""

    @property
    def prog(self) -> str:
        return f"padim-{self.name}"

    def say(self, text: str) -> None:
        print(f"{self.prog}: {text}", flush=True)

    # --------------------------------------------------------------------- hooks
    def prepare(self) -> None:
        """Checks that need no Ray (the runner already found the categories); raise PadimError."""

    @abstractmethod
    def task(self) -> Callable[[Any], TaskResult]:
        """The module-level function each Ray task runs (Ray ships it by module reference)."""

    @abstractmethod
    def request(self, unit: Unit, run_id: str, context: RunContext) -> Any:
        """Everything one task needs, built by the driver and shipped to the worker."""

    def parent_params(self) -> dict[str, Any]:
        return {}

    def child_params(self, unit: Unit) -> dict[str, Any]:
        return tracking.detector_params(self.config, unit.detector)

    def on_result(self, result: TaskResult, run_id: str, context: RunContext) -> None:
        """Driver-side logging of a finished task (its child run is closed after this)."""

    @abstractmethod
    def progress_line(self, result: TaskResult) -> str:
        """What one finished task says; the runner prefixes the count."""

    @abstractmethod
    def finish(self, results: list[TaskResult], context: RunContext) -> list[str]:
        """Reports once every task is back; returns the summary lines to print."""


def prepare_job(job: PerCategoryJob) -> PerCategoryJob:
    """Every check before Ray starts: data root and categories, the tracking server, the job's own
    checks, the tracking store. A job refused here leaves nothing behind, unless its own checks
    or a local store had to create the output folder."""
    job.categories = select_categories(job.config.data.categories, job.root)
    job.tracking_uri = tracking.resolve_tracking_uri(job.config.tracking.tracking_uri, job.output)
    tracking.check_reachable(job.tracking_uri)
    job.prepare()
    job.client = MlflowClient(job.tracking_uri)
    job.experiment_id = tracking.prepare_experiment(job.client, job.config.tracking.experiment, job.tracking_uri, job.output)
    return job


def run_job(job: PerCategoryJob) -> int:
    """Run a prepared job; 0 when every unit succeeded, 1 when any failed."""
    began = time.perf_counter()
    client, config = job.client, job.config
    units = [Unit(category, kind) for category in job.categories for kind in job.kinds]
    job.say(f"{len(job.categories)} categories x {len(job.kinds)} detectors ({', '.join(job.kinds)}) from {job.root} -> {job.output}")
    job.say(f"tracking at {job.tracking_uri}, experiment {config.tracking.experiment!r}")
    cluster = ray_runtime.connect()
    parent_id = None
    child_ids: dict[Unit, str] = {}
    try:
        resources = ray_runtime.task_resources(config.tasks)
        job.say(f"{cluster}; {resources.describe()}")
        parent_id = tracking.start_parent_run(
            client, job.experiment_id, job.name,
            params={**job.parent_params(), "categories": ",".join(job.categories),
                    "detectors": ",".join(job.kinds), "device": resources.device},
            tags={"data_root": str(job.root), "ray": cluster}, config=config, config_file=job.config_file,
        )
        context = RunContext(client, job.tracking_uri, job.experiment_id, parent_id, resources, cluster, began)
        remote = ray.remote(job.task())
        pending = {}
        for unit in units:
            child_ids[unit] = tracking.start_child_run(
                client, job.experiment_id, parent_id, unit.category, unit.detector, job.child_params(unit))
            options = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus,
                       "max_retries": resources.max_retries, "name": f"{job.name}-{unit.category}-{unit.detector}"}
            pending[remote.options(**options).remote(job.request(unit, child_ids[unit], context))] = unit
        results: dict[Unit, TaskResult] = {}
        for unit, result in ray_runtime.as_completed(pending):
            if isinstance(result, ray.exceptions.RayError):
                result = TaskResult(unit.category, unit.detector, error=describe_error(result))
            results[unit] = result
            job.on_result(result, child_ids[unit], context)
            _close_child_run(client, child_ids[unit], result)
            print(f"[{len(results)}/{len(units)}] {result.label}: {job.progress_line(result)}", flush=True)
    except BaseException as error:
        # Interrupted or broken before every task reported: close the runs still RUNNING.
        status = "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"
        for run_id in [*child_ids.values(), *([parent_id] if parent_id else [])]:
            with contextlib.suppress(Exception):  # best effort: the original error matters more
                if client.get_run(run_id).info.status == "RUNNING":
                    tracking.end_run(client, run_id, status)
        raise
    finally:
        ray.shutdown()

    ordered = [results[unit] for unit in units]
    lines = job.finish(ordered, context)
    failed = [result for result in ordered if not result.ok]
    tracking.log_values(client, parent_id, metrics={"units": len(ordered), "units_failed": len(failed)})
    if failed:
        tracking.fail_run(client, parent_id, f"{len(failed)} of {len(ordered)} failed: "
                          + ", ".join(result.label for result in failed))
    else:
        tracking.end_run(client, parent_id)
    print()
    for line in lines:
        print(line)
    print(f"MLflow:  experiment {config.tracking.experiment!r} (id {job.experiment_id}), parent run {parent_id}")
    print(f"view:    {tracking.ui_hint(job.tracking_uri, job.experiment_id, parent_id)}")
    print(f"done in {time.perf_counter() - began:.1f} s" + (f"; {len(failed)} FAILED" if failed else ""), flush=True)
    return 1 if failed else 0


def _close_child_run(client: MlflowClient, run_id: str, result: TaskResult) -> None:
    if result.ok:
        tracking.end_run(client, run_id)
        return
    tracking.fail_run(client, run_id, result.error or "failed")
    if result.traceback:
        client.log_text(run_id, result.traceback, "error.txt")
