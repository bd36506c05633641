"""PadimModel on the GPU against the same machine's CPUs, on decoded tensors, side by side.

    python -m bench.bench_gpu [--images 512] [--image-size 256] [--batch-size 32] [--json FILE]

Fits on `--images` random images and predicts as many, on CUDA and on the CPU (torch on every
core), with the demo config's backbone and layers, and prints images per second, the GPU's
speed-up, the largest difference between the two devices' anomaly maps and the GPU's peak
memory. Decoding is left out: it runs on the CPU whatever the model's device. Needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from padim_core.padim import PadimModel

LAYERS = ["blocks.1", "blocks.2", "blocks.4"]


def run(device: str, images: torch.Tensor, batch_size: int, image_size: int) -> dict[str, object]:
    model = PadimModel("efficientnet_lite0", LAYERS, n_features=100, image_size=image_size, device=device)
    batches = list(images.split(batch_size))

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    # Warm-up on a throwaway model: CUDA context, cuDNN's algorithm choice, tracing on the CPU.
    PadimModel("efficientnet_lite0", LAYERS, n_features=100, image_size=image_size, device=device).fit(batches[:2])
    synchronize()
    started = time.perf_counter()
    accumulator = model.accumulate(batch.to(device) for batch in batches)
    synchronize()
    accumulated = time.perf_counter()
    model.fit_accumulator(accumulator)
    synchronize()
    fit_seconds = time.perf_counter() - started
    model.predict(batches[0])  # warm-up: this model's tracing on the CPU
    synchronize()
    started = time.perf_counter()
    maps = [model.predict(batch)[1] for batch in batches]
    synchronize()
    predict_seconds = time.perf_counter() - started
    return {
        "fit_images_per_second": len(images) / fit_seconds,
        "finalize_seconds": fit_seconds - (accumulated - started),
        "predict_images_per_second": len(images) / predict_seconds,
        "first_maps": maps[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: needs a CUDA GPU and torch sees none here; nothing was measured", file=sys.stderr)
        return 2
    torch.set_num_threads(os.cpu_count() or 1)
    images = torch.rand(args.images, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.cuda.reset_peak_memory_stats()
    gpu = run("cuda", images, args.batch_size, args.image_size)
    peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
    cpu = run("cpu", images, args.batch_size, args.image_size)
    difference = float((gpu.pop("first_maps") - cpu.pop("first_maps")).abs().max())
    figures = {
        "gpu": torch.cuda.get_device_name(), "cpu_threads": torch.get_num_threads(), "images": args.images,
        "image_size": args.image_size, "batch_size": args.batch_size, "cuda": gpu, "cpu": cpu,
        "fit_speedup": gpu["fit_images_per_second"] / cpu["fit_images_per_second"],
        "predict_speedup": gpu["predict_images_per_second"] / cpu["predict_images_per_second"],
        "max_map_difference": difference, "peak_gpu_memory_mb": peak_gpu_mb,
    }
    print(f"{figures['gpu']} vs {figures['cpu_threads']} CPU threads, {args.images} images of {args.image_size} px, batches of {args.batch_size}")
    for stage in ("fit", "predict"):
        key = f"{stage}_images_per_second"
        print(f"{stage:>7}: GPU {gpu[key]:8.1f} images/s, CPU {cpu[key]:7.1f} images/s = {figures[f'{stage}_speedup']:.1f}x")
    print(f"finalize (covariance inverses): GPU {gpu['finalize_seconds']:.2f} s, CPU {cpu['finalize_seconds']:.2f} s")
    print(f"largest difference between the devices' anomaly maps: {difference:.2e}; GPU peak memory {peak_gpu_mb:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
