"""The model catalogue: which model scores which category, from a model file, a folder of
them, or the MLflow registry.

A models folder, as jobs.fit writes it, holds one folder per detector kind:
`<folder>/<detector>/<category>.safetensors`; a folder of `<category>.safetensors` files (of any
kind) works too. In the registry, the model of a (category, detector) is `<detector>-<category>`.

Everything is resolved on the driver before any image is read. Each model is loaded once
here, which validates it (a bad file fails the job in a second, not inside an actor) and
tells the decode tasks its input size. Registry aliases are resolved to a version now, so
every actor scores with the same model even if the alias moves while the job runs, and the
table's `model_uri` names that version (`models:/padim-bottle/3`).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pyarrow.fs as pafs
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from jobs.common.pyfunc import MODEL_ARTIFACT
from jobs.common.tracking import registered_name
from padim_core.calibration import Calibration
from padim_core.detector import KINDS, load_detector
from padim_core.errors import ModelFileError, PadimError
from padim_core.images import ImageTransform

MODEL_SUFFIX = ".safetensors"
STATISTICS = "statistics"
REGISTRY = "registry"
MODELS_SCHEME = "models:/"

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class ModelError(PadimError):
    """A model that cannot be found or used; names it and what would work."""


@dataclass(frozen=True)
class ModelEntry:
    """A validated model: where it came from and what the pipeline needs to know about it."""

    category: str
    detector: str  # the model file's kind
    uri: str  # the score table's `model_uri`: an absolute path or URI, or models:/NAME/VERSION
    file: Path  # a local copy of the safetensors file (the original when it is local)
    transform: ImageTransform
    calibration: Calibration | None

    @property
    def threshold(self) -> float | None:
        return None if self.calibration is None else self.calibration.threshold


def model_path(models_dir: str | Path, detector: str, category: str) -> Path:
    """Where jobs.fit puts the model of a (category, detector): `<models>/<detector>/<category>.safetensors`."""
    return Path(models_dir) / detector / f"{category}{MODEL_SUFFIX}"


def statistics_path(models_dir: str | Path, detector: str, category: str) -> Path:
    """Where jobs.fit keeps the statistics beside a model (`padim_core.statistics`):
    `<models>/../statistics/<detector>/<category>.safetensors`."""
    return Path(models_dir).parent / STATISTICS / detector / f"{category}{MODEL_SUFFIX}"


def is_registry(text: str) -> bool:
    return text == REGISTRY or text.startswith(MODELS_SCHEME)


def resolve_models(
    *,
    model: str | None,
    category: str | None,
    models: str | None,
    detector: str,
    alias: str,
    tracking_uri: str,
    scratch: Path,
) -> dict[str, ModelEntry]:
    """Category -> model, from `--model FILE_OR_URI --category NAME` or `--models DIR_OR_REGISTRY`.

    With `--models`, `category` (when given) keeps just that category's model, and `detector`
    picks the kind (a detector subfolder, or `<detector>-<category>` in the registry). `scratch`
    is a folder for copies of remote files and registry downloads.
    """
    if (model is None) == (models is None):
        raise ModelError("give either --model FILE_OR_URI with --category NAME, or --models DIR_OR_REGISTRY")
    if model is not None:
        if not category:
            raise ModelError(f"--model {model} needs --category NAME: the category its images belong to")
        if model.startswith(MODELS_SCHEME):
            name, version = _registered_version(tracking_uri, model)
            return {category: _from_registry(tracking_uri, name, version, category, scratch)}
        return {category: _from_file(model, category, scratch)}
    if is_registry(models):
        if models not in (REGISTRY, MODELS_SCHEME):
            raise ModelError(
                f"--models {models}: use 'registry' (or 'models:/') to look up {registered_name(detector, '<category>')}@{alias}; "
                "for one registered model use --model models:/NAME@ALIAS --category NAME"
            )
        return _registry_catalog(tracking_uri, detector, alias, category, scratch)
    return _folder_catalog(models, detector, category, scratch)


# -------------------------------------------------------------------------------- files
def _load(file: Path, category: str, uri: str) -> ModelEntry:
    try:
        detector = load_detector(file, device="cpu")
    except ModelFileError as error:
        raise ModelError(f"model for category {category!r} ({uri}) is not usable: {error}") from None
    return ModelEntry(category, detector.kind, uri, file, detector.transform, detector.calibration_)


def _filesystem(text: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, display prefix) for a local path or a pyarrow URI."""
    if "://" in text:
        try:
            filesystem, path = pafs.FileSystem.from_uri(text)
        except (ValueError, OSError) as error:
            raise ModelError(f"{text}: no filesystem for this URI ({error})") from None
        scheme = text.split("://", 1)[0]
        return filesystem, path, "" if scheme == "file" else f"{scheme}://"
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve()), ""


