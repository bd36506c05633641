"""The main job on embedded defaults: demo data, a model per category, scored test images.

    python -m jobs.demo [--config configs/demo.yaml] [--data-root demo_data] [--output outputs/demo]

1. builds the offline demo data set (kept if it is already there),
2. fits every category with `jobs.fit` (embedded local Ray, local SQLite MLflow store),
3. packs every category's test images into one tar archive and scores it with `jobs.score`
   (images are routed to their category's model by the archive's first folder level),
then says where the models, the score table and the MLflow UI are.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Sequence

from padim_core.config import load_config
from padim_core.datasets import discover_categories, list_images
from padim_core.demo_data import build_demo_dataset


def pack_test_images(data_root: Path, archive: Path) -> int:
    """Write `<category>/test/<defect>/<file>` members of every category into `archive`."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")
    count = 0
    with tarfile.open(partial, "w") as tar:
        for category in discover_categories(data_root):
            for image in list_images(data_root / category / "test"):
                tar.add(image, arcname=image.relative_to(data_root).as_posix())
                count += 1
    partial.replace(archive)
    return count


def _run(step: str, command: list[str]) -> None:
    print(f"\n== {step}: {' '.join(command)}", flush=True)
    status = subprocess.run(command).returncode
    if status != 0:
        raise SystemExit(f"jobs.demo: {step} failed (exit {status})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--data-root", type=Path, help="demo data folder (default: the config's data.root)")
    parser.add_argument("--output", type=Path, help="output folder (default: the config's output)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    data_root = (args.data_root or Path(config.data.root)).resolve()
    output = (args.output or Path(config.output)).resolve()

    if data_root.is_dir() and any(data_root.iterdir()):
        print(f"== demo data: reusing {data_root}")
    else:
        build_demo_dataset(data_root)
        print(f"== demo data: built {data_root}")
    python = sys.executable
    _run("fit", [python, "-m", "jobs.fit", "--config", str(args.config), "--data-root", str(data_root),
                 "--output", str(output)])
    archive = output / "demo_test_images.tar"
    print(f"\n== packed {pack_test_images(data_root, archive)} test images into {archive}")
    scores = output / "scores"
    _run("score", [python, "-m", "jobs.score", "--input", str(archive), "--output", str(scores),
                   "--models", str(output / "models"), "--config", str(args.config), "--mode", "overwrite",
                   "--set", f"output={output}"])  # so both jobs share OUTPUT's MLflow store
    print(
        "\nDone.\n"
        f"  models:       {output / 'models'}\n"
        f"  fit summary:  {output / 'metrics.json'}\n"
        f"  score table:  {scores} (Parquet, partitioned by category)\n"
        f"  MLflow UI:    .venv/bin/mlflow ui --backend-store-uri sqlite:///{output / 'mlflow.db'} "
        "--host 127.0.0.1 --port 5000  (then open http://127.0.0.1:5000)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
