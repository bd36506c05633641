"""What padim-update starts from, per (category, detector): the model, PaDiM's statistics, the split
manifest, and the registered version they belong to; and the new normal images.

The models come from a padim-fit output folder (`models/`, `statistics/`, `manifests/`, as
jobs.fit writes them) or from the MLflow registry (`<detector>-<category>@alias`: the version's
pyfunc model, and the statistics and manifest its run logged). Everything is found, downloaded
and checked here, on the driver, before any image is embedded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from jobs.common.catalog import REGISTRY, STATISTICS, ModelError, model_path, resolve_models, statistics_path
from jobs.common.tracking import registered_name
from padim_core.datasets import NORMAL_DEFECT, list_images

MANIFESTS = "manifests"  # jobs.fit's OUTPUT/manifests/<category>.json


@dataclass(frozen=True)
class Source:
    """Local files of one (category, detector) to update; `version` when it is registered."""

    model: Path
    uri: str  # where the model came from, as the run records it
    statistics: Path | None  # None: missing (PaDiM cannot be updated without it)
    manifest: Path
    version: str | None


def find_source(origin: str, category: str, detector: str, alias: str, tracking_uri: str, scratch: Path) -> Source:
    """The files of `category`'s `detector` model in `origin` (a padim-fit output folder or 'registry')."""
    if origin == REGISTRY:
        return _registry_source(category, detector, alias, tracking_uri, scratch)
    folder = Path(origin)
    model = model_path(folder / "models", detector, category)
    if not model.is_file():
        raise ModelError(f"--from {origin}: no model {model} (expected the output folder of padim-fit, or 'registry')")
    statistics = statistics_path(folder / "models", detector, category)
    return Source(model, str(model.resolve()), statistics if statistics.is_file() else None, folder / MANIFESTS / f"{category}.json",
                  _registered_version(tracking_uri, detector, category, alias))


def _registered_version(tracking_uri: str, detector: str, category: str, alias: str) -> str | None:
    """The version the alias names, if the model is registered (the new version's parent)."""
    try:
        return str(MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version_by_alias(
            registered_name(detector, category), alias).version)
    except MlflowException:
        return None


def _registry_source(category: str, detector: str, alias: str, tracking_uri: str, scratch: Path) -> Source:
    entry = resolve_models(model=None, category=category, models=REGISTRY, detector=detector, alias=alias,
                           tracking_uri=tracking_uri, scratch=scratch)[category]
    name, version = entry.uri.removeprefix("models:/").split("/")
    run_id = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version(name, version).run_id
    target = scratch / "runs" / run_id

    def download(path: str) -> Path | None:
        try:
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(target),
                                                            tracking_uri=tracking_uri))
        except (MlflowException, OSError):
            return None

    manifest = download(f"manifest/{category}.json")
    if manifest is None:
        raise ModelError(f"{entry.uri}: its run {run_id} logged no split manifest manifest/{category}.json")
    return Source(entry.file, entry.uri, download(f"{STATISTICS}/{category}.safetensors"), manifest, version)


def new_images(folder: Path, category: str) -> list[Path]:
    """The new normal images of `category`: `<folder>/<category>/train/good/` (MVTec layout) when
    there is one, else every image under `<folder>/<category>/`."""
    root = folder / category
    mvtec = root / "train" / NORMAL_DEFECT
    if not root.is_dir():
        return []
    return list_images(mvtec if mvtec.is_dir() else root)
