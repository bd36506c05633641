"""Fit one detector per category as Ray tasks, evaluate each, and track it all in MLflow.

Before anything runs, the driver splits each category (config section `calibration`): the
images to fit on, the held-out normal images to calibrate on, the test images, written to
`OUTPUT/manifests/<category>.json` with content hashes. Each (category, detector) is then one Ray
task (which spreads a large category's fit images over `fit.shards` tasks: `jobs.fit.shards`):
fit on the fit images, set the conformal threshold on the calibration images (a normal
image is flagged with probability at most `calibration.false_alarm_rate`), judge on the test
split, log metrics, the split (as an artifact and as the run's dataset inputs), pictures, the
per-image score table and the model (registered as `<detector>-<category>`) to its MLflow child
run under one parent run per invocation, and save the model to
`OUTPUT/models/<detector>/<category>.safetensors`, PaDiM's running sums (`fit.keep_statistics`,
for padim-update) to `OUTPUT/statistics/<detector>/<category>.safetensors` and the run's
`statistics/`. A category that fails, fails alone: its run is marked FAILED with the reason and the others carry on. The driver writes `OUTPUT/metrics.json`
and prints a table.

Without RAY_ADDRESS an embedded local Ray is started; without MLFLOW_TRACKING_URI (or
tracking.tracking_uri) runs go to OUTPUT/mlflow.db. Exit 0: every fit succeeded; 1: some failed;
2: nothing started (bad config, data root, split manifest, tracking server or Ray address).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from jobs.common import cli, runner, tracking
from jobs.common.catalog import STATISTICS, model_path, statistics_path
from jobs.common.comparison import write_comparison
from jobs.common.config import JobConfig
from jobs.common.evaluation_report import METRICS, format_table, write_category_artifacts
from jobs.common.pyfunc import log_pyfunc_model
from jobs.common.runner import PerCategoryJob, RunContext, TaskResult, Unit
from jobs.fit.shards import ShardRequest, ShardStatistics, fit_sharded, shard_count
from padim_core.calibration import resolve_false_alarm_rate
from padim_core.command_line import command_parser
from padim_core.datasets import MvtecCategory
from padim_core.detector import Detector, detector_class
from padim_core.errors import DatasetError
from padim_core.evaluate import evaluate_category
from padim_core.manifest import SplitManifest
from padim_core.safe_write import write_file
from padim_core.statistics import encode_statistics

MANIFESTS = "manifests"
"""OUTPUT/manifests/<category>.json: each category's split, shared by its detectors."""

SUMMARY_FIELDS = (
    "image_auroc", "pixel_auroc", "aupro", "threshold", "false_alarm_rate", "realised_false_alarm_rate", "recall",
    "n_train", "n_calibration", "n_test", "fit_seconds", "fit_images_per_second", "predict_images_per_second",
    "model_size_mb", "peak_rss_mb",
)
"""Per (category, detector) figures in metrics.json and the summary table, next to `status` and `error`."""

@dataclass(frozen=True)
class FitRequest:
    """Everything one fit task needs; built by the driver, shipped to the worker."""

    unit: Unit
    folder: str
    split: SplitManifest | None  # None when the category folder could not be split: the task says why
    config: JobConfig
    models_dir: str
    tracking_uri: str
    run_id: str
    device: str
    threads: int
    num_gpus: float = 0.0  # per task, and so per shard task


# ----------------------------------------------------------------------------- the task
def fit_unit(request: FitRequest) -> TaskResult:
    """Fit, evaluate, save and log one (category, detector); never raises.

    The model reaches `OUTPUT/models` last, after everything was logged, and through an atomic
    rename, so that folder only ever holds complete models of fits that succeeded.
    """
    return runner.run_unit(request.unit, lambda result: _fit(request, result))


