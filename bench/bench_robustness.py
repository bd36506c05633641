"""Detector options under domain shift, side by side: what chose the defaults of issue 14.

    python -m bench.bench_robustness [--data ../shared/data/mvtec_ad/bottle] [--image-size 256] \
        [--variant NAME=key=value,key=value ...] [--shifts brightness,contrast,...] [--severities 1,2,3] \
        [--json results.jsonl]

For each variant (a name and config overrides; `NAME=` alone is the config's defaults) on one
MVTec-layout category:

1. fit on a seeded 80% of `train/good` (the same images for every variant);
2. calibrate on the other 20%, held out: the threshold is the ceil((n+1)(1 - alpha))-th
   smallest held-out score, alpha = 0.01 (the conformal rule of issue 12); with fewer than 99
   held-out images that rank is beyond n, and the largest held-out score is used (the smallest
   alpha the count supports, 1/(n+1));
3. score the test split unshifted (image AUROC, pixel AUROC, AUPRO, false-alarm rate at the
   threshold) and under each photometric shift at each severity (image AUROC, pixel AUROC,
   false-alarm rate), with the levels and per-image seeds of `padim-shift` (shift seed 0).

Decoded images are cached (safetensors, under `--cache`) so repeated runs skip decoding. PaDiM
variants that differ only in how covariances are regularised share one fit's running sums and one
CNN pass per image (`tests/support/robustness_runs.py`, shared with the defaults test; run from
the repository root, where `tests` is importable). Prints one table per variant and a summary against issue 14's targets; with
`--json`, appends one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from jobs.common.config import JOB_SECTIONS
from padim_core.config import load_config
from tests.support.robustness_runs import (
    evaluate_group,
    groups_of,
    load_data,
    shifted_splits,
)

DEFAULT_DATA = Path(os.environ.get("PADIM_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "mvtec_ad" / "bottle"
PHOTOMETRIC = ("brightness", "contrast", "noise", "jpeg", "colour_temperature", "blur")


def verdict(figures: dict[str, Any], severities: list[int]) -> list[str]:
    """Issue 14's targets that the figures miss (empty: all met)."""
    missed = []
    for key, floor in (("image_auroc", 0.995), ("pixel_auroc", 0.981), ("aupro", 0.93)):
        if figures[key] < floor:
            missed.append(f"{key} {figures[key]:.3f} < {floor}")
    for key, row in figures["shifts"].items():
        shift, severity = key.split("/")
        needed = 3 if shift in ("noise", "brightness", "colour_temperature") else 2
        if int(severity) <= needed and figures["image_auroc"] - row["image_auroc"] > 0.05:
            missed.append(f"{key} image AUROC {row['image_auroc']:.3f}")
        if int(severity) == 1 and row["false_alarm_rate"] > 0.2:
            missed.append(f"{key} false alarms {row['false_alarm_rate']:.2f}")
    return missed


def print_figures(figures: dict[str, Any], severities: list[int]) -> None:
    print(f"\n== {figures['variant']}: fit {figures['fit_seconds']:.0f} s, threshold {figures['threshold']:.2f} "
          f"(alpha {figures['alpha']:.3f}, {figures['calibration_count']} held-out); unshifted image AUROC "
          f"{figures['image_auroc']:.3f}, pixel AUROC {figures['pixel_auroc']:.3f}, AUPRO {figures['aupro']:.3f}, "
          f"false alarms {figures['false_alarm_rate']:.2f}, recall {figures['recall']:.2f}")
    shifts = sorted({key.split("/")[0] for key in figures["shifts"]}, key=PHOTOMETRIC.index)
    print(f"{'shift':<20}" + "".join(f"  sev{s} img/pix/FAR   " for s in severities))
    for shift in shifts:
        cells = []
        for severity in severities:
            row = figures["shifts"].get(f"{shift}/{severity}")
            pixel = "-" if row is None or row["pixel_auroc"] is None else f"{row['pixel_auroc']:.3f}"
            cells.append("" if row is None else f"  {row['image_auroc']:.3f}/{pixel}/{row['false_alarm_rate']:.2f}")
        print(f"{shift:<20}" + "".join(f"{cell:<22}" for cell in cells))
    missed = verdict(figures, severities)
    print("targets: " + ("all met" if not missed else "missed: " + "; ".join(missed)))


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    return name, [item for item in overrides.split(",") if item] if overrides else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--config", type=Path, help="base config (default: built-in defaults)")
    parser.add_argument("--variant", action="append", default=[], help="NAME=key=value,key=value (repeatable)")
    parser.add_argument("--shifts", default=",".join(PHOTOMETRIC))
    parser.add_argument("--severities", default="1,2,3")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fit-images", type=int, help="fit on only this many of the fit split's images")
    parser.add_argument("--cache", type=Path, default=Path("outputs/bench-cache"))
    parser.add_argument("--json", type=Path, help="append one JSON line per variant here")
    parser.add_argument("--pixels", action="store_true", help="pixel AUROC under every shift too (slow)")
    args = parser.parse_args()
    torch.manual_seed(0)
    severities = [int(s) for s in args.severities.split(",")]
    shifts = [s for s in args.shifts.split(",") if s]
    data = load_data(args.data, args.image_size, args.cache, fit_images=args.fit_images)
    print(f"{args.data.name}: fit on {len(data.fit)}, calibrate on {len(data.calibration)} held-out, "
          f"test {len(data.split)}; shifts {shifts} at severities {severities}; {torch.get_num_threads()} threads", flush=True)
    variants = shifted_splits(data.split, shifts, severities)
    configs = {}
    for text in args.variant or ["default="]:
        name, overrides = parse_variant(text)
        size = [f"{kind}.image_size={args.image_size}" for kind in ("padim", "patchcore")]
        configs[name] = load_config(args.config, size + overrides, others=JOB_SECTIONS)
    for group in groups_of(configs):
        started = time.perf_counter()
        group.fit(data.fit, args.batch_size)
        for figures in evaluate_group(group, data, variants, args.batch_size, args.pixels):
            figures.update(category=args.data.name, image_size=args.image_size,
                           overrides=parse_variant(next(v for v in args.variant or ["default="] if parse_variant(v)[0] == figures["variant"]))[1])
            print_figures(figures, severities)
            if args.json:
                with args.json.open("a") as out:
                    out.write(json.dumps(figures) + "\n")
        print(f"(group {group.names}: {time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
