"""The main job on embedded defaults: demo data, a model per category, scored test images.

Builds the offline demo data set (kept when already there), fits every category with padim-fit
(embedded local Ray, SQLite MLflow store in the output folder), packs every category's test
images into one tar archive and scores it with padim-score (each member goes to the model of
its first folder level), then says where the models, the score table and the MLflow UI are.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

from jobs.common import cli
from jobs.common.config import load_job_config
from jobs.common.outputs import drift_file
from padim_core.command_line import command_parser
from padim_core.datasets import discover_categories, list_images
from padim_core.demo_data import build_demo_dataset
from padim_core.errors import PadimError
from padim_core.safe_write import write_file


def pack_test_images(data_root: Path, archive: Path) -> int:
    """Write `<category>/test/<defect>/<file>` members of every category into `archive`."""
    images = [image for category in discover_categories(data_root) for image in list_images(data_root / category / "test")]

    def write(path: Path) -> None:
        with tarfile.open(path, "w") as tar:
            for image in images:
                tar.add(image, arcname=image.relative_to(data_root).as_posix())

    write_file(archive, write)
    return len(images)


class StepFailed(PadimError):
    """A step of the demo (a job it runs) failed."""


def _run(step: str, command: list[str]) -> None:
    print(f"\n== {step}: {' '.join(command)}", flush=True)
    status = subprocess.run(command, check=False).returncode
    if status != 0:
        raise StepFailed(f"{step} failed (exit {status})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(
        "padim-demo", __doc__,
        "padim-demo --config configs/demo.yaml --output outputs/demo",
    )
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="experiment YAML")
    parser.add_argument("--data-root", type=Path, help="demo data folder (default: the config's data.root)")
    parser.add_argument("--output", type=Path, help="output folder (default: the config's output)")
    args = parser.parse_args(argv)
    return cli.run_main("padim-demo", lambda: _settings(args), _demo)


def _settings(args) -> tuple[Path, Path, Path]:
    config = load_job_config(args.config)
    return args.config, (args.data_root or Path(config.data.root)).resolve(), (args.output or Path(config.output)).resolve()


def _demo(settings: tuple[Path, Path, Path]) -> int:
    config_file, data_root, output = settings
    if data_root.is_dir() and any(data_root.iterdir()):
        print(f"== demo data: reusing {data_root}")
    else:
        build_demo_dataset(data_root)
        print(f"== demo data: built {data_root}")
    python = sys.executable
    _run("fit", [python, "-m", "jobs.fit", "--config", str(config_file), "--data-root", str(data_root),
                 "--output", str(output)])
    archive = output / "demo_test_images.tar"
    print(f"\n== packed {pack_test_images(data_root, archive)} test images into {archive}")
    scores = output / "scores"
    # The score table's folder sits in OUTPUT, so both jobs share OUTPUT's MLflow store.
    _run("score", [python, "-m", "jobs.score", "--input", str(archive), "--output", str(scores),
                   "--models", str(output / "models"), "--config", str(config_file), "--mode", "overwrite"])
    print(
        "\nDone.\n"
        f"  models:       {output / 'models'}/<detector>/<category>.safetensors\n"
        f"  splits:       {output / 'manifests'}/<category>.json (fit, calibration, test)\n"
        f"  fit summary:  {output / 'metrics.json'}\n"
        f"  score table:  {scores} (Parquet, partitioned by category)\n"
        f"  drift alarm:  {drift_file(scores)}\n"
        f"  MLflow UI:    .venv/bin/mlflow ui --backend-store-uri sqlite:///{output / 'mlflow.db'} "
        "--host 127.0.0.1 --port 5000  (then open http://127.0.0.1:5000)"
    )
    return 0
