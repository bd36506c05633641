"""Score images from folders, globs, archives and Parquet files into a Parquet score table.

Inputs are folders (recursive), globs, image files, tar/zip archives (members streamed, never
extracted) and Parquet files with an image-bytes column, local or on any filesystem pyarrow
understands. Ray Data reads and decodes them in parallel tasks and scores them in a pool of
actors (`jobs.score.pipeline`); the driver streams the rows into a staging folder and moves the
finished table into place (`jobs.score.table`): one row per image with its score, conformal
p-value, decision, threshold and model, or the reason it could not be read. A drift alarm
(`jobs.score.drift`) then tests, per category, whether the images still look like the model's
calibration images: the verdicts go to `<output>.drift.json` beside the table. It prints a
summary and logs a scoring run to MLflow (by default to mlflow.db in the folder that holds the
output).

Exit 0: the table was written (rows with errors included); 1: scoring failed; 2: nothing started
(bad arguments, inputs, models, output folder or tracking server).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from mlflow import MlflowClient

from jobs.common import cli, ray_runtime, tracking
from jobs.common.catalog import ModelEntry, ModelError, resolve_models
from jobs.common.categories import category_problem
from jobs.common.config import JobConfig, load_job_config
from jobs.common.outputs import drift_file
from jobs.score import table as score_table
from jobs.score.drift import DriftCounter, drift_metrics, write_drift_file
from jobs.score.output import MODES, OutputFolder
from jobs.score.pipeline import (
    ModelHandle,
    PoolPlan,
    RowOptions,
    build_dataset,
    plan_pool,
)
from jobs.score.reading import CategoryRouter
from jobs.score.sources import Discovery, discover
from jobs.score.summary import ScoreSummary, Tally, format_summary, progress_line
from padim_core.command_line import command_parser
from padim_core.errors import ConfigError, PadimError
from padim_core.image_files import IMAGE_SUFFIXES
from padim_core.viz import score_histogram_figure

PROGRESS_SECONDS = 10.0


class NoImagesError(PadimError):
    """The inputs held no image at all; no table is written."""


@dataclass(frozen=True)
class ScoreRequest:
    """One scoring job, as the command line describes it."""

    inputs: tuple[str, ...]
    output: Path
    config: JobConfig
    model: str | None = None
    category: str | None = None
    models: str | None = None
    mode: str = "error"
    routes: tuple[tuple[str, str], ...] = ()
    image_column: str | None = None
    detector: str | None = None  # with --models: which kind (default: the config's detector)


# -------------------------------------------------------------------------------- the job
@dataclass
class ScoreJob:
    """A checked job, ready to run: everything that can be refused was, before Ray starts."""

    request: ScoreRequest
    output: Path
    schema: pa.Schema
    discovery: Discovery
    catalog: dict[str, ModelEntry]
    tracking_uri: str
    experiment_id: str
    scratch: Path  # registry downloads and copies of remote model files; removed by `run`
    output_folder: OutputFolder  # locked and staged until `run` ends
    plan: PoolPlan | None = None  # sized by `size_pool` once Ray is connected


def prepare(request: ScoreRequest) -> ScoreJob:
    """Check the output folder, find the inputs, load every model, open the tracking store.

    Raises a `PadimError` (`OutputError`, `SourceError`, `ModelError`, `TrackingError`) before
    any image is read, so a mistake costs seconds rather than a half-run job. Without a
    configured tracking store, runs go to `mlflow.db` in the folder that holds the output (beside
    the table, not inside it: the table folder is replaced as a whole).
    """
    config = request.config
    output = request.output.expanduser().resolve()
    schema = score_table.file_schema(config.scoring.map_columns, config.scoring.heatmaps_above_threshold)
    folder = OutputFolder(output, request.mode, score_table.new_job_id()).check(schema)
    for name in [request.category, *(category for _, category in request.routes)]:
        if name is not None and category_problem(name):
            raise ConfigError(f"--category/--route: {category_problem(name)}")
    discovery = discover(request.inputs, request.image_column)
    uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri, output.parent)
    tracking.check_reachable(uri)
    client = MlflowClient(uri)
    experiment_id = tracking.prepare_experiment(client, config.tracking.experiment, uri, output.parent)
    scratch = Path(tempfile.mkdtemp(prefix="padim-score-"))
    try:
        catalog = resolve_models(
            model=request.model, category=request.category, models=request.models,
            detector=request.detector or config.detector, alias=config.tracking.alias, tracking_uri=uri, scratch=scratch,
        )
        for name, entry in catalog.items():
            if category_problem(name):
                raise ModelError(f"model {entry.uri}: its category {category_problem(name)}")
        folder.claim(schema)  # last: a job refused for anything else holds nothing
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    _close_stale_runs(client, uri, folder.stale)
    return ScoreJob(request, output, schema, discovery, catalog, uri, experiment_id, scratch, folder)


def _close_stale_runs(client: MlflowClient, uri: str, stale: list[dict]) -> None:
    """Mark KILLED the runs of dead jobs whose staging folders were cleaned, when they are in this store."""
    for info in stale:
        print(f"padim-score: removed {info['folder']}, left by a job that died"
              + (f" (pid {info['pid']} on {info['host']})" if "pid" in info else ""), flush=True)
        if info.get("run_id") and info.get("tracking_uri") == uri:
            with contextlib.suppress(Exception):  # best effort: the run may be gone or closed
                if client.get_run(info["run_id"]).info.status == "RUNNING":
                    client.set_tag(info["run_id"], tracking.ERROR_TAG, "killed: its job died; cleaned by a later job")
                    tracking.end_run(client, info["run_id"], "KILLED")


def size_pool(job: ScoreJob) -> ScoreJob:
    """Size the actor pool on the Ray session this process is connected to (a `ConfigError`
    when the config asks for more GPUs than the cluster has)."""
    scoring = job.request.config.scoring
    job.plan = plan_pool(scoring.actors, scoring.batch_size, scoring.num_gpus, ray.cluster_resources(), _largest_node_cpus())
    return job


def run(job: ScoreJob) -> ScoreSummary:
    """Score on the Ray session this process is connected to; publish the table; log the run.

    The table appears at the output only when every row has been written. On any failure or
    interruption the staging folder is removed and the MLflow run is marked FAILED or KILLED.
    """
    request, catalog, discovery, folder = job.request, job.catalog, job.discovery, job.output_folder
    client = MlflowClient(job.tracking_uri)
    run_id = None
    try:
        router = CategoryRouter(tuple(catalog), request.category, request.routes)
        pool = job.plan or size_pool(job).plan
        print(f"padim-score: {len(request.inputs)} inputs: {discovery.describe()}", flush=True)
        print("padim-score: models: " + ", ".join(f"{name} <- {entry.uri}" for name, entry in catalog.items()), flush=True)
        print(f"padim-score: {pool.describe()}", flush=True)
        run_id = _start_run(client, job.experiment_id, request, job.output, catalog, pool)
        folder.record(run_id=run_id, tracking_uri=job.tracking_uri)

        handles = {
            name: ModelHandle(entry.uri, entry.detector, entry.threshold, ray.put(entry.file.read_bytes()))
            for name, entry in catalog.items()
        }
        scoring = request.config.scoring
        options = RowOptions(scoring.map_size if scoring.map_columns else None, scoring.heatmaps_above_threshold)
        transforms = {name: entry.transform for name, entry in catalog.items()}
        dataset = build_dataset(discovery.units, discovery.inputs, router, transforms, handles, pool, options)

        tally = Tally(skipped=discovery.skipped, skipped_examples=list(discovery.skipped_examples))
        drift = DriftCounter({name: entry.calibration for name, entry in catalog.items()})
        writer = score_table.ScoreTableWriter(folder.staging, job.schema, folder.job_id, run_id)
        started = last_report = time.perf_counter()
        first_rows: tuple[float, int] | None = None
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = tally.add(batch)
            drift.add(rows)
            writer.write(rows)
            if first_rows is None and tally.images:
                first_rows = (time.perf_counter() - started, tally.images)
            if time.perf_counter() - last_report >= PROGRESS_SECONDS:
                last_report = time.perf_counter()
                print(progress_line(tally, last_report - started), flush=True)
        seconds = time.perf_counter() - started
        files = writer.close()
        if tally.images == 0:
            raise NoImagesError(
                f"no images in {', '.join(request.inputs)} ({tally.skipped} non-image files skipped; "
                f"images are files named {', '.join(IMAGE_SUFFIXES)})"
            )
        inputs = [source.text for source in discovery.inputs]
        verdicts = drift.results(inputs, request.config.drift, {name: part.scored for name, part in tally.categories.items()})
        folder.publish()
    except BaseException as error:
        if run_id is not None:
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                client.set_tag(run_id, tracking.ERROR_TAG, "interrupted")
                tracking.end_run(client, run_id, "KILLED")
            else:
                tracking.fail_run(client, run_id, f"{type(error).__name__}: {error}")
        raise
    finally:
        folder.release()
        shutil.rmtree(job.scratch, ignore_errors=True)
    # The table is published: from here on nothing may fail the job. Logging is best effort.
    summary = ScoreSummary(
        job.output, tally, {name: entry.uri for name, entry in catalog.items()},
        {name: entry.threshold for name, entry in catalog.items()}, seconds, first_rows, len(files),
        writer.heatmaps, run_id, job.tracking_uri, job.experiment_id, dataset.stats(), verdicts,
    )
    try:
        write_drift_file(job.output, verdicts, folder.job_id, request.config.drift)
        _finish_run(client, run_id, summary)
    except Exception as error:  # noqa: BLE001 - the table is complete whatever MLflow says
        print(f"padim-score: warning: the table is complete, but writing its drift file or logging the run to MLflow failed: "
              f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            tracking.end_run(client, run_id)
    return summary


def score(request: ScoreRequest) -> ScoreSummary:
    """`prepare` then `run`: one scoring job on the Ray session this process is connected to."""
    return run(prepare(request))


def _largest_node_cpus() -> float:
    return max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")), default=1.0)


# ------------------------------------------------------------------------------- MLflow
def _metric_key(category: str, name: str) -> str:
    """`<category>/<name>`, so the UI groups a category's figures."""
    return tracking.metric_segment(category) + "/" + name


