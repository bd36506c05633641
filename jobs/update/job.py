"""Grow fitted models with new normal images, without refitting the images they have seen.

For each (category, detector), one Ray task: the new images (`--new-images DIR`: `DIR/<category>/`,
or `DIR/<category>/train/good/`) are added to the model (PaDiM: exactly, through the running sums
padim-fit kept, `padim_core.statistics`; PatchCore: their coreset joins the memory bank, an
approximation of a refit); the threshold is set again on the split manifest's calibration images
and the model judged on its test split, as the model it grew from is judged again. The new
version is registered as `<detector>-<category>` with its run recording `parent_version`, the
images added (`added_images.txt`) and the figures before (`before_*`) and after. The alias moves
to it only when its image AUROC is at least the old one's minus `update.max_auroc_drop`; the model,
statistics and manifest then go to `OUTPUT/models`, `OUTPUT/statistics` and `OUTPUT/manifests`,
else to `OUTPUT/candidates/...`, and the summary says why.

The models come from a padim-fit output folder (`--from`, default the config's output) or the
registry (`--from registry`: `<detector>-<category>@tracking.alias`). Exit 2, before anything
is embedded and with every file untouched: a model whose backbone, layers, channel index or image
size differ from the config's; a PaDiM model without statistics; no new images; a manifest whose
files changed. Exit 1: some update failed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from mlflow import MlflowClient

from jobs.common import cli, runner, tracking
from jobs.common.catalog import STATISTICS, model_path, statistics_path
from jobs.common.config import JobConfig
from jobs.common.evaluation_report import METRICS, format_table, write_category_artifacts
from jobs.common.pyfunc import log_pyfunc_model
from jobs.common.runner import PerCategoryJob, RunContext, TaskResult, Unit
from jobs.update.sources import MANIFESTS, Source, find_source, new_images
from padim_core.command_line import command_parser
from padim_core.datasets import MvtecCategory
from padim_core.detector import Detector, load_detector
from padim_core.errors import DatasetError, ModelFileError
from padim_core.evaluate import evaluate_category
from padim_core.loader import image_batches
from padim_core.manifest import SplitManifest, file_sha256, read_manifest
from padim_core.safe_write import write_file
from padim_core.statistics import (
    check_compatible,
    embedding_differences,
    encode_statistics,
    fingerprint,
    read_statistics,
)

CANDIDATES = "candidates"
"""OUTPUT/candidates/: updated models that were not promoted (same layout as OUTPUT)."""

BEFORE = ("image_auroc", "pixel_auroc", "aupro", "threshold", "realised_false_alarm_rate", "recall")
"""Figures of the model before the update, logged as `before_<name>` beside the new ones."""


@dataclass(frozen=True)
class UpdateRequest:
    """One (category, detector) update, checked by the driver."""

    unit: Unit
    folder: str
    source: Source
    model: bytes  # the files' bytes, so a worker on another node needs no access to them
    statistics: bytes | None
    split: SplitManifest  # the manifest of the fit, new images not yet added
    added: tuple[str, ...]
    config: JobConfig
    output: str
    tracking_uri: str
    run_id: str
    device: str
    threads: int


def update_unit(request: UpdateRequest) -> TaskResult:
    """Update, evaluate, register and save one (category, detector); never raises."""
    return runner.run_unit(request.unit, lambda result: _update(request, result))


def _update(request: UpdateRequest, result: TaskResult) -> None:
    import torch

    torch.set_num_threads(request.threads)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    unit, run_id, config, source = request.unit, request.run_id, request.config, request.source
    client = MlflowClient(request.tracking_uri)
    category = MvtecCategory.from_folder(request.folder)
    added = [Path(path) for path in request.added]
    grown_split = request.split.adding_fit(added)
    tracking.log_values(client, run_id, params={"parent_version": source.version, "n_added": len(added),
                                                "parent_model": source.uri},
                        tags={"parent_version": source.version, "device": request.device, "host": result.host})
    client.log_text(run_id, "\n".join(request.added) + "\n", "added_images.txt")
    client.log_text(run_id, grown_split.to_json(), f"manifest/{unit.category}.json")
    before = evaluate_category(category, config, request.device, unit.detector, request.split,
                               model=load_detector(request.model, request.device)).metrics
    statistics = None if request.statistics is None else read_statistics(request.statistics)[0]

    def grow(model: Detector, images: list[Path]) -> None:
        data = config.data
        model.update(image_batches(added, model.transform.to_pixels, data.batch_size, data.num_workers), statistics)

    evaluation = evaluate_category(category, config, request.device, unit.detector, grown_split,
                                   model=load_detector(request.model, request.device), fit=grow)
    figures = evaluation.metrics
    figures["fit_images_per_second"] = len(added) / figures["fit_seconds"]
    drop = config.update.max_auroc_drop
    promoted, reason = promotion(before["image_auroc"], figures["image_auroc"], drop)
    result.values.update({key: figures.get(key) for key in ("image_auroc", "pixel_auroc", "aupro", "threshold",
                                                              "false_alarm_rate", "realised_false_alarm_rate", "recall",
                                                              "n_train", "n_calibration", "n_test", "fit_seconds",
                                                              "fit_images_per_second")})
    result.values.update({"n_added": len(added), "before_image_auroc": before["image_auroc"], "promoted": promoted,
                          "reason": reason, "parent_version": source.version})
    tracking.log_values(client, run_id,
                        metrics={**{name: figures[key] for name, key in METRICS.items()},
                                 **{f"before_{key}": before[key] for key in BEFORE}},
                        tags={"promoted": str(promoted).lower(), "promotion": reason,
                              "threshold_method": figures["threshold_method"]})
    root = Path(request.output) / ("" if promoted else CANDIDATES)
    with tempfile.TemporaryDirectory(prefix=f"padim-update-{unit.category}-") as scratch:
        artifacts = Path(scratch) / "artifacts"
        write_category_artifacts(evaluation, unit.category, artifacts, config.fit.heatmap_examples)
        write_file(artifacts / "before_after.json", json.dumps({"before": before, "after": figures}, indent=2, default=str) + "\n")
        kept = None
        if statistics is not None:
            kept = encode_statistics(statistics, evaluation.model, grown_split.to_dict())
            write_file(artifacts / STATISTICS / f"{unit.category}.safetensors", kept)
        client.log_artifacts(run_id, str(artifacts))
        model_file = evaluation.model.save(Path(scratch) / f"{unit.category}.safetensors")
        settings = config.tracking
        version = log_pyfunc_model(
            request.tracking_uri, run_id, model_file,
            registered_model_name=tracking.registered_name(unit.detector, unit.category) if settings.register_models else None,
            alias=None,
        )
    result.values["model_version"] = version
    if version is not None and promoted:
        client.set_registered_model_alias(tracking.registered_name(unit.detector, unit.category), settings.alias, version)
    grown_split.save(root / MANIFESTS / f"{unit.category}.json")
    if kept is not None:
        write_file(statistics_path(root / "models", unit.detector, unit.category), kept)
    result.values["model_path"] = str(evaluation.model.save(model_path(root / "models", unit.detector, unit.category)))


def promotion(old: float | None, new: float | None, max_drop: float) -> tuple[bool, str]:
    """Whether the updated model replaces the old one (its image AUROC at least old - max_drop), and why."""
    if old is None or new is None:
        return False, "no image AUROC to compare (the test split needs normal and defective images)"
    if new >= old - max_drop:
        return True, f"image AUROC {new:.4f} >= {old:.4f} - {max_drop:g} (update.max_auroc_drop)"
    return False, f"image AUROC fell from {old:.4f} to {new:.4f}, more than update.max_auroc_drop {max_drop:g}"


class UpdateJob(PerCategoryJob):
    name = "update"

    def __init__(self, config: JobConfig, config_file: Path | None, detectors: Sequence[str], origin: str,
                 images: Path) -> None:
        super().__init__(config, config_file, detectors)
        self.origin = origin
        self.images = images
        self.requests: dict[Unit, UpdateRequest] = {}

    def prepare(self) -> None:
        """Every refusal before any image is embedded (exit 2, nothing written)."""
        with tempfile.TemporaryDirectory(prefix="padim-update-") as scratch:
            self._check_units(Path(scratch))

    def _check_units(self, scratch: Path) -> None:
        if not self.images.is_dir():
            raise DatasetError(f"--new-images {self.images}: no such folder (expected <category>/ subfolders of images)")
        for name in self.categories:
            added = new_images(self.images, name)
            if not added:
                raise DatasetError(f"--new-images {self.images}: no images for category {name!r} in {self.images / name}")
            for kind in self.kinds:
                source = find_source(self.origin, name, kind, self.config.tracking.alias, self.tracking_uri, scratch)
                model = load_detector(source.model, "cpu")
                check_embeddings(model, self.config.build_detector(kind, "cpu"), source.model)
                if model.kind == "padim":
                    if source.statistics is None:
                        raise ModelFileError(f"{source.model}: a PaDiM model without its statistics (padim-fit writes them "
                                             "with fit.keep_statistics: true) cannot be updated; refit it")
                    _, meta, channel_index = read_statistics(source.statistics)
                    check_compatible(meta, channel_index, model, str(source.statistics))
                split = read_manifest(source.manifest, self.root / name).verify()
                check_new_images(split, added)
                self.requests[Unit(name, kind)] = UpdateRequest(
                    Unit(name, kind), str(self.root / name), source, source.model.read_bytes(),
                    None if source.statistics is None else source.statistics.read_bytes(), split,
                    tuple(str(path) for path in added), self.config, str(self.output), "", "", "", 0)

    def task(self) -> Callable[[UpdateRequest], TaskResult]:
        return update_unit

    def request(self, unit: Unit, run_id: str, context: RunContext) -> UpdateRequest:
        return replace(self.requests[unit], tracking_uri=context.tracking_uri, run_id=run_id,
                       device=context.resources.device, threads=context.resources.threads)

    def progress_line(self, result: TaskResult) -> str:
        if not result.ok:
            return f"FAILED: {result.error}"
        values = result.values
        state = "promoted" if values["promoted"] else "NOT promoted"
        return (f"{values['n_added']} images added to version {values['parent_version']}: version "
                f"{values['model_version']} {state}: {values['reason']}")

    def finish(self, results: list[TaskResult], context: RunContext) -> list[str]:
        summary = {"parent_run_id": context.parent_id, "tracking_uri": context.tracking_uri,
                   "categories": {result.label: {"status": result.status, "error": result.error, **result.values}
                                  for result in results}}
        write_file(self.output / "update.json", json.dumps(summary, indent=2, default=str) + "\n")
        context.client.log_artifact(context.parent_id, str(self.output / "update.json"))
        lines = [format_table(results), ""]
        for result in results:
            if result.ok:
                where = "models" if result.values["promoted"] else f"{CANDIDATES}/models"
                state = "alias moved" if result.values["promoted"] else "kept unpromoted"
                lines.append(f"{result.label}: version {result.values['model_version']} {state} "
                             f"({result.values['reason']}); model in {self.output / where}")
        lines.append(f"summary: {self.output / 'update.json'}")
        return lines


def check_embeddings(model: Detector, expected: Detector, where: Path) -> None:
    """Refuse a model whose embeddings differ from the config's (backbone, layers, channel index, image size...)."""
    different = embedding_differences(fingerprint(model), getattr(model, "channel_index", None), expected)
    if different:
        raise ModelFileError(f"{where}: the model was fitted with other embeddings than the config gives: "
                             f"{'; '.join(different)}; update with the config it was fitted with, or refit")


