"""How each fitted model holds up under domain shift, as Ray tasks tracked in MLflow.

Each (category, detector) is one Ray task: load its model (`OUTPUT/models` as padim-fit writes
them, another folder, or the registry), decode its test split once, and score it unshifted and
under every shift and level of the config's `shift` section (brightness, contrast, blur, noise,
JPEG, rotation, translation, colour temperature). Figures go to one MLflow child run per unit
(metrics `shift/<shift>/<severity>/<figure>`) under a parent run, and to `OUTPUT/shift/`:
`report.md`, `figures.csv` and a plot per unit, written together or not at all.

Exit 0: every unit evaluated; 1: some failed; 2: nothing started.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from jobs.common import cli, runner, tracking
from jobs.common.catalog import resolve_models
from jobs.common.runner import PerCategoryJob, RunContext, TaskResult, Unit
from jobs.shift.report import (
    PANELS,
    category_plot,
    flat_metrics,
    report_markdown,
    summary_sentence,
)
from padim_core.command_line import command_parser
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


# --------------------------------------------------------------------------- the driver
def as_row(result: TaskResult) -> dict[str, Any]:
    """A result as the report reads it."""
    return {"category": result.category, "detector": result.detector, "status": result.status, "error": result.error,
            "seconds": result.seconds, "figures": [], **result.values}


class ShiftJob(PerCategoryJob):
    name = "shift"

    def __init__(self, config: Any, config_file: Path | None, models: str | None, detectors: Sequence[str] = ()) -> None:
        super().__init__(config, config_file, detectors)
        self.models = models or str(self.output / "models")

    def task(self) -> Callable[[ShiftRequest], TaskResult]:
        return shift_unit

    def request(self, unit: Unit, run_id: str, context: RunContext) -> ShiftRequest:
        config = self.config
        return ShiftRequest(unit, str(self.root / unit.category), self.models, config.tracking.alias, context.tracking_uri,
                            config.shift.shifts, config.shift.seed, config.data.batch_size, config.data.num_workers,
                            context.resources.device, context.resources.threads)

    def parent_params(self) -> dict[str, Any]:
        return {**tracking.flat_params({"shift": self.config.to_dict()["shift"]}), "models": self.models}

    def on_result(self, result: TaskResult, run_id: str, context: RunContext) -> None:
        """The unit's child run: `shift/...` metrics, its plot and summary."""
        if not result.ok:
            return
        figures, client = result.values["figures"], context.client
        tracking.log_values(client, run_id, metrics={**flat_metrics(figures), "threshold": result.values["threshold"]},
                            params={"model_uri": result.values["model_uri"], "n_test": result.values["n_test"]})
        client.log_text(run_id, summary_sentence(figures, self.config.shift.tolerance), "shift/summary.md")
        with tempfile.TemporaryDirectory(prefix="padim-shift-log-") as scratch:
            plot = Path(scratch) / f"{result.category}-{result.detector}.png"
            plot.write_bytes(category_plot(result.label, figures))
            client.log_artifact(run_id, str(plot), "shift")

    def progress_line(self, result: TaskResult) -> str:
        if not result.ok:
            return f"FAILED: {result.error}"
        return f"done in {result.seconds:.1f} s. {summary_sentence(result.values['figures'], self.config.shift.tolerance)}"

    def finish(self, results: list[TaskResult], context: RunContext) -> list[str]:
        rows = [{**as_row(result), "tolerance": self.config.shift.tolerance} for result in results]
        folder = write_report(self.output / REPORT_FOLDER, rows, self.config, self.models)
        context.client.log_artifacts(context.parent_id, str(folder), "report")
        return [f"report:  {folder / 'report.md'}", f"figures: {folder / 'figures.csv'}"]


def write_report(folder: Path, rows: Sequence[Mapping[str, Any]], config: Any, models: str) -> Path:
    """`folder`: report.md, figures.csv, a plot per unit and results.json, swapped in as a whole:
    a reader finds the previous report or the new one, never a mix."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with StagedFolder(folder) as staged:
        plots = {}
        for row in rows:
            if row["status"] == "ok":
                label = f"{row['category']}/{row['detector']}"
                plots[label] = f"{row['category']}-{row['detector']}.png"
                (staged.path / plots[label]).write_bytes(category_plot(label, row["figures"]))
        table = [{"category": row["category"], "detector": row["detector"], **figure} for row in rows for figure in row["figures"]]
        schema = pa.schema([("category", pa.string()), ("detector", pa.string()), ("shift", pa.string()),
                            ("severity", pa.int32()), ("level", pa.float64()), *((key, pa.float64()) for key in PANELS)])
        pacsv.write_csv(pa.Table.from_pylist(table, schema=schema), staged.path / "figures.csv")
        (staged.path / "report.md").write_text(report_markdown(
            rows, config.shift.shifts, config.shift.seed, config.shift.tolerance, plots, models))
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
    args = parser.parse_args(argv)
    def prepare() -> ShiftJob:
        config = cli.build_config(args)
        return runner.prepare_job(ShiftJob(config, args.config, args.models, cli.detector_kinds(args, config)))

    return cli.run_main("padim-shift", prepare, runner.run_job)
