"""How each category's fitted model holds up under domain shift, as Ray tasks tracked in MLflow.

    python -m jobs.shift --config FILE [--data-root DIR] [--categories a,b|all] [--output DIR]
                         [--models DIR|registry] [--set key=value ...]

Each category is one Ray task: load its model (`OUTPUT/models/<category>.safetensors` as
jobs.fit writes them, another folder, or `registry`: `padim-<category>@<tracking.alias>`),
decode its test split once, and score it unshifted and under every shift and level of the
config's `shift` section. Figures go to one MLflow child run per category (metrics named
`shift/<shift>/<severity>/<figure>`) under a parent run, and to `OUTPUT/shift/`: `report.md`,
`figures.csv` and a plot per category, written together or not at all. A category that fails
(no model, no test split) fails alone; the job then exits 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import ray
from mlflow import MlflowClient

from jobs import ray_runtime, tracking
from jobs.fit import build_config, describe_error, experiment_parser, select_categories, write_json
from jobs.score_models import ModelError, resolve_models
from jobs.shift_report import PANELS, category_plot, flat_metrics, report_markdown, summary_sentence
from padim_core.config import ConfigError, ExperimentConfig
from padim_core.datasets import DatasetError

OK, FAILED = "ok", "failed"
REPORT_FOLDER = "shift"


@dataclass(frozen=True)
class ShiftRequest:
    """Everything one category's task needs; built by the driver, shipped to the worker."""

    category: str
    folder: str
    models: str  # a folder of <category>.safetensors, or "registry"
    alias: str
    tracking_uri: str
    shifts: Mapping[str, tuple[float, ...]]
    seed: int
    batch_size: int
    workers: int
    device: str
    threads: int


# ----------------------------------------------------------------------------- the task
def shift_category(request: ShiftRequest) -> dict[str, Any]:
    """Score one category's test split under every shift; never raises: a failure is the status."""
    import torch

    from padim_core.datasets import MvtecCategory
    from padim_core.model import PadimModel
    from padim_core.robustness import ShiftFigures, evaluate_shifts, load_test_split

    name = request.category
    result: dict[str, Any] = {"category": name, "status": FAILED, "error": None, "figures": [],
                              "n_test": None, "model_uri": None, "threshold": None, "seconds": None}
    started = time.perf_counter()
    torch.set_num_threads(request.threads)
    try:
        with tempfile.TemporaryDirectory(prefix=f"padim-shift-{name}-") as scratch:
            entry = resolve_models(model=None, category=name, models=request.models, alias=request.alias,
                                   tracking_uri=request.tracking_uri, scratch=Path(scratch))[name]
            model = PadimModel.load(entry.file, device=request.device)
        category = MvtecCategory.from_folder(request.folder)
        split = load_test_split(category, model.transform, request.batch_size, request.workers)
        result.update(model_uri=entry.uri, threshold=model.threshold, n_test=len(split))
        variants = 1 + sum(len(levels) for levels in request.shifts.values())
        print(f"[{name}] {len(split)} test images x {variants} variants on {request.device}, model {entry.uri}", flush=True)

        def progress(figures: ShiftFigures) -> None:
            label = "unshifted" if figures.severity == 0 else f"{figures.shift} {figures.severity} ({figures.level:g})"
            shown = ", ".join(f"{PANELS[key]} {'-' if value is None else f'{value:.3f}'}"
                              for key, value in dataclasses.asdict(figures).items() if key in PANELS)
            print(f"[{name}] {label}: {shown}", flush=True)

        figures = evaluate_shifts(model, split, request.shifts, request.seed, request.batch_size, progress)
        result.update(status=OK, figures=[dataclasses.asdict(row) for row in figures])
    except Exception as error:  # noqa: BLE001 - any failure belongs to this category alone
        result["error"] = describe_error(error)
    result["seconds"] = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------- the driver