def check_new_images(split: SplitManifest, added: list[Path]) -> None:
    """New normal images must be new: none may be in the split already (same content), as a fit
    image (it would count twice) or a calibration or test image (the fit must never see those)."""
    known = {entry.sha256: f"{role} image {entry.path}" for role in ("fit", "calibration", "test") for entry in getattr(split, role)}
    clashes = [f"{path} (its {known[digest]})" for path in added if (digest := file_sha256(path)) in known]
    if clashes:
        raise DatasetError(f"{len(clashes)} new images of {split.category!r} are in its split already, e.g. {clashes[0]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(
        "padim-update", __doc__,
        "padim-update --config configs/demo.yaml --data-root demo_data --new-images new_images --output outputs/demo",
    )
    cli.add_experiment_flags(parser)
    parser.add_argument("--new-images", type=Path, required=True,
                        help="folder of <category>/ (or <category>/train/good/) new normal images")
    parser.add_argument("--from", dest="origin", help="padim-fit output folder with models/, statistics/, manifests/, "
                                                      "or 'registry' (<detector>-<category>@tracking.alias); default: the output")
    args = parser.parse_args(argv)

    def prepare() -> UpdateJob:
        config = cli.build_config(args)
        origin = args.origin or str(config.output_folder)
        return runner.prepare_job(UpdateJob(config, args.config, cli.detector_kinds(args, config), origin, args.new_images))

    return cli.run_main("padim-update", prepare, runner.run_job)
