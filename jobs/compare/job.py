"""The detectors side by side, per category: accuracy, speed, model size, memory and robustness.

Reads what padim-fit (`OUTPUT/metrics.json`) and, when it ran, padim-shift (`OUTPUT/shift/`) left
in an output folder, and writes `OUTPUT/comparison/`: `report.md` (a table per category and
detector, with the shifts that break each first), `comparison.csv` and `comparison.png`, as a
whole or not at all. padim-fit writes the same report itself when it fits several detectors; run
this after padim-shift to add the robustness column. The same figures are in each fit's MLflow
child run, so selecting a category's runs in the MLflow UI and pressing Compare lines them up.

Exit 0: written; 2: nothing to compare (no metrics.json, or no successful fit).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from jobs.common import cli
from jobs.common.comparison import comparison_rows, write_comparison
from padim_core.command_line import command_parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser("padim-compare", __doc__, "padim-compare --output outputs/demo")
    parser.add_argument("--output", type=Path, required=True, help="the output folder of padim-fit (and padim-shift)")
    args = parser.parse_args(argv)

    output = args.output.expanduser().resolve()

    def compare(rows: list[dict]) -> int:
        folder = write_comparison(output, rows)
        print(f"padim-compare: {len(rows)} models compared: {folder / 'report.md'}", flush=True)
        return 0

    return cli.run_main("padim-compare", lambda: comparison_rows(output), compare)
