"""Fit one PaDiM model per category as Ray tasks, evaluate each, and track it all in MLflow.

    python -m jobs.fit --config FILE [--data-root DIR] [--categories a,b|all] [--output DIR]
                       [--set key=value ...]

Each category is one Ray task: fit on `train/good`, score the test split, save the model to
`OUTPUT/models/<category>.safetensors`, log metrics, pictures, the per-image score table and
the model (registered as `padim-<category>`) to the category's child run. A category that
fails, fails alone: its run is marked FAILED with the reason and the others carry on. The
driver writes `OUTPUT/metrics.json`, prints a table, and exits 1 if any category failed
(2 when nothing could start: a bad config, data root or tracking server).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import ray
from mlflow import MlflowClient

from jobs import ray_runtime, tracking
from padim_core.config import ConfigError, ExperimentConfig, load_config
from padim_core.datasets import DatasetError, MvtecCategory, discover_categories
from padim_core.evaluate import Evaluation, evaluate_category

SUMMARY_FIELDS = (
    "image_auroc", "pixel_auroc", "aupro", "threshold", "n_train", "n_test", "fit_seconds", "fit_images_per_second",
)
"""Per-category figures in metrics.json, next to `status` and `error`."""

OK, FAILED = "ok", "failed"


@dataclass(frozen=True)
class FitRequest:
    """Everything one fit task needs; built by the driver, shipped to the worker."""

    category: str
    folder: str
    config: ExperimentConfig
    models_dir: str
    tracking_uri: str
    run_id: str
    device: str
    threads: int


# ----------------------------------------------------------------------------- the task
def fit_category(request: FitRequest) -> dict[str, Any]:
    """Fit, evaluate, save and log one category; never raises: a failure is the returned status.

    The model reaches `OUTPUT/models` last, after everything was logged, and through an atomic
    rename, so that folder only ever holds complete models of categories that succeeded.
    """
    name, run_id = request.category, request.run_id
    result = _empty_result(name, run_id)
    started = time.perf_counter()
    client = MlflowClient(request.tracking_uri)
    try:
        import torch

        torch.set_num_threads(request.threads)
        # MLflow draws download progress bars while logging a model; in job logs they are noise.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        category = MvtecCategory.from_folder(request.folder)
        n_train, n_test = len(category.train_images), len(category.test_samples)
        result.update(n_train=n_train, n_test=n_test)
        print(f"[{name}] started: {n_train} train + {n_test} test images on {request.device} "
              f"({socket.gethostname()}, {request.threads} threads)", flush=True)
        tracking.log_values(
            client, run_id, params={"n_train": n_train, "n_test": n_test},
            tags={"device": request.device, "host": socket.gethostname()},
        )
        evaluation = evaluate_category(category, request.config, request.device)
        figures = evaluation.metrics
        result.update({key: _number(figures[key]) for key in SUMMARY_FIELDS})
        tracking.log_values(
            client, run_id,
            metrics={
                "image_auroc": figures["image_auroc"],
                "pixel_auroc": figures["pixel_auroc"],
                "aupro": figures["aupro"],
                "threshold": figures["threshold"],
                "fit_seconds": figures["fit_seconds"],
                "images_per_second": figures["fit_images_per_second"],
                "predict_images_per_second": figures["predict_images_per_second"],
            },
            tags={"threshold_method": figures["threshold_method"] or "none: no normal test images"},
        )
        with tempfile.TemporaryDirectory(prefix=f"padim-fit-{name}-") as scratch:
            artifacts = Path(scratch) / "artifacts"
            write_category_artifacts(evaluation, name, artifacts, request.config.fit.heatmap_examples)
            client.log_artifacts(run_id, str(artifacts))
            model_file = evaluation.model.save(Path(scratch) / f"{name}.safetensors")
            settings = request.config.tracking
            result["model_version"] = tracking.log_pyfunc_model(
                request.tracking_uri, run_id, model_file,
                registered_model_name=f"padim-{name}" if settings.register_models else None,
                alias=settings.alias,
            )
        result["model_path"] = str(evaluation.model.save(Path(request.models_dir) / f"{name}.safetensors"))
        tracking.end_run(client, run_id)
        result["status"] = OK
    except Exception as error:  # noqa: BLE001 - any failure belongs to this category alone
        result["error"] = describe_error(error)
        try:
            tracking.fail_run(client, run_id, result["error"])
            client.log_text(run_id, traceback.format_exc(), "error.txt")
        except Exception as tracking_error:  # noqa: BLE001
            result["error"] += f" (the MLflow run could not be marked FAILED: {describe_error(tracking_error)})"
    result["seconds"] = time.perf_counter() - started
    return result


def write_category_artifacts(evaluation: Evaluation, category: str, folder: Path, heatmap_examples: int) -> None:
    """The child run's pictures and table: `scores.parquet`, `roc_curve.png`,
    `score_histogram.png` and `heatmaps/<defect>_<image>.png` for a sample of normal and
    defective test images, all on one colour scale."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from padim_core.metrics import roc_curve_points
    from padim_core.viz import heatmap_overlay, roc_curve_figure, save_png, score_histogram_figure

    folder.mkdir(parents=True, exist_ok=True)
    model, labels, scores = evaluation.model, evaluation.labels, evaluation.scores
    threshold = model.threshold
    flagged = model.is_anomalous(scores).tolist() if threshold is not None else [None] * len(scores)
    table = pa.table({
        "source": pa.array([str(path) for path in evaluation.sources], pa.string()),
        "category": pa.array([category] * len(scores), pa.string()),
        "defect": pa.array(evaluation.defects, pa.string()),
        "label": pa.array(labels.astype(np.int8), pa.int8()),
        "image_score": pa.array(scores.astype(np.float32), pa.float32()),
        "is_anomalous": pa.array(flagged, pa.bool_()),
        "threshold": pa.array([threshold] * len(scores), pa.float64()),
    })
    pq.write_table(table, folder / "scores.parquet")
    if len(scores) == 0:
        return
    if evaluation.metrics["image_auroc"] is not None:
        fpr, tpr, _ = roc_curve_points(labels, scores)
        save_png(folder / "roc_curve.png", roc_curve_figure(fpr, tpr, evaluation.metrics["image_auroc"], f"{category}: image ROC"))
    groups = {defect: scores[[d == defect for d in evaluation.defects]] for defect in dict.fromkeys(evaluation.defects)}
    save_png(folder / "score_histogram.png", score_histogram_figure(groups, threshold, f"{category}: test image scores"))
    vmin = model.score_stats.get("map_min", float(evaluation.maps.min()))
    vmax = model.score_stats.get("map_max", float(evaluation.maps.max()))
    for index in heatmap_sample(labels, heatmap_examples):
        source = evaluation.sources[index]
        overlay = heatmap_overlay(
            model.transform.to_array(source), evaluation.maps[index],
            evaluation.masks[index] if labels[index] else None, vmin=vmin, vmax=vmax,
        )
        save_png(folder / "heatmaps" / f"{evaluation.defects[index]}_{Path(source).stem}.png", overlay)


