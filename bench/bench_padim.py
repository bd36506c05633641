"""padim_core against anomalib 2.x's PadimModel and against the bare backbone, side by side.

    python -m bench.bench_padim [--data ../shared/data/mvtec_ad/bottle] [--image-size 256]

Prints, on the bottle images (decoding included unless said otherwise):
  1. fit and predict throughput, ours and anomalib's, on the same backbone, weights, layers,
     channel index, image size, batch size and image loader;
  2. predict throughput on already-decoded tensors against the backbone's own forward pass
     (the truncated feature extractor, sped up the same way), same batch size;
  3. peak memory of a fit on 100 and on 1,600 training images (each in a fresh process).

anomalib's side is set up by `tests/support/anomalib_reference.py`, which the parity tests use
too; run from the repository root, where `tests` is importable.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from padim_core.acceleration import optimize_for_inference
from padim_core.datasets import MvtecCategory
from padim_core.loader import image_batches
from padim_core.padim import PadimModel
from tests.support.anomalib_reference import (
    anomalib_fit,
    anomalib_padim,
    anomalib_predict,
)

LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
DEFAULT_DATA = Path(os.environ.get("PADIM_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "mvtec_ad" / "bottle"


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def throughput(category: MvtecCategory, size: int, batch_size: int, workers: int) -> dict[str, float]:
    train, test = list(category.train_images), [sample.path for sample in category.test_samples]
    ours = PadimModel("efficientnet_lite0", LAYERS, 100, size)
    theirs = anomalib_padim(LAYERS, ours.channel_index)

    def load(paths):
        return image_batches(paths, ours.transform, batch_size, workers)

    def our_predict():
        for batch in load(test):
            ours.predict(batch)

    def their_predict():
        for batch in load(test):
            anomalib_predict(theirs, batch)

    figures = {
        "ours_fit": len(train) / timed(lambda: ours.fit(load(train))),
        "anomalib_fit": len(train) / timed(lambda: anomalib_fit(theirs, load(train))),
        "ours_predict": len(test) / timed(our_predict),
        "anomalib_predict": len(test) / timed(their_predict),
    }
    figures["fit_ratio"] = figures["ours_fit"] / figures["anomalib_fit"]
    figures["predict_ratio"] = figures["ours_predict"] / figures["anomalib_predict"]
    return figures


def decoded(category: MvtecCategory, size: int, batch_size: int, rounds: int = 5) -> dict[str, float]:
    model = PadimModel("efficientnet_lite0", LAYERS, 100, size)
    paths = [sample.path for sample in category.test_samples][:batch_size]
    images = torch.stack([model.transform(path) for path in paths])
    model.fit([images])
    backbone = optimize_for_inference(model.embedder.extractor, images)
    model.predict(images)  # trace outside the timing, as the backbone's was
    with torch.inference_mode():
        backbone(images)
        # Alternate the two so that both see the same machine load; keep each one's best round.
        backbone_seconds, predict_seconds = [], []
        for _ in range(rounds):
            backbone_seconds.append(timed(lambda: backbone(images)))
            predict_seconds.append(timed(lambda: model.predict(images)))
    figures = {
        "backbone_forward": len(images) / min(backbone_seconds),
        "ours_predict_decoded": len(images) / min(predict_seconds),
    }
    figures["decoded_ratio"] = figures["ours_predict_decoded"] / figures["backbone_forward"]
    return figures


def fit_peak_rss(data: Path, images: int, size: int, batch_size: int) -> float:
    """Peak RSS (MB) of a fresh process that fits on `images` bottle images (cycled)."""
    code = (
        "import itertools, json; from padim_core.datasets import MvtecCategory; "
        "from padim_core.evaluate import peak_rss_mb; "
        "from padim_core.loader import image_batches; from padim_core.padim import PadimModel; "
        f"c = MvtecCategory.from_folder({str(data)!r}); m = PadimModel('efficientnet_lite0', {LAYERS!r}, 100, {size}); "
        f"paths = list(itertools.islice(itertools.cycle(c.train_images), {images})); "
        f"m.fit(image_batches(paths, m.transform, {batch_size}, 2)); "
        "print(json.dumps(peak_rss_mb()))"
    )
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="an MVTec AD category folder")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="decoding threads (both implementations)")
    parser.add_argument("--memory-images", default="100,1600", help="training set sizes for the memory runs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    category = MvtecCategory.from_folder(args.data)
    print(f"data: {args.data} ({len(category.train_images)} train, {len(category.test_samples)} test), "
          f"{args.image_size}x{args.image_size}, batch {args.batch_size}, {torch.get_num_threads()} torch threads")
    figures = throughput(category, args.image_size, args.batch_size, args.workers)
    print(f"fit      ours {figures['ours_fit']:6.2f} img/s  anomalib {figures['anomalib_fit']:6.2f} img/s  "
          f"ratio {figures['fit_ratio']:.2f}x (target >= 2)")
    print(f"predict  ours {figures['ours_predict']:6.2f} img/s  anomalib {figures['anomalib_predict']:6.2f} img/s  "
          f"ratio {figures['predict_ratio']:.2f}x (target >= 1.5)")
    figures.update(decoded(category, args.image_size, args.batch_size))
    print(f"decoded  ours predict {figures['ours_predict_decoded']:6.2f} img/s  backbone forward "
          f"{figures['backbone_forward']:6.2f} img/s  ratio {figures['decoded_ratio']:.2f}x (target >= 0.85)")
    counts = [int(n) for n in args.memory_images.split(",")]
    rss = {n: fit_peak_rss(args.data, n, args.image_size, args.batch_size) for n in counts}
    for n in counts:
        figures[f"fit_peak_rss_mb_{n}"] = rss[n]
    figures["memory_ratio"] = rss[counts[-1]] / rss[counts[0]]
    print("memory   fit peak RSS " + "  ".join(f"{n} images {rss[n]:.0f} MB" for n in counts)
          + f"  ratio {figures['memory_ratio']:.2f}x (target <= 1.15)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