def _fit(request: FitRequest, result: TaskResult) -> None:
    import torch

    torch.set_num_threads(request.threads)
    # MLflow draws download progress bars while logging a model; in job logs they are noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    unit, run_id, config = request.unit, request.run_id, request.config
    client = MlflowClient(request.tracking_uri)
    category = MvtecCategory.from_folder(request.folder)
    split = request.split or config.calibration.split(category, detector_class(unit.detector).min_fit_images)
    roles = split.counts()
    counts = {"n_train": roles["fit"], "n_calibration": roles["calibration"], "n_test": roles["test"]}
    result.values.update(counts)
    print(f"[{unit.label}] started: {counts['n_train']} fit + {counts['n_calibration']} calibration + "
          f"{counts['n_test']} test images on {request.device} ({result.host}, {request.threads} threads)", flush=True)
    shards = shard_count(config.fit.shards, roles["fit"], config.data.batch_size)
    tracking.log_values(client, run_id, params={**counts, "split": split.method, "shards": shards},
                        tags={"device": request.device, "host": result.host})
    client.log_text(run_id, split.to_json(), f"manifest/{unit.category}.json")
    tracking.log_split_inputs(client, run_id, split)
    fitted: list[ShardStatistics] = []

    def fit(model: Detector, images: list[Path]) -> None:
        shard = ShardRequest(config, unit.detector, [str(path) for path in images], request.device, request.threads)
        fitted.append(fit_sharded(model, shard, shards, {"num_cpus": config.tasks.num_cpus, "num_gpus": request.num_gpus}))

    evaluation = evaluate_category(category, config, request.device, unit.detector, split, fit=fit)
    figures = evaluation.metrics
    result.values.update({key: _number(figures[key]) for key in SUMMARY_FIELDS})
    tracking.log_values(client, run_id, metrics={name: figures[key] for name, key in METRICS.items()},
                        tags={"threshold_method": figures["threshold_method"]})
    with tempfile.TemporaryDirectory(prefix=f"padim-fit-{unit.category}-") as scratch:
        artifacts = Path(scratch) / "artifacts"
        write_category_artifacts(evaluation, unit.category, artifacts, config.fit.heatmap_examples)
        statistics = None
        if config.fit.keep_statistics and fitted[0].sums is not None:
            statistics = encode_statistics(fitted[0].sums, evaluation.model, split.to_dict())
            write_file(artifacts / STATISTICS / f"{unit.category}.safetensors", statistics)
            result.values["statistics_bytes"] = len(statistics)
        client.log_artifacts(run_id, str(artifacts))
        model_file = evaluation.model.save(Path(scratch) / f"{unit.category}.safetensors")
        settings = config.tracking
        result.values["model_version"] = log_pyfunc_model(
            request.tracking_uri, run_id, model_file,
            registered_model_name=tracking.registered_name(unit.detector, unit.category) if settings.register_models else None,
            alias=settings.alias,
        )
    if statistics is not None:
        kept = statistics_path(request.models_dir, unit.detector, unit.category)
        result.values["statistics_path"] = str(write_file(kept, statistics))
    target = model_path(request.models_dir, unit.detector, unit.category)
    result.values["model_path"] = str(evaluation.model.save(target))


def _number(value: Any) -> float | int | None:
    """JSON-safe: numpy scalars to Python, NaN to None."""
    if value is None:
        return None
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


