"""MLflow for jobs: where runs go and the run layout.

Layout: one parent run per job invocation, one child run per (category, detector) with the
same param and metric names for every category and detector, so MLflow's Compare view lines
them up; fitted models are registered as `<detector>-<category>` (`jobs.common.pyfunc`).

Everything goes through an explicit `MlflowClient(tracking_uri)`: the fluent API keeps a
process-wide "active run", which Ray workers and threads must not share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from padim_core.errors import PadimError
from padim_core.manifest import SplitManifest

DATABASE_NAME = "mlflow.db"
ARTIFACTS_FOLDER = "mlartifacts"
ERROR_TAG = "error"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""MLflow 3's experiment tag for the UI's model-training view (the other kind is GenAI development)."""

# Tag values above MLflow's limit (8000) are refused; a reason this long is a traceback anyway.
_MAX_REASON = 4000



class TrackingError(PadimError):
    """The tracking store cannot be used; raised before any fitting starts."""


def resolve_tracking_uri(configured: str | None, output: str | Path, environ: Mapping[str, str] = os.environ) -> str:
    """The config's `tracking.tracking_uri`, else `MLFLOW_TRACKING_URI`, else SQLite in `output`."""
    if configured:
        return configured
    if environ.get("MLFLOW_TRACKING_URI"):
        return environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output).resolve() / DATABASE_NAME}"


def is_http(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def is_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast and clearly when an HTTP tracking server does not answer.

    MLflow's own client retries a dead server with exponential backoff for minutes before
    it gives up; a one-shot probe of the server's `/health` says the same in a second. Any
    HTTP answer, even an error status, means something is listening there.
    """
    if not is_http(uri):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except OSError as error:  # refused, timed out, unknown host (URLError is an OSError)
        reason = getattr(error, "reason", error)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it (mlflow server ...), "
            "or point MLFLOW_TRACKING_URI or tracking.tracking_uri at a running one, or unset both "
            "to use a local SQLite file in the output folder"
        ) from None


def ui_hint(uri: str, experiment_id: str, run_id: str) -> str:
    """How a person opens these runs: the exact `mlflow ui` command, or the server's page."""
    if is_sqlite(uri):
        return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"
    if is_http(uri):
        return f"open {uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"MLFLOW_TRACKING_URI={shlex.quote(uri)} mlflow ui"


def prepare_experiment(client: MlflowClient, name: str, uri: str, output: str | Path) -> str:
    """The experiment's id, creating it when needed; reading the store also proves it works.

    With a local database, new experiments keep their artifacts next to it, under
    `OUTPUT/mlartifacts` (MLflow's default would be `./mlruns` in whatever folder the job
    happens to start in). A server decides for itself where artifacts go. The experiment is
    tagged as model development (`EXPERIMENT_KIND`), so MLflow 3's UI opens on its runs and
    model-training views rather than the GenAI ones.
    """
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"MLflow experiment {name!r} is deleted at {uri}; restore it "
                    "(mlflow experiments restore) or set tracking.experiment to another name"
                )
            if EXPERIMENT_KIND[0] not in experiment.tags:
                client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
            return experiment.experiment_id
        location = (Path(output).resolve() / ARTIFACTS_FOLDER).as_uri() if is_sqlite(uri) else None
        return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except mlflow.exceptions.MlflowException as error:
        raise TrackingError(f"MLflow tracking store {uri} cannot be used: {error.message}") from None