def _file_label(category: str) -> str:
    return re.sub(r"[^\w.-]", "_", category)


def _start_run(
    client: MlflowClient, experiment_id: str, request: ScoreRequest, output: Path, catalog: dict[str, ModelEntry], plan: Any
) -> str:
    inputs = "\n".join(request.inputs)
    params = {
        **tracking.flat_params({"scoring": request.config.to_dict()["scoring"]}),
        "inputs": inputs if len(inputs) <= 5000 else inputs[:5000] + f"\n... ({len(request.inputs)} inputs)",
        "output": str(output), "mode": request.mode, "actors": plan.actors, "cpus_per_actor": plan.cpus,
        "gpus_per_actor": plan.gpus, "device": plan.device,
        **{f"model.{name}": entry.uri for name, entry in catalog.items()},
    }
    return tracking.start_parent_run(client, experiment_id, "score", params, {"output": str(output)})


def table_run_ids(output: Path) -> list[str]:
    """The MLflow runs whose rows the published table holds (several after `--mode append`)."""
    import pyarrow.dataset as ds

    column = ds.dataset(output, format="parquet", partitioning="hive").to_table(columns=["run_id"]).column("run_id")
    return sorted(set(column.unique().to_pylist()))


def _finish_run(client: MlflowClient, run_id: str, summary: ScoreSummary) -> None:
    tally = summary.tally
    metrics: dict[str, float | None] = {
        "images": tally.images, "scored": tally.scored, "errors": tally.errors, "skipped": tally.skipped,
        "anomalous": tally.anomalous, "anomaly_rate": tally.anomaly_rate,
        "seconds": summary.seconds, "images_per_second": summary.images_per_second,
        "startup_seconds": summary.first_rows[0], "steady_images_per_second": summary.steady_images_per_second,
    }
    for row in summary.categories():
        for name in ("scored", "errors", "anomaly_rate"):
            metrics[_metric_key(row["category"], name)] = row[name]
    drift_values, drift_tags = drift_metrics(summary.drift)
    tracking.log_values(client, run_id, metrics={**metrics, **drift_values}, tags=drift_tags)
    client.log_text(run_id, json.dumps(summary.to_dict(), indent=2), "summary.json")
    run_ids = table_run_ids(summary.output)
    client.log_text(run_id, "\n".join(run_ids) + "\n", "table_run_ids.txt")
    client.set_tag(run_id, "table_jobs", str(len(run_ids)))
    client.log_artifact(run_id, str(drift_file(summary.output)))
    client.log_text(run_id, summary.ray_stats, "ray_data_stats.txt")
    with tempfile.TemporaryDirectory(prefix="padim-score-histograms-") as folder:
        for name, category in tally.categories.items():
            if category.sample.values.size:
                png = score_histogram_figure({name: category.sample.values}, summary.thresholds.get(name), f"{name}: image scores")
                (Path(folder) / f"{_file_label(name)}.png").write_bytes(png)
        if any(Path(folder).iterdir()):
            client.log_artifacts(run_id, folder, "histograms")
    tracking.end_run(client, run_id)