# --------------------------------------------------------------------------- the driver
class FitJob(PerCategoryJob):
    name = "fit"

    def __init__(self, config: JobConfig, config_file: Path | None, detectors: Sequence[str] = ()) -> None:
        super().__init__(config, config_file, detectors)
        self.splits: dict[str, SplitManifest] = {}

    def prepare(self) -> None:
        """Split every category and check the calibration count supports the false-alarm rate,
        before any fitting: a bad fraction, folder or manifest stops the job (exit 2). A listed
        category whose folder is missing is left to fail alone in its task."""
        min_fit = max(detector_class(kind).min_fit_images for kind in self.kinds)
        for name in self.categories:
            try:
                category = MvtecCategory.from_folder(self.root / name)
            except DatasetError:
                continue
            split = self.config.calibration.split(category, min_fit)
            _, warning = resolve_false_alarm_rate(self.config.calibration.false_alarm_rate, len(split.calibration))
            if warning:
                self.say(f"{name}: {warning}")
            self.splits[name] = split
        (self.output / "models").mkdir(parents=True, exist_ok=True)
        for name, split in self.splits.items():
            split.save(self.output / MANIFESTS / f"{name}.json")

    def task(self) -> Callable[[FitRequest], TaskResult]:
        return fit_unit

    def request(self, unit: Unit, run_id: str, context: RunContext) -> FitRequest:
        return FitRequest(unit, str(self.root / unit.category), self.splits.get(unit.category), self.config,
                          str(self.output / "models"),
                          context.tracking_uri, run_id, context.resources.device, context.resources.threads,
                          context.resources.num_gpus)

    def parent_params(self) -> dict[str, Any]:
        return tracking.flat_params(self.config.to_dict())

    def progress_line(self, result: TaskResult) -> str:
        seconds = "-" if result.seconds is None else f"{result.seconds:.1f} s"
        if not result.ok:
            return f"FAILED after {seconds}: {result.error}"
        values = result.values
        auroc = "-" if values["image_auroc"] is None else f"{values['image_auroc']:.3f}"
        rate = "-" if values["realised_false_alarm_rate"] is None else f"{values['realised_false_alarm_rate']:.3f}"
        return (f"done in {seconds}: {values['n_train']} fit + {values['n_calibration']} calibration + {values['n_test']} "
                f"test images, image AUROC {auroc}, false alarms on normal test images {rate} "
                f"(calibrated for {values['false_alarm_rate']:.3g})")

    def finish(self, results: list[TaskResult], context: RunContext) -> list[str]:
        summary = {
            "experiment": self.config.tracking.experiment, "experiment_id": context.experiment_id,
            "parent_run_id": context.parent_id, "tracking_uri": context.tracking_uri,
            "config": str(self.config_file.resolve()) if self.config_file else None, "data_root": str(self.root),
            "device": context.resources.device, "num_gpus_per_task": context.resources.num_gpus,
            "categories": metrics_by_category(results),
        }
        write_file(self.output / "metrics.json", json.dumps(summary, indent=2) + "\n")
        aurocs = [result.values["image_auroc"] for result in results if result.values.get("image_auroc") is not None]
        tracking.log_values(context.client, context.parent_id,
                            metrics={"mean_image_auroc": sum(aurocs) / len(aurocs) if aurocs else None})
        context.client.log_artifact(context.parent_id, str(self.output / "metrics.json"))
        if self.splits:
            context.client.log_artifacts(context.parent_id, str(self.output / MANIFESTS), MANIFESTS)
        succeeded = sum(result.ok for result in results)
        lines = [
            format_table(results), "",
            f"models:  {self.output / 'models'} ({succeeded} of {len(results)} fits)",
            f"metrics: {self.output / 'metrics.json'}",
            f"splits:  {self.output / MANIFESTS} (fit, calibration and test files of each category)",
        ]
        if len(self.kinds) > 1 and succeeded:
            folder = write_comparison(self.output)
            context.client.log_artifacts(context.parent_id, str(folder), "comparison")
            lines.append(f"compare: {folder / 'report.md'}")
        return lines


def metrics_by_category(results: Sequence[TaskResult]) -> dict[str, dict[str, dict[str, Any]]]:
    """metrics.json's `categories`: category -> detector -> status, error, figures, model path and version."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for result in results:
        figures = {key: result.values.get(key) for key in SUMMARY_FIELDS}
        found.setdefault(result.category, {})[result.detector] = {
            "status": result.status, "error": result.error, **figures, "seconds": result.seconds,
            "model_path": result.values.get("model_path"), "model_version": result.values.get("model_version"),
        }
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(
        "padim-fit", __doc__,
        "padim-fit --config configs/demo.yaml --data-root demo_data --categories brick,grass --output outputs/demo",
    )
    cli.add_experiment_flags(parser)
    args = parser.parse_args(argv)
    def prepare() -> FitJob:
        config = cli.build_config(args)
        return runner.prepare_job(FitJob(config, args.config, cli.detector_kinds(args, config)))

    return cli.run_main("padim-fit", prepare, runner.run_job)