def heatmap_sample(labels: np.ndarray, count: int) -> list[int]:
    """Indices of up to `count` test images, half normal and half defective (the rest from
    whichever group has more), evenly spread over each group so several defect types show."""
    groups = [np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)]
    wanted = [min(count // 2, len(groups[0])), 0]
    wanted[1] = min(count - wanted[0], len(groups[1]))
    wanted[0] = min(count - wanted[1], len(groups[0]))
    chosen = []
    for group, n in zip(groups, wanted):
        if n:
            chosen.extend(int(group[i]) for i in np.linspace(0, len(group) - 1, n).round().astype(int))
    return sorted(set(chosen))


def _empty_result(category: str, run_id: str) -> dict[str, Any]:
    return {
        "category": category, "status": FAILED, "error": None, **dict.fromkeys(SUMMARY_FIELDS),
        "seconds": None, "run_id": run_id, "model_path": None, "model_version": None,
    }


def _number(value: Any) -> float | int | None:
    """JSON-safe: numpy scalars to Python, NaN to None."""
    if value is None:
        return None
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def describe_error(error: BaseException) -> str:
    """The error's type and the first line of its message: short enough for a table cell."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else 'no message'}"


# --------------------------------------------------------------------------- the driver
def select_categories(setting: str | Sequence[str], root: Path) -> list[str]:
    """'all': every category folder under `root`; a list is taken as given, so a listed
    category with a missing train folder fails alone rather than stopping the job."""
    if setting == "all":
        return discover_categories(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    for name in setting:
        if name in (".", "..") or "/" in name or os.sep in name:
            raise ConfigError(f"data.categories: {name!r} is not a category folder name")
    return list(setting)


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """One line per category, then the failure reasons, so it fits one screen."""
    columns = [
        ("category", "category", "<", None), ("status", "status", "<", None),
        ("train", "n_train", ">", "d"), ("test", "n_test", ">", "d"),
        ("img AUROC", "image_auroc", ">", ".3f"), ("px AUROC", "pixel_auroc", ">", ".3f"),
        ("AUPRO", "aupro", ">", ".3f"), ("threshold", "threshold", ">", ".4g"),
        ("fit s", "fit_seconds", ">", ".1f"), ("img/s", "fit_images_per_second", ">", ".1f"),
    ]

    def cell(result: dict[str, Any], key: str, spec: str | None) -> str:
        value = result.get(key)
        if value is None:
            return "-"
        return format(value, spec) if spec else str(value)

    rows = [[cell(result, key, spec) for _, key, _, spec in columns] for result in results]
    widths = [max(len(title), *(len(row[i]) for row in rows)) for i, (title, *_) in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{text:{align}{width}}" for text, width, (_, _, align, _) in zip(cells, widths, columns)).rstrip()

    lines = [line([title for title, *_ in columns]), line(["-" * width for width in widths])]
    lines += [line(row) for row in rows]
    failures = [result for result in results if result["status"] != OK]
    if failures:
        lines.append("")
        lines += [f"{result['category']} failed: {result['error']}" for result in failures]
    return "\n".join(lines)


def progress_line(done: int, total: int, result: dict[str, Any]) -> str:
    prefix = f"[{done}/{total}] {result['category']}"
    seconds = f"{result['seconds']:.1f} s" if result.get("seconds") is not None else "-"
    if result["status"] != OK:
        return f"{prefix}: FAILED after {seconds}: {result['error']}"
    auroc = "-" if result["image_auroc"] is None else f"{result['image_auroc']:.3f}"
    return (f"{prefix}: done in {seconds}: {result['n_train']} train + {result['n_test']} test images, "
            f"image AUROC {auroc}")


def write_json(path: Path, values: Any) -> None:
    """Atomically: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(values, indent=2) + "\n")
    os.replace(temporary, path)


def run(config: ExperimentConfig, config_file: Path) -> int:
    """Fit every selected category; 0 when all succeeded, 1 when any failed."""
    began = time.perf_counter()
    output = Path(config.output).resolve()
    root = Path(config.data.root).resolve()
    categories = select_categories(config.data.categories, root)
    uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri, output)
    tracking.check_reachable(uri)
    models_dir = output / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    experiment_id = tracking.prepare_experiment(client, config.tracking.experiment, uri, output)
    print(f"jobs.fit: {len(categories)} categories from {root} -> {output}", flush=True)
    print(f"jobs.fit: tracking at {uri}, experiment {config.tracking.experiment!r}", flush=True)

    where = ray_runtime.connect()
    parent_id = None
    child_ids: dict[str, str] = {}
    try:
        num_gpus, device, threads = ray_runtime.task_resources(config.fit)
        print(f"jobs.fit: {where}; per task {config.fit.num_cpus:g} CPUs, {num_gpus:g} GPUs, device {device}", flush=True)
        parent_id = tracking.start_parent_run(
            client, experiment_id, "fit",
            params={**tracking.flat_params(config.to_dict()), "categories": ",".join(categories),
                    "num_gpus_per_task": num_gpus, "device": device},
            tags={"data_root": str(root), "ray": where}, config=config, config_file=config_file,
        )
        params = tracking.model_params(config)
        task = ray.remote(fit_category)
        pending = {}
        for name in categories:
            child_ids[name] = tracking.start_child_run(client, experiment_id, parent_id, name, params)
            request = FitRequest(name, str(root / name), config, str(models_dir), uri, child_ids[name], device, threads)
            options = dict(num_cpus=config.fit.num_cpus, num_gpus=num_gpus, max_retries=config.fit.max_retries, name=f"fit-{name}")
            pending[task.options(**options).remote(request)] = name
        results = _collect(pending, client, child_ids)
    except BaseException as error:
        # Interrupted or broken before every task reported: close the runs still RUNNING.
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        for run_id in [*child_ids.values(), *([parent_id] if parent_id else [])]:
            with contextlib.suppress(Exception):  # best effort: the original error matters more
                if client.get_run(run_id).info.status == "RUNNING":
                    tracking.end_run(client, run_id, status)
        raise
    finally:
        ray.shutdown()
        _remove_stale_temporaries(models_dir, categories)

    summary = {
        "experiment": config.tracking.experiment, "experiment_id": experiment_id, "parent_run_id": parent_id,
        "tracking_uri": uri, "config": str(config_file.resolve()), "data_root": str(root), "device": device,
        "num_gpus_per_task": num_gpus,
    }
    failed = _finish([results[name] for name in categories], summary, output, client, began)
    return 1 if failed else 0


