"""Our PatchCore against anomalib 2.x's PatchcoreModel, side by side on the bottle images.

    python -m bench.bench_patchcore [--data ../shared/data/mvtec_ad/bottle] [--parts 1,2,3] [--ratio 0.01] [--memory-images 2000]

Both run on the same backbone weights (efficientnet_lite0), layers (blocks.2, blocks.4), image
size, batch size and image loader (`padim_core.loader.image_batches` over the transform's
`to_pixels`; anomalib gets the same pixels normalised), so decoding costs both the same. Prints
(all three parts, or those named by `--parts`):
  1. side by side at `--ratio` (1%, so that anomalib's quadratic greedy coreset finishes): fit
     throughput (decoding, embedding and coreset included), predict throughput (decoding
     included), bank size, image and pixel AUROC;
  2. our fit at the default ratio (10%), and the bank's storage dtype: model file size and AUROC
     with the bank in float16 and in float32;
  3. fit peak memory (VmHWM of a fresh process per measurement) at `--memory-images` training
     images (bottle's train images repeated with random flips), both at the default ratio.
     anomalib keeps every patch, then projects all of them, then loops over them quadratically
     (hours at 2,000 images): its process is stopped after its first greedy step, once every
     allocation its loop makes has been made, so its figure is a lower bound of its true peak.

anomalib's side is built by `tests/support/anomalib_reference.py`, which the parity tests use
too; run from the repository root, where `tests` is importable.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's coreset progress bar
warnings.filterwarnings("ignore", category=FutureWarning)  # timm's and anomalib's deprecation notes at import

import numpy as np
import torch

from padim_core import patchcore
from padim_core.backbones import get_backbone
from padim_core.config import PatchcoreConfig
from padim_core.datasets import MvtecCategory
from padim_core.evaluate import peak_rss_mb
from padim_core.images import ImageTransform, load_mask
from padim_core.loader import image_batches
from padim_core.metrics import image_auroc, pixel_auroc
from padim_core.patchcore import PatchcoreModel
from tests.support.anomalib_reference import (
    anomalib_patchcore,
    anomalib_patchcore_fit,
    anomalib_predict,
)

LAYERS = ["blocks.2", "blocks.4"]
DEFAULT_RATIO = PatchcoreConfig.coreset_ratio
DEFAULT_DATA = Path(os.environ.get("PADIM_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "mvtec_ad" / "bottle"


class Settings(argparse.Namespace):
    data: Path
    image_size: int
    batch_size: int
    workers: int
    parts: set[int]
    ratio: float
    limit_train: int | None
    limit_test: int | None
    memory_images: int
    memory_child: str | None
    json: Path | None


def load_average() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def our_model(settings: Settings, ratio: float) -> PatchcoreModel:
    return PatchcoreModel("efficientnet_lite0", LAYERS, settings.image_size, coreset_ratio=ratio)


def batches(sources: Sequence, decode: Callable, settings: Settings):
    return image_batches(sources, decode, settings.batch_size, settings.workers)


def seed_anomalib(seed: int = 0) -> None:
    """anomalib's coreset draws from torch's and numpy's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)


