"""How each fitted model holds up under domain shift, as Ray tasks tracked in MLflow.

Each (category, detector) is one Ray task: load its model (`OUTPUT/models` as padim-fit writes
them, another folder, or the registry), decode its test split once, and score it unshifted and
under every shift and level of the config's `shift` section (brightness, contrast, blur, noise,
JPEG, rotation, translation, colour temperature). Figures go to one MLflow child run per unit
(metrics `shift/<shift>/<severity>/<figure>`) under a parent run, and to `OUTPUT/shift/`:
`report.md`, `figures.csv` and a plot per unit, written together or not at all.

With `--compare-config FILE`, the models that FILE's config fitted (its `output` folder's
models, or `--compare-models DIR`) are scored on the same split under the same shifts, and the
report puts both configs' figures side by side (metrics `compare/shift/...`).

Exit 0: every unit evaluated; 1: some failed; 2: nothing started.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.common import cli, runner, tracking
from jobs.common.catalog import is_registry, resolve_models
from jobs.common.config import load_job_config
from jobs.common.runner import PerCategoryJob, RunContext, TaskResult, Unit
from jobs.shift.report import (
    PANELS,
    category_plot,
    flat_metrics,
    report_markdown,
    summary_sentence,
)
from padim_core.command_line import command_parser
from padim_core.errors import ConfigError
from padim_core.safe_write import StagedFolder

REPORT_FOLDER = "shift"


@dataclass(frozen=True)
class ShiftRequest:
    """Everything one task needs; built by the driver, shipped to the worker."""

    unit: Unit
    folder: str
    models: str  # a models folder, or "registry"
    alias: str
    tracking_uri: str
    shifts: Mapping[str, tuple[float, ...]]
    seed: int
    batch_size: int
    workers: int
    device: str
    threads: int
    compare_models: str | None = None  # the compared config's models folder
    compare_label: str | None = None


# ----------------------------------------------------------------------------- the task
def shift_unit(request: ShiftRequest) -> TaskResult:
    """Score one unit's test split under every shift; never raises."""
    return runner.run_unit(request.unit, lambda result: _shift(request, result))


def _shift(request: ShiftRequest, result: TaskResult) -> None:
    import torch

    from padim_core.datasets import MvtecCategory
    from padim_core.detector import load_detector
    from padim_core.robustness import ShiftFigures, evaluate_shifts, load_test_split

    unit = request.unit
    torch.set_num_threads(request.threads)
    with tempfile.TemporaryDirectory(prefix=f"padim-shift-{unit.category}-") as scratch:
        entry = resolve_models(model=None, category=unit.category, models=request.models, detector=unit.detector,
                               alias=request.alias, tracking_uri=request.tracking_uri, scratch=Path(scratch))[unit.category]
        model = load_detector(entry.file, device=request.device)
    split = load_test_split(MvtecCategory.from_folder(request.folder), model.transform, request.batch_size, request.workers)
    result.values.update(model_uri=entry.uri, threshold=model.threshold_, n_test=len(split))
    variants = 1 + sum(len(levels) for levels in request.shifts.values())
    print(f"[{unit.label}] {len(split)} test images x {variants} variants on {request.device}, model {entry.uri}", flush=True)

    def progress(figures: ShiftFigures) -> None:
        label = "unshifted" if figures.severity == 0 else f"{figures.shift} {figures.severity} ({figures.level:g})"
        shown = ", ".join(f"{PANELS[key]} {'-' if value is None else f'{value:.3f}'}"
                          for key, value in dataclasses.asdict(figures).items() if key in PANELS)
        print(f"[{unit.label}] {label}: {shown}", flush=True)

    figures = evaluate_shifts(model, split, request.shifts, request.seed, request.batch_size, progress)
    result.values["figures"] = [dataclasses.asdict(row) for row in figures]
    if request.compare_models is None:
        return
    with tempfile.TemporaryDirectory(prefix=f"padim-shift-{unit.category}-") as scratch:
        other = resolve_models(model=None, category=unit.category, models=request.compare_models, detector=unit.detector,
                               alias=request.alias, tracking_uri=request.tracking_uri, scratch=Path(scratch))[unit.category]
        compared = load_detector(other.file, device=request.device)
    if compared.transform.image_size != model.transform.image_size:
        split = load_test_split(MvtecCategory.from_folder(request.folder), compared.transform, request.batch_size, request.workers)
    print(f"[{unit.label}] compared with {request.compare_label}: model {other.uri}", flush=True)
    figures = evaluate_shifts(compared, split, request.shifts, request.seed, request.batch_size)
    result.values["compare"] = {"config": request.compare_label, "model_uri": other.uri, "threshold": compared.threshold_,
                                "figures": [dataclasses.asdict(row) for row in figures]}