def _finish(
    ordered: list[dict[str, Any]], summary: dict[str, Any], output: Path, client: MlflowClient, began: float
) -> list[dict[str, Any]]:
    """Write metrics.json, close the parent run, print the table and where everything is; returns the failures."""
    failed = [result for result in ordered if result["status"] != OK]
    parent_id = summary["parent_run_id"]
    summary.update(seconds=time.perf_counter() - began, categories={result["category"]: result for result in ordered})
    write_json(output / "metrics.json", summary)
    aurocs = [result["image_auroc"] for result in ordered if result["image_auroc"] is not None]
    tracking.log_values(client, parent_id, metrics={
        "categories": len(ordered), "categories_failed": len(failed),
        "mean_image_auroc": sum(aurocs) / len(aurocs) if aurocs else None,
    })
    client.log_artifact(parent_id, str(output / "metrics.json"))
    if failed:
        names = ", ".join(result["category"] for result in failed)
        tracking.fail_run(client, parent_id, f"{len(failed)} of {len(ordered)} categories failed: {names}")
    else:
        tracking.end_run(client, parent_id)

    print()
    print(format_table(ordered))
    print()
    print(f"models:  {output / 'models'} ({len(ordered) - len(failed)} of {len(ordered)} categories)")
    print(f"metrics: {output / 'metrics.json'}")
    print(f"MLflow:  experiment {summary['experiment']!r} (id {summary['experiment_id']}), parent run {parent_id}")
    print(f"view:    {tracking.ui_hint(summary['tracking_uri'], summary['experiment_id'], parent_id)}")
    print(f"done in {time.perf_counter() - began:.1f} s" + (f"; {len(failed)} categories FAILED" if failed else ""), flush=True)
    return failed