def _local_copy(filesystem: pafs.FileSystem, path: str, uri: str, scratch: Path) -> Path:
    if isinstance(filesystem, pafs.LocalFileSystem):
        return Path(path)
    target = scratch / "files" / hashlib.sha1(uri.encode()).hexdigest()[:12] / posixpath.basename(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(path, str(target), source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
    except OSError as error:
        raise ModelError(f"model {uri} cannot be copied from its filesystem: {error}") from None
    return target


def _from_file(text: str, category: str, scratch: Path) -> ModelEntry:
    filesystem, path, prefix = _filesystem(text)
    uri = prefix + path
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        raise ModelError(f"--model {text}: no such model file")
    return _load(_local_copy(filesystem, path, uri, scratch), category, uri)


def _folder_catalog(text: str, detector: str, only: str | None, scratch: Path) -> dict[str, ModelEntry]:
    """Every `<category>.safetensors` in `<folder>/<detector>/` (as jobs.fit writes them), or in
    the folder itself when it has no detector subfolders."""
    filesystem, folder, prefix = _filesystem(text)
    expected = f"a folder of <detector>/<category>{MODEL_SUFFIX} or <category>{MODEL_SUFFIX} files, or 'registry'"
    if filesystem.get_file_info(folder).type != pafs.FileType.Directory:
        raise ModelError(f"--models {text}: no such folder (expected {expected})")
    entries = filesystem.get_file_info(pafs.FileSelector(folder))
    kinds = sorted(info.base_name for info in entries if info.type == pafs.FileType.Directory and info.base_name in KINDS)
    if kinds:
        if detector not in kinds:
            raise ModelError(f"--models {text} has no {detector} models (it has: {', '.join(kinds)}); choose the detector")
        folder = f"{folder.rstrip('/')}/{detector}"
        entries = filesystem.get_file_info(pafs.FileSelector(folder))
    files = {
        info.base_name[: -len(MODEL_SUFFIX)]: info.path
        for info in entries
        if info.type == pafs.FileType.File and info.base_name.endswith(MODEL_SUFFIX) and not info.base_name.startswith(".")
    }
    if only is not None:
        if only not in files:
            raise ModelError(f"--models {text} has no model for category {only!r}; it has: {sorted(files) or 'none'}")
        files = {only: files[only]}
    if not files:
        raise ModelError(f"--models {text}: no <category>{MODEL_SUFFIX} files in {folder} (expected {expected})")
    return {
        name: _load(_local_copy(filesystem, path, prefix + path, scratch), name, prefix + path)
        for name, path in sorted(files.items())
    }


# ----------------------------------------------------------------------------- registry
def _registered_version(tracking_uri: str, uri: str) -> tuple[str, str]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> (NAME, VERSION)."""
    match = _REGISTRY_URI.match(uri)
    if not match:
        raise ModelError(f"--model {uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, version = match["name"], match["alias"], match["version"]
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as error:
        raise ModelError(f"--model {uri}: not found in the MLflow registry at {tracking_uri} ({error.message})") from None
    return name, str(found.version)


def _registry_catalog(tracking_uri: str, detector: str, alias: str, only: str | None, scratch: Path) -> dict[str, ModelEntry]:
    """`<detector>-<category>@alias` for every registered model of the detector that has the alias."""
    prefix = registered_name(detector, "")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    versions: dict[str, tuple[str, str]] = {}
    token = None
    try:
        while True:
            page = client.search_registered_models(f"name LIKE '{prefix}%'", page_token=token)
            for registered in page:
                category = registered.name[len(prefix):]
                version = (registered.aliases or {}).get(alias)
                if version is not None and (only is None or category == only):
                    versions[category] = (registered.name, str(version))
            token = page.token
            if not token:
                break
    except MlflowException as error:
        raise ModelError(f"the MLflow registry at {tracking_uri} cannot be searched ({error.message})") from None
    if not versions:
        wanted = registered_name(detector, only or "<category>")
        raise ModelError(
            f"no registered model {wanted} with alias {alias!r} in the MLflow registry at {tracking_uri}; "
            "fit one with jobs.fit (tracking.register_models: true) or set tracking.alias"
        )
    return {
        category: _from_registry(tracking_uri, name, version, category, scratch)
        for category, (name, version) in sorted(versions.items())
    }


def _from_registry(tracking_uri: str, name: str, version: str, category: str, scratch: Path) -> ModelEntry:
    """Download just the safetensors file of a registered pyfunc model (not its code or env).

    jobs.common.pyfunc logs the file as the pyfunc artifact `MODEL_ARTIFACT`; the MLmodel file says
    where inside the model it lies. The download goes through the version's artifact location:
    `models:/` URIs would be resolved against the process-wide registry URI instead.
    """
    uri = f"models:/{name}/{version}"
    target = scratch / "registry" / f"{name}-{version}"

    def download(path: str) -> Path:
        return Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location.rstrip('/')}/{path}", dst_path=str(target), tracking_uri=tracking_uri,
        ))

    try:
        location = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version_download_uri(name, version)
        artifacts = yaml.safe_load(download("MLmodel").read_text())["flavors"]["python_function"]["artifacts"]
        file = download(artifacts[MODEL_ARTIFACT]["path"])
    except MlflowException as error:
        raise ModelError(f"registered model {uri} cannot be downloaded from {tracking_uri}: {error.message}") from None
    except (KeyError, TypeError, OSError, yaml.YAMLError) as error:
        raise ModelError(f"registered model {uri} is not a padim pyfunc model (no '{MODEL_ARTIFACT}' artifact: {error})") from None
    return _load(file, category, uri)