# --------------------------------------------------------------------------- the driver
def as_row(result: TaskResult) -> dict[str, Any]:
    """A result as the report reads it."""
    return {"category": result.category, "detector": result.detector, "status": result.status, "error": result.error,
            "seconds": result.seconds, "figures": [], **result.values}


class ShiftJob(PerCategoryJob):
    name = "shift"

    def __init__(self, config: Any, config_file: Path | None, models: str | None, detectors: Sequence[str] = (),
                 compare_config: Path | None = None, compare_models: str | None = None) -> None:
        super().__init__(config, config_file, detectors)
        self.models = models or str(self.output / "models")
        self.label = config_file.stem if config_file else "defaults"
        self.compare_models: str | None = None
        self.compare_label: str | None = None
        if compare_config is not None:
            compared = load_job_config(compare_config)  # a bad file is a ConfigError before anything starts
            self.compare_models = compare_models or str(compared.output_folder / "models")
            self.compare_label = compare_config.stem if compare_config.stem != self.label else f"{compare_config.stem} (compared)"
        elif compare_models is not None:
            raise ConfigError("--compare-models needs --compare-config FILE: the config whose models they are")

    def prepare(self) -> None:
        if self.compare_models is not None and (is_registry(self.compare_models) or not Path(self.compare_models).is_dir()):
            raise ConfigError(f"--compare-config: no models folder {self.compare_models} (fit that config first, "
                              "e.g. padim-fit --config FILE, or point --compare-models at its models folder)")

    def task(self) -> Callable[[ShiftRequest], TaskResult]:
        return shift_unit

    def request(self, unit: Unit, run_id: str, context: RunContext) -> ShiftRequest:
        config = self.config
        return ShiftRequest(unit, str(self.root / unit.category), self.models, config.tracking.alias, context.tracking_uri,
                            config.shift.shifts, config.shift.seed, config.data.batch_size, config.data.num_workers,
                            context.resources.device, context.resources.threads, self.compare_models, self.compare_label)

    def parent_params(self) -> dict[str, Any]:
        compare = {} if self.compare_models is None else {"compare_config": self.compare_label, "compare_models": self.compare_models}
        return {**tracking.flat_params({"shift": self.config.to_dict()["shift"]}), "models": self.models, **compare}

    def on_result(self, result: TaskResult, run_id: str, context: RunContext) -> None:
        """The unit's child run: `shift/...` metrics, its plot and summary."""
        if not result.ok:
            return
        figures, client = result.values["figures"], context.client
        tracking.log_values(client, run_id, metrics={**flat_metrics(figures), "threshold": result.values["threshold"]},
                            params={"model_uri": result.values["model_uri"], "n_test": result.values["n_test"]})
        client.log_text(run_id, summary_sentence(figures, self.config.shift.tolerance), "shift/summary.md")
        compare = result.values.get("compare")
        if compare:
            tracking.log_values(client, run_id, metrics={f"compare/{key}": value for key, value in flat_metrics(compare["figures"]).items()},
                                params={"compare_config": compare["config"], "compare_model_uri": compare["model_uri"]})
        with tempfile.TemporaryDirectory(prefix="padim-shift-log-") as scratch:
            for name, label, rows in plot_files(as_row(result), self.label):
                plot = Path(scratch) / name
                plot.write_bytes(category_plot(label, rows))
                client.log_artifact(run_id, str(plot), "shift")

    def progress_line(self, result: TaskResult) -> str:
        if not result.ok:
            return f"FAILED: {result.error}"
        return f"done in {result.seconds:.1f} s. {summary_sentence(result.values['figures'], self.config.shift.tolerance)}"

    def finish(self, results: list[TaskResult], context: RunContext) -> list[str]:
        rows = [{**as_row(result), "tolerance": self.config.shift.tolerance} for result in results]
        folder = write_report(self.output / REPORT_FOLDER, rows, self.config, self.models, self.label)
        context.client.log_artifacts(context.parent_id, str(folder), "report")
        return [f"report:  {folder / 'report.md'}", f"figures: {folder / 'figures.csv'}"]