def flat_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> `section.key` params; lists joined with commas."""
    params: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            params.update(flat_params(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            params[name] = ",".join(str(item) for item in value)
        else:
            params[name] = str(value)
    return params


def detector_params(config: Any, kind: str) -> dict[str, str]:
    """The child-run params of a detector: its kind and its config section, e.g. `backbone`,
    `layers`, `image_size` (`HxW`), `n_features`, `augmentation.copies` (names shared by every category)."""
    params = {"detector": kind}
    for key, value in config.detector_section(kind).detector_kwargs().items():
        if dataclasses.is_dataclass(value):  # a nested setting, e.g. augmentation.copies
            params.update(flat_params(dataclasses.asdict(value), f"{key}."))
        elif key == "image_size":
            height, width = (value, value) if isinstance(value, int) else value
            params[key] = f"{height}x{width}"
        else:
            params[key] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return params


def metric_segment(name: str) -> str:
    """A name (a category) as one segment of an MLflow key: characters MLflow refuses become `_`."""
    return re.sub(r"[^\w.\- ]", "_", name)


def registered_name(kind: str, category: str) -> str:
    """The registered model of a (category, detector): `padim-bottle`, `patchcore-bottle`."""
    return f"{kind}-{category}"


def start_parent_run(
    client: MlflowClient, experiment_id: str, job: str, params: Mapping[str, Any], tags: Mapping[str, str],
    config: Any = None, config_file: Path | None = None,
) -> str:
    """The RUNNING run of one invocation of `jobs.<job>`, named `<job>-<date>-<time>`; with a
    config, the file as given and as resolved (overrides applied) go along as artifacts."""
    name = f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = client.create_run(experiment_id, run_name=name, tags={"job": f"jobs.{job}", **tags}).info.run_id
    log_values(client, run_id, params=params)
    if config_file is not None:
        client.log_artifact(run_id, str(config_file), "config")
    if config is not None:
        client.log_text(run_id, yaml.safe_dump(config.to_dict(), sort_keys=False), "config/resolved.yaml")
    return run_id


def start_child_run(
    client: MlflowClient, experiment_id: str, parent_run_id: str, category: str, detector: str, params: Mapping[str, str]
) -> str:
    """A RUNNING child run for one (category, detector), created by the driver before its task starts.

    Creating it up front means a task that never gets to run (a crashed worker, a cancelled
    job) still leaves a run to mark FAILED, and Ray's retries reuse it instead of adding runs.
    """
    name = f"{category}-{detector}"
    tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, MLFLOW_RUN_NAME: name, "category": category, "detector": detector}
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    log_values(client, run.info.run_id, params=params)
    return run.info.run_id


SPLIT_CONTEXTS = {"fit": "training", "calibration": "calibration", "test": "testing"}
"""Split role -> the dataset context MLflow shows beside a run's dataset inputs."""


def log_split_inputs(client: MlflowClient, run_id: str, split: SplitManifest) -> None:
    """The split as the run's dataset inputs `<category>-fit`, `<category>-calibration` and
    `<category>-test`, so the runs table's Dataset column names what a model was fitted,
    calibrated and tested on. The digest covers every file's path and content hash, so two runs
    show the same digest exactly when they used the same files."""
    schema = json.dumps({"mlflow_colspec": [{"type": "string", "name": "path", "required": True},
                                            {"type": "string", "name": "sha256", "required": True}]})
    inputs = []
    for role, context in SPLIT_CONTEXTS.items():
        entries = getattr(split, role)
        canonical = "\n".join(f"{entry.path}\t{entry.sha256}" for entry in entries)
        dataset = Dataset(
            name=f"{split.category}-{role}", digest=hashlib.sha256(canonical.encode()).hexdigest()[:32],
            source_type="local", source=json.dumps({"uri": str(split.root)}), schema=schema,
            profile=json.dumps({"num_rows": len(entries)}),
        )
        inputs.append(DatasetInput(dataset=dataset, tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]))
    client.log_inputs(run_id, datasets=inputs)


def log_values(
    client: MlflowClient,
    run_id: str,
    *,
    metrics: Mapping[str, float | int | None] | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> None:
    """One batched call. A missing metric (None, e.g. no test split) is logged as NaN so the
    same names exist on every run; MLflow stores and shows NaN as such."""
    timestamp = int(1000 * time.time())
    client.log_batch(
        run_id,
        metrics=[
            Metric(key, math.nan if value is None else float(value), timestamp, 0)
            for key, value in (metrics or {}).items()
        ],
        params=[Param(key, str(value)) for key, value in (params or {}).items()],
        tags=[RunTag(key, str(value)) for key, value in (tags or {}).items()],
    )


def fail_run(client: MlflowClient, run_id: str, reason: str) -> None:
    """Mark a run FAILED with the reason in its `error` tag (shown in the UI's run list)."""
    client.set_tag(run_id, ERROR_TAG, reason[:_MAX_REASON])
    client.set_terminated(run_id, "FAILED")


def end_run(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    client.set_terminated(run_id, status)