# -------------------------------------------------------------------------------- the CLI
def _pair(text: str) -> tuple[str, str]:
    pattern, sep, category = text.rpartition("=")
    if not sep or not pattern or not category:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PATTERN=CATEGORY, e.g. '*/line3/*=bottle'")
    return pattern, category


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = command_parser(
        "padim-score", __doc__,
        "padim-score --input outputs/demo/demo_test_images.tar --models outputs/demo/models --output outputs/demo/scores",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="folders, globs, image files, .tar/.tar.gz/.zip archives or Parquet files; local or any "
                             "pyarrow filesystem URI (s3://, gs://, hdfs://, file://)")
    parser.add_argument("--output", type=Path, required=True, help="folder of the score table (Parquet, partitioned by category)")
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument("--model", metavar="FILE_OR_URI", help="one model: a .safetensors file or models:/NAME@ALIAS (needs --category)")
    models.add_argument("--models", metavar="DIR_OR_REGISTRY",
                        help="a models folder (<detector>/<category>.safetensors, as padim-fit writes it, or "
                             "<category>.safetensors), or 'registry' for <detector>-<category>@<tracking.alias>")
    parser.add_argument("--detector", help="with --models: the detector kind to use (default: the config's detector)")
    parser.add_argument("--category", help="the category of every image (with --model: required)")
    parser.add_argument("--route", action="append", default=[], type=_pair, metavar="PATTERN=CATEGORY",
                        help="images whose source matches the shell pattern go to CATEGORY (repeatable; first match wins)")
    parser.add_argument("--image-column", help="the column of image bytes in Parquet inputs (default: detected)")
    cli.add_config_flags(parser, config_required=False)
    parser.add_argument("--mode", choices=MODES, default="error",
                        help="when the output exists: error, overwrite it, or append to it")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    connected = False

    def prepared() -> ScoreJob:
        nonlocal connected
        config = load_job_config(args.config, args.set)
        job = prepare(ScoreRequest(
            inputs=tuple(args.input), output=args.output, config=config, model=args.model, category=args.category,
            models=args.models, mode=args.mode, routes=tuple(args.route), image_column=args.image_column,
            detector=args.detector,
        ))
        if not ray.is_initialized():
            print(f"padim-score: {ray_runtime.connect()}", flush=True)
            connected = True
        return size_pool(job)

    def work(job: ScoreJob) -> int:
        summary = run(job)
        print()
        print(format_summary(summary), flush=True)
        return 0

    try:
        return cli.run_main("padim-score", prepared, work)
    finally:
        if connected:
            ray.shutdown()