class TestSet:
    """The test images' paths, labels and masks; scores and maps are collected per detector."""

    def __init__(self, category: MvtecCategory, size: tuple[int, int], limit: int | None) -> None:
        samples = list(category.test_samples)
        if limit:
            samples = samples[:: max(1, len(samples) // limit)][:limit]  # spread: every defect type
        self.paths = [sample.path for sample in samples]
        self.labels = np.array([sample.label for sample in samples])
        self.masks = np.stack([load_mask(sample.mask_path, size) for sample in samples])

    def aurocs(self, scores: torch.Tensor, maps: torch.Tensor) -> dict[str, float]:
        return {"image_auroc": image_auroc(self.labels, scores.numpy()), "pixel_auroc": pixel_auroc(self.masks, maps.numpy())}


def predict_all(predict: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], test: TestSet,
                transform: ImageTransform, settings: Settings) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(seconds, scores, maps) over the test set, decoding included."""
    start = time.perf_counter()
    scores, maps = zip(*(predict(batch) for batch in batches(test.paths, transform.to_pixels, settings)))
    return time.perf_counter() - start, torch.cat(scores), torch.cat(maps)


def side_by_side(category: MvtecCategory, train: list[Path], test: TestSet, settings: Settings) -> dict[str, float]:
    figures: dict[str, float] = {}
    ours = our_model(settings, settings.ratio)
    transform = ours.transform

    start = time.perf_counter()
    ours.fit(batches(train, transform.to_pixels, settings))
    figures["ours_fit_seconds"] = time.perf_counter() - start
    seconds, scores, maps = predict_all(ours.predict, test, transform, settings)
    figures.update(ours_predict_seconds=seconds, ours_bank_rows=ours.memory_bank_.shape[0],
                   **{f"ours_{key}": value for key, value in test.aurocs(scores, maps).items()})
    print(f"  ours      fit {figures['ours_fit_seconds']:7.1f} s  predict {seconds:6.1f} s  bank {ours.memory_bank_.shape[0]} rows"
          f"  (load {load_average()})", flush=True)

    seed_anomalib()
    theirs = anomalib_patchcore(LAYERS)
    start = time.perf_counter()
    anomalib_patchcore_fit(theirs, (transform.normalize(b) for b in batches(train, transform.to_pixels, settings)), settings.ratio)
    figures["anomalib_fit_seconds"] = time.perf_counter() - start
    seconds, scores, maps = predict_all(lambda b: anomalib_predict(theirs, transform.normalize(b)), test, transform, settings)
    figures.update(anomalib_predict_seconds=seconds, anomalib_bank_rows=theirs.memory_bank.shape[0],
                   **{f"anomalib_{key}": value for key, value in test.aurocs(scores, maps).items()})
    print(f"  anomalib  fit {figures['anomalib_fit_seconds']:7.1f} s  predict {seconds:6.1f} s  bank {theirs.memory_bank.shape[0]} rows"
          f"  (load {load_average()})", flush=True)

    for who in ("ours", "anomalib"):
        figures[f"{who}_fit_images_per_second"] = len(train) / figures[f"{who}_fit_seconds"]
        figures[f"{who}_predict_images_per_second"] = len(test.paths) / figures[f"{who}_predict_seconds"]
    figures["fit_ratio"] = figures["ours_fit_images_per_second"] / figures["anomalib_fit_images_per_second"]
    figures["predict_ratio"] = figures["ours_predict_images_per_second"] / figures["anomalib_predict_images_per_second"]
    return figures


def default_ratio_and_dtype(train: list[Path], test: TestSet, settings: Settings) -> dict[str, float]:
    """Our fit at the default ratio, then the same bank scored and saved in float32 and in float16."""
    figures: dict[str, float] = {}
    model = our_model(settings, DEFAULT_RATIO)
    stored = patchcore.BANK_DTYPE
    patchcore.BANK_DTYPE = torch.float32  # keep the bank unrounded, to compare both dtypes on it
    try:
        start = time.perf_counter()
        model.fit(batches(train, model.transform.to_pixels, settings))
        figures["default_fit_seconds"] = time.perf_counter() - start
        figures["default_fit_images_per_second"] = len(train) / figures["default_fit_seconds"]
        figures["default_bank_rows"] = model.memory_bank_.shape[0]
        results = {"float32": _scored(model, test, settings)}
    finally:
        patchcore.BANK_DTYPE = stored
    model.set_memory_bank(model.memory_bank_, model.grid_shape_, model.n_train_)  # rounded to float16
    results["float16"] = _scored(model, test, settings)
    for dtype, values in results.items():
        figures.update({f"{dtype}_{key}": value for key, value in values.items()})
    return figures


def _scored(model: PatchcoreModel, test: TestSet, settings: Settings) -> dict[str, float]:
    seconds, scores, maps = predict_all(model.predict, test, model.transform, settings)
    return {"file_mb": len(model.to_bytes()) / 1e6, "predict_seconds": seconds, **test.aurocs(scores, maps)}


# ------------------------------------------------------------------------------ memory
def flipped_sources(paths: Sequence[Path], count: int, seed: int = 0) -> list[tuple[str, bool, bool]]:
    """`count` training images: `paths` repeated, each with a seeded random horizontal and vertical flip."""
    draw = random.Random(seed)
    return [(str(paths[i % len(paths)]), draw.random() < 0.5, draw.random() < 0.5) for i in range(count)]


def flipping_decoder(transform: ImageTransform) -> Callable[[tuple[str, bool, bool]], torch.Tensor]:
    def decode(source: tuple[str, bool, bool]) -> torch.Tensor:
        path, horizontal, vertical = source
        dims = [dim for dim, flip in ((2, horizontal), (1, vertical)) if flip]
        pixels = transform.to_pixels(path)
        return pixels.flip(dims) if dims else pixels

    return decode


class StopAfterFirstStep(Exception):
    """Raised by anomalib's greedy loop once its first step has made every allocation the loop makes."""


def memory_child(settings: Settings) -> dict[str, float]:
    """In a fresh process: fit one implementation at the default ratio; its peak RSS."""
    category = MvtecCategory.from_folder(settings.data)
    sources = flipped_sources(list(category.train_images), settings.memory_images)
    spec = get_backbone("efficientnet_lite0")
    transform = ImageTransform((settings.image_size, settings.image_size), spec.mean, spec.std)
    decode = flipping_decoder(transform)
    start = time.perf_counter()
    if settings.memory_child == "ours":
        model = our_model(settings, DEFAULT_RATIO)
        model.fit(batches(sources, decode, settings))
        stopped = False
    else:
        from anomalib.models.components.sampling.k_center_greedy import KCenterGreedy

        def stop(self) -> None:
            raise StopAfterFirstStep

        KCenterGreedy.get_new_idx = stop  # called right after the first step's distances
        seed_anomalib()
        model = anomalib_patchcore(LAYERS)
        try:
            anomalib_patchcore_fit(model, (transform.normalize(b) for b in batches(sources, decode, settings)), DEFAULT_RATIO)
            stopped = False
        except StopAfterFirstStep:
            stopped = True
    return {"peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - start, "stopped_early": stopped}


def fit_peak_rss(settings: Settings, who: str) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.bench_patchcore", "--memory-child", who, "--data", str(settings.data),
               "--image-size", str(settings.image_size), "--batch-size", str(settings.batch_size),
               "--workers", str(settings.workers), "--memory-images", str(settings.memory_images)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ report
PARTS = (1, 2, 3)


def parse_parts(text: str) -> set[int]:
    """`--parts`: a comma-separated subset of 1, 2, 3."""
    try:
        parts = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        parts = set()
    if not parts or not parts <= set(PARTS):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(map(str, PARTS))}, got {text!r}")
    return parts


def report_side_by_side(figures: dict[str, float]) -> None:
    print(f"  fit      ours {figures['ours_fit_images_per_second']:6.2f} img/s  anomalib "
          f"{figures['anomalib_fit_images_per_second']:6.2f} img/s  ratio {figures['fit_ratio']:.1f}x (target >= 10)")
    print(f"  predict  ours {figures['ours_predict_images_per_second']:6.2f} img/s  anomalib "
          f"{figures['anomalib_predict_images_per_second']:6.2f} img/s  ratio {figures['predict_ratio']:.2f}x (target >= 1.5)")
    for key, target in (("image_auroc", 0.995), ("pixel_auroc", 0.978)):
        ours, theirs = figures[f"ours_{key}"], figures[f"anomalib_{key}"]
        print(f"  {key:<12} ours {ours:.4f}  anomalib {theirs:.4f}  difference {ours - theirs:+.4f} "
              f"(targets: ours >= {target}, within 0.005)")


def report_default_ratio_and_dtype(figures: dict[str, float]) -> None:
    print(f"  fit      {figures['default_fit_images_per_second']:6.2f} img/s ({figures['default_fit_seconds']:.1f} s), "
          f"bank {figures['default_bank_rows']} rows  (load {load_average()})")
    for dtype in ("float32", "float16"):
        print(f"  {dtype}  file {figures[f'{dtype}_file_mb']:6.2f} MB  image AUROC {figures[f'{dtype}_image_auroc']:.6f}"
              f"  pixel AUROC {figures[f'{dtype}_pixel_auroc']:.6f}")
    print(f"  float16 - float32: image AUROC {figures['float16_image_auroc'] - figures['float32_image_auroc']:+.2e}, "
          f"pixel AUROC {figures['float16_pixel_auroc'] - figures['float32_pixel_auroc']:+.2e}, "
          f"file {figures['float16_file_mb'] / figures['float32_file_mb']:.2f}x")


def memory(settings: Settings) -> dict[str, float]:
    ours = fit_peak_rss(settings, "ours")
    print(f"  ours      peak {ours['peak_rss_mb']:.0f} MB, fit {ours['seconds']:.0f} s  (load {load_average()})", flush=True)
    theirs = fit_peak_rss(settings, "anomalib")
    stopped = theirs["stopped_early"]
    print(f"  anomalib  peak {'at least ' if stopped else ''}{theirs['peak_rss_mb']:.0f} MB, "
          f"{'stopped after its first greedy step after ' if stopped else 'fit '}{theirs['seconds']:.0f} s  "
          f"(load {load_average()})", flush=True)
    ratio = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
    print(f"  peak memory ratio ours / anomalib {'at most ' if stopped else ''}{ratio:.2f}x (target <= 0.5)")
    return {"ours_peak_rss_mb": ours["peak_rss_mb"], "anomalib_peak_rss_mb": theirs["peak_rss_mb"],
            "ours_memory_fit_seconds": ours["seconds"], "anomalib_memory_seconds": theirs["seconds"],
            "anomalib_memory_stopped_early": stopped, "memory_ratio": ratio}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="an MVTec AD category folder")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="decoding threads (both implementations)")
    parser.add_argument("--parts", type=parse_parts, default=set(PARTS), help="which parts to run, e.g. 3 or 1,2 (default: all)")
    parser.add_argument("--ratio", type=float, default=0.01, help="coreset ratio of the side-by-side run")
    parser.add_argument("--limit-train", type=int, help="fit on the first N training images (smoke tests)")
    parser.add_argument("--limit-test", type=int, help="score N test images spread over the test set (smoke tests)")
    parser.add_argument("--memory-images", type=int, default=2000, help="training images of the memory runs")
    parser.add_argument("--memory-child", choices=("ours", "anomalib"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    settings = parser.parse_args(argv, namespace=Settings())
    if settings.memory_child:
        print(json.dumps(memory_child(settings)))
        return 0

    category = MvtecCategory.from_folder(settings.data)
    train = list(category.train_images)[: settings.limit_train]
    size = (settings.image_size, settings.image_size)
    test = TestSet(category, size, settings.limit_test)
    print(f"data: {settings.data} ({len(train)} train, {len(test.paths)} test), {settings.image_size} px, "
          f"efficientnet_lite0 {'+'.join(LAYERS)}, batch {settings.batch_size}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs, load {load_average()}", flush=True)

    figures: dict[str, float] = {}
    if 1 in settings.parts:
        print(f"1. side by side, coreset ratio {settings.ratio}", flush=True)
        figures.update(side_by_side(category, train, test, settings))
        report_side_by_side(figures)
    if 2 in settings.parts:
        print(f"2. ours at the default ratio {DEFAULT_RATIO}; the bank stored as float32 and float16", flush=True)
        figures.update(default_ratio_and_dtype(train, test, settings))
        report_default_ratio_and_dtype(figures)
    if 3 in settings.parts:
        print(f"3. fit peak RSS at {settings.memory_images} training images, ratio {DEFAULT_RATIO}, a fresh process each",
              flush=True)
        figures.update(memory(settings))
    print(f"load at the end: {load_average()}")
    if settings.json:
        settings.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
