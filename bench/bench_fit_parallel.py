"""Fit tasks one at a time versus side by side: does running categories in parallel pay off?

    python -m bench.bench_fit_parallel [--copies 2] [--train 24] [--size 128] [--image-size 128] [--repeats 1]

Builds the offline demo data set (brick, grass, gravel; each copied `--copies` times so the
category count is even and neither mode is left with one task running alone at the end),
starts an embedded Ray with 2 CPUs and runs jobs.fit's own task (`jobs.fit.job.fit_unit`: fit,
evaluate, pictures, MLflow logging into a scratch SQLite store, model registration) for every
category with the config's detector, twice over:

  serial:   num_cpus=2 per task, so one task runs at a time, with 2 torch threads
  parallel: num_cpus=1 per task, so two tasks run at once, with 1 torch thread each

and prints both wall times and their ratio. Workers are warmed up first (imports), and with
--repeats N the best of N is kept, so process start-up does not count against either mode.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import ray
from mlflow import MlflowClient

from jobs.common import tracking
from jobs.common.config import load_job_config
from jobs.common.runner import Unit
from jobs.fit.job import FitRequest, fit_unit
from padim_core.demo_data import TEXTURE_TINTS, build_demo_dataset

REPO = Path(__file__).resolve().parents[1]
CPUS = 2


@ray.remote
def _warm_up() -> int:
    """Import what a fit task imports, so neither mode pays for it."""
    import jobs.fit.job  # noqa: F401
    import padim_core.metrics
    import padim_core.viz  # noqa: F401

    return 0


def run_mode(
    num_cpus: int, categories: list[str], data: Path, config, uri: str, client: MlflowClient, experiment: str, output: Path
) -> float:
    """Wall seconds to fit every category with `num_cpus` per task (threads to match)."""
    parent = tracking.start_parent_run(client, experiment, "bench-fit-parallel", {"num_cpus": num_cpus}, {})
    task = ray.remote(fit_unit)
    started = time.perf_counter()
    refs = []
    for name in categories:
        unit = Unit(name, config.detector)
        params = tracking.detector_params(config, unit.detector)
        run_id = tracking.start_child_run(client, experiment, parent, unit.category, unit.detector, params)
        request = FitRequest(unit, str(data / name), config, str(output / "models"), uri, run_id, "cpu", num_cpus)
        refs.append(task.options(num_cpus=num_cpus, num_gpus=0).remote(request))
    results = ray.get(refs)
    seconds = time.perf_counter() - started
    failed = [f"{result.label}: {result.error}" for result in results if not result.ok]
    if failed:
        raise SystemExit(f"fit failed: {failed}")
    tracking.end_run(client, parent)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=2, help="copies of each demo category")
    parser.add_argument("--train", type=int, default=24, help="training images per category")
    parser.add_argument("--size", type=int, default=128, help="demo image side in pixels")
    parser.add_argument("--image-size", type=int, default=128, help="padim.image_size")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode; the best is kept")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-fit-") as scratch:
        folder = Path(scratch)
        data = build_demo_dataset(folder / "data", train=args.train, test_good=6, test_defect=2, size=args.size)
        categories = list(TEXTURE_TINTS)
        for name in TEXTURE_TINTS:
            for copy in range(1, args.copies):
                shutil.copytree(data / name, data / f"{name}_{copy}")
                categories.append(f"{name}_{copy}")
        overrides = [f"padim.image_size={args.image_size}", "fit.heatmap_examples=2"]
        config = load_job_config(REPO / "configs" / "demo.yaml", overrides)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        client = MlflowClient(uri)
        experiment = tracking.prepare_experiment(client, "bench", uri, folder)
        ray.init(address="local", num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
        try:
            ray.get([_warm_up.remote() for _ in range(CPUS)])
            times: dict[int, list[float]] = {CPUS: [], 1: []}
            for _ in range(args.repeats):
                for num_cpus, runs in times.items():
                    runs.append(run_mode(num_cpus, categories, data, config, uri, client, experiment, folder))
                    print(f"  num_cpus={num_cpus}: {runs[-1]:.1f} s", flush=True)
        finally:
            ray.shutdown()

    serial, parallel = min(times[CPUS]), min(times[1])
    images = len(categories) * (args.train + 6 + 2 * 4)
    print()
    print(f"{len(categories)} categories ({args.train} train + 14 test images each, {args.image_size} px), "
          f"{CPUS} CPUs, {images} images in all")
    print(f"serial   (1 task at a time, 2 CPUs + 2 threads each):  {serial:6.1f} s")
    print(f"parallel (2 tasks at a time, 1 CPU + 1 thread each):   {parallel:6.1f} s")
    print(f"serial / parallel wall time: {serial / parallel:.2f}x")


if __name__ == "__main__":
    main()