def plot_files(row: Mapping[str, Any], label: str) -> list[tuple[str, str, Sequence[Mapping[str, Any]]]]:
    """(file name, title, figures) of a unit's plots: its own, and the compared config's when there is one."""
    unit = f"{row['category']}-{row['detector']}"
    plots = [(f"{unit}.png", f"{row['category']}/{row['detector']}", row["figures"])]
    compare = row.get("compare")
    if compare:
        plots.append((f"{unit}-compared.png", f"{row['category']}/{row['detector']} ({compare['config']})", compare["figures"]))
    return plots


def write_report(folder: Path, rows: Sequence[Mapping[str, Any]], config: Any, models: str, label: str = "defaults") -> Path:
    """`folder`: report.md, figures.csv, a plot per unit (and per compared unit) and results.json,
    swapped in as a whole: a reader finds the previous report or the new one, never a mix.
    `label` names the config in figures.csv's `config` column and beside a compared config."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with StagedFolder(folder) as staged:
        plots = {}
        for row in rows:
            if row["status"] == "ok":
                for name, title, figures in plot_files(row, label):
                    plots[title] = name
                    (staged.path / name).write_bytes(category_plot(title, figures))
        table = [{"category": row["category"], "detector": row["detector"], "config": label, **figure}
                 for row in rows for figure in row["figures"]]
        table += [{"category": row["category"], "detector": row["detector"], "config": row["compare"]["config"], **figure}
                  for row in rows if row.get("compare") for figure in row["compare"]["figures"]]
        schema = pa.schema([("category", pa.string()), ("detector", pa.string()), ("config", pa.string()), ("shift", pa.string()),
                            ("severity", pa.int32()), ("level", pa.float64()), *((key, pa.float64()) for key in PANELS)])
        pacsv.write_csv(pa.Table.from_pylist(table, schema=schema), staged.path / "figures.csv")
        (staged.path / "report.md").write_text(report_markdown(
            rows, config.shift.shifts, config.shift.seed, config.shift.tolerance, plots, models, label))
        (staged.path / "results.json").write_text(json.dumps(list(rows), indent=2) + "\n")
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(
        "padim-shift", __doc__,
        "padim-shift --config configs/demo.yaml --data-root demo_data --output outputs/demo",
    )
    cli.add_experiment_flags(parser)
    parser.add_argument("--models", help="a models folder, or 'registry' for <detector>-<category>@<tracking.alias> "
                                         "(default: OUTPUT/models, where padim-fit puts them)")
    parser.add_argument("--compare-config", type=Path, metavar="FILE",
                        help="also score the models fitted with this config (its output folder's models) on the same "
                             "split and shifts, and report both side by side")
    parser.add_argument("--compare-models", metavar="DIR",
                        help="the folder of the --compare-config models, when not its output folder's models")
    args = parser.parse_args(argv)

    def prepare() -> ShiftJob:
        config = cli.build_config(args)
        return runner.prepare_job(ShiftJob(config, args.config, args.models, cli.detector_kinds(args, config),
                                           args.compare_config, args.compare_models))

    return cli.run_main("padim-shift", prepare, runner.run_job)
