"""Planning figures for sharded fits: one category's fit over 1, 2 and 4 Ray tasks, what each
shard sends back, and the fitting process's peak memory with 1 and 8 shards.

    python -m bench.bench_shards [--data DIR] [--image-size 256] [--shards 1,2,4] [--memory-shards 1,8]
                                 [--images 209] [--json FILE]

On bottle's training images (`--images` of them, cycled when more than there are) with the demo
config's PaDiM (efficientnet_lite0, blocks.1/2/4, 100 channels) at `--image-size`. The fit runs
in this process, as the fit task of `padim-fit` does, on an embedded Ray of 2 CPUs: the first
shard here, the others as Ray tasks of one CPU each. The memory figures come from a fresh
process per shard count (its own peak resident memory, VmHWM), so nothing earlier counts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("PADIM_TEST_DATA", REPO.parent / "shared" / "data")) / "mvtec_ad" / "bottle"


def fit_once(data: Path, image_size: int, images: int, shards: int) -> dict[str, float]:
    import ray

    from jobs.common.config import load_job_config
    from jobs.fit.shards import ShardRequest, fit_sharded
    from padim_core.evaluate import peak_rss_mb

    config = load_job_config(REPO / "configs" / "demo.yaml", [f"padim.image_size={image_size}"])
    paths = [str(path) for path in itertools.islice(itertools.cycle(sorted((data / "train" / "good").glob("*.png"))), images)]
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    detector = config.build_detector("padim", "cpu")
    started = time.perf_counter()
    merged = fit_sharded(detector, ShardRequest(config, "padim", paths, "cpu", 1), shards, {"num_cpus": 1})
    seconds = time.perf_counter() - started
    return {"shards": shards, "images": images, "seconds": seconds, "images_per_second": images / seconds,
            "bytes_per_shard": merged.nbytes, "peak_rss_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=209)
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument("--memory-shards", default="1,8")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one fit in a fresh process
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(fit_once(args.data, args.image_size, args.images, args.child)))
        return 0
    import torch

    torch.set_num_threads(1)
    figures: dict[str, object] = {"cpus": os.cpu_count(), "image_size": args.image_size, "images": args.images}
    for shards in [int(n) for n in args.shards.split(",") if n]:
        result = fit_once(args.data, args.image_size, args.images, shards)
        figures[f"throughput_{shards}"] = result
        print(f"{shards} shard(s): {result['images_per_second']:.1f} images/s ({result['seconds']:.1f} s); each shard "
              f"sends back {result['bytes_per_shard'] / 1e6:.0f} MB", flush=True)
    peaks = {}
    for shards in [int(n) for n in args.memory_shards.split(",") if n]:
        child = subprocess.run([sys.executable, "-m", "bench.bench_shards", "--data", str(args.data), "--image-size",
                                str(args.image_size), "--images", str(args.images), "--child", str(shards)],
                               cwd=REPO, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True, check=True)
        peaks[shards] = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        print(f"fitting process, {shards} shard(s): peak RSS {peaks[shards]:.0f} MB", flush=True)
    if len(peaks) >= 2:
        low, high = min(peaks), max(peaks)
        figures["memory"] = {"peak_rss_mb": peaks, "ratio": peaks[high] / peaks[low]}
        print(f"peak memory of the fitting process, {high} vs {low} shards: {peaks[high] / peaks[low]:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