def run(config: ExperimentConfig, config_file: Path, models: str | None) -> int:
    """Evaluate every selected category; 0 when all succeeded, 1 when any failed."""
    began = time.perf_counter()
    output = Path(config.output).resolve()
    root = Path(config.data.root).resolve()
    categories = select_categories(config.data.categories, root)
    models = models or str(output / "models")
    uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri, output)
    tracking.check_reachable(uri)
    client = MlflowClient(uri)
    experiment_id = tracking.prepare_experiment(client, config.tracking.experiment, uri, output)
    shifts = config.shift.shifts
    print(f"jobs.shift: {len(categories)} categories from {root}, models from {models}", flush=True)
    print(f"jobs.shift: {len(shifts)} shifts, {sum(map(len, shifts.values()))} shifted variants per category; "
          f"tracking at {uri}, experiment {config.tracking.experiment!r}", flush=True)

    where = ray_runtime.connect()
    parent_id = None
    try:
        num_gpus, device, threads = ray_runtime.task_resources(config.fit)
        print(f"jobs.shift: {where}; per task {config.fit.num_cpus:g} CPUs, {num_gpus:g} GPUs, device {device}", flush=True)
        parent_id = tracking.start_parent_run(
            client, experiment_id, "shift",
            params={**tracking.flat_params({"shift": config.to_dict()["shift"]}), "categories": ",".join(categories),
                    "models": models, "device": device},
            tags={"data_root": str(root), "ray": where}, config=config, config_file=config_file,
        )
        task = ray.remote(shift_category)
        pending = {}
        for name in categories:
            request = ShiftRequest(
                name, str(root / name), models, config.tracking.alias, uri, shifts, config.shift.seed,
                config.data.batch_size, config.data.num_workers, device, threads,
            )
            options = dict(num_cpus=config.fit.num_cpus, num_gpus=num_gpus, max_retries=config.fit.max_retries, name=f"shift-{name}")
            pending[task.options(**options).remote(request)] = name
        results = {}
        for name, result in ray_runtime.as_completed(pending):
            if isinstance(result, ray.exceptions.RayError):
                result = {"category": name, "status": FAILED, "error": describe_error(result), "figures": []}
            results[name] = result
            log_category(client, experiment_id, parent_id, result, config)
            print(progress_line(len(results), len(pending), result, config.shift.tolerance), flush=True)
        ordered = [results[name] for name in categories]
        folder = write_report(output, ordered, config, models)
    except BaseException as error:
        if parent_id is not None:
            with contextlib.suppress(Exception):  # best effort: the original error matters more
                tracking.end_run(client, parent_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        ray.shutdown()

    failed = [result for result in ordered if result["status"] != OK]
    client.log_artifacts(parent_id, str(folder), "report")
    tracking.log_values(client, parent_id, metrics={"categories": len(ordered), "categories_failed": len(failed)})
    if failed:
        tracking.fail_run(client, parent_id, f"{len(failed)} of {len(ordered)} categories failed: "
                          + ", ".join(result["category"] for result in failed))
    else:
        tracking.end_run(client, parent_id)
    print()
    print(f"report:  {folder / 'report.md'}")
    print(f"figures: {folder / 'figures.csv'}")
    print(f"MLflow:  experiment {config.tracking.experiment!r} (id {experiment_id}), parent run {parent_id}")
    print(f"view:    {tracking.ui_hint(uri, experiment_id, parent_id)}")
    print(f"done in {time.perf_counter() - began:.1f} s" + (f"; {len(failed)} categories FAILED" if failed else ""), flush=True)
    return 1 if failed else 0


def log_category(client: MlflowClient, experiment_id: str, parent_id: str, result: Mapping[str, Any], config: ExperimentConfig) -> None:
    """The category's child run: params, `shift/...` metrics, its plot and figures; FAILED with the reason if it failed."""
    params = {**tracking.model_params(config), "model_uri": result.get("model_uri"), "n_test": result.get("n_test")}
    run_id = tracking.start_child_run(client, experiment_id, parent_id, result["category"], params)
    if result["status"] != OK:
        tracking.fail_run(client, run_id, result["error"])
        return
    tracking.log_values(client, run_id, metrics={**flat_metrics(result["figures"]), "threshold": result["threshold"]})
    client.log_text(run_id, summary_sentence(result["figures"], config.shift.tolerance), "shift/summary.md")
    with tempfile.TemporaryDirectory(prefix="padim-shift-log-") as scratch:
        plot = Path(scratch) / f"{result['category']}.png"
        plot.write_bytes(category_plot(result["category"], result["figures"]))
        client.log_artifact(run_id, str(plot), "shift")
    tracking.end_run(client, run_id)


def progress_line(done: int, total: int, result: Mapping[str, Any], tolerance: float) -> str:
    prefix = f"[{done}/{total}] {result['category']}"
    if result["status"] != OK:
        return f"{prefix}: FAILED: {result['error']}"
    return f"{prefix}: done in {result['seconds']:.1f} s. {summary_sentence(result['figures'], tolerance)}"


def write_report(output: Path, results: Sequence[Mapping[str, Any]], config: ExperimentConfig, models: str) -> Path:
    """`OUTPUT/shift/`: report.md, figures.csv, a plot per category and results.json.

    Everything is written to a staging folder first and renamed into place at the end, so a
    reader finds the previous report or the new one, never a mix, and a failed job leaves the
    previous one."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    folder = output / REPORT_FOLDER
    staging = output / f".{REPORT_FOLDER}.staging-{uuid.uuid4().hex[:12]}"
    staging.mkdir(parents=True)
    try:
        plots = {}
        for result in results:
            if result["status"] == OK:
                plots[result["category"]] = f"{result['category']}.png"
                (staging / plots[result["category"]]).write_bytes(category_plot(result["category"], result["figures"]))
        rows = [{"category": result["category"], **row} for result in results for row in result["figures"]]
        schema = pa.schema([("category", pa.string()), ("shift", pa.string()), ("severity", pa.int32()), ("level", pa.float64()),
                            *((key, pa.float64()) for key in PANELS)])
        pacsv.write_csv(pa.Table.from_pylist(rows, schema=schema), staging / "figures.csv")
        (staging / "report.md").write_text(report_markdown(
            results, config.shift.shifts, config.shift.seed, config.shift.tolerance, plots, models))
        write_json(staging / "results.json", list(results))
        retired = output / f".{REPORT_FOLDER}.old-{uuid.uuid4().hex[:12]}"
        if folder.exists():
            os.replace(folder, retired)
        os.replace(staging, folder)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = experiment_parser("python -m jobs.shift", __doc__.splitlines()[0])
    parser.add_argument("--models", help="a folder of <category>.safetensors, or 'registry' for padim-<category>@"
                                         "<tracking.alias> (default: OUTPUT/models, where jobs.fit puts them)")
    args = parser.parse_args(argv)
    try:
        return run(build_config(args), args.config, args.models)
    except (ConfigError, DatasetError, ModelError, tracking.TrackingError, ValueError, ConnectionError) as error:
        print(f"jobs.shift: error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    # Run the module's copy imported as `jobs.shift`, so Ray workers find `shift_category` by module.
    from jobs.shift import main as _main

    sys.exit(_main())