def _collect(pending: dict[Any, str], client: MlflowClient, child_ids: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Wait for the tasks in the order they finish, printing a line for each."""
    results: dict[str, dict[str, Any]] = {}
    for name, result in ray_runtime.as_completed(pending):
        if isinstance(result, ray.exceptions.RayError):
            # The task never returned; its run is still RUNNING, so the driver closes it.
            error = result
            result = _empty_result(name, child_ids[name])
            result["error"] = describe_error(error)
            tracking.fail_run(client, child_ids[name], result["error"])
        results[name] = result
        print(progress_line(len(results), len(pending), result), flush=True)
    return results


def _remove_stale_temporaries(models_dir: Path, categories: Sequence[str]) -> None:
    """A worker killed mid-save leaves `.<category>.safetensors.*.tmp` behind: remove those of this job."""
    for name in categories:
        for leftover in models_dir.glob(f".{name}.safetensors.*.tmp"):
            leftover.unlink(missing_ok=True)


def build_config(args: argparse.Namespace) -> ExperimentConfig:
    """The config file, `--set` overrides, then the dedicated flags (which win).

    Paths from flags are taken verbatim rather than parsed as YAML like `--set` values, so a
    folder called `on` or `1e3` stays a folder name.
    """
    config = load_config(args.config, args.set)
    if args.data_root is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, root=str(args.data_root)))
    if args.categories is not None:
        names = [name.strip() for name in args.categories.split(",") if name.strip()]
        chosen = "all" if names == ["all"] else tuple(names)
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, categories=chosen))
    if args.output is not None:
        config = dataclasses.replace(config, output=str(args.output))
    return config


def experiment_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The flags every per-category job takes; `build_config` turns them into a config."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, required=True, help="experiment YAML (see configs/)")
    parser.add_argument("--data-root", type=Path, help="MVTec-AD-style dataset folder (overrides data.root)")
    parser.add_argument("--categories", help="comma-separated category names, or 'all' (overrides data.categories)")
    parser.add_argument("--output", type=Path, help="output folder (overrides output)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set padim.image_size=128 (repeatable)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return experiment_parser("python -m jobs.fit", __doc__.splitlines()[0]).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args)
        if ray_runtime.under_job_submission():
            for label, path in (("data root", config.data.root), ("output", config.output)):
                if not Path(path).is_absolute():
                    print(f"jobs.fit: warning: {label} {path!r} is relative to the job's working-dir copy "
                          f"({os.getcwd()}); pass an absolute path", file=sys.stderr, flush=True)
        return run(config, args.config)
    except (ConfigError, DatasetError, tracking.TrackingError, ValueError, ConnectionError) as error:
        # Nothing was fitted: a bad config, data root, tracking store, GPU request or Ray address.
        print(f"jobs.fit: error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    # Run the module's copy imported as `jobs.fit`, not this `__main__` one: Ray ships the task
    # function to workers by reference to its module, and workers can import `jobs.fit`.
    from jobs.fit import main as _main

    sys.exit(_main())
