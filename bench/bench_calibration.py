"""The conformal guarantee and the drift alarm, measured on real images.

    python -m bench.bench_calibration [--bottle DIR] [--resplits 200] [--batches 100] [--threads 2]
                                      [--parts guarantee,alarm,statistic] [--set KEY=VALUE ...]
                                      [--scores FILE.npz] [--json FILE]

1. The guarantee. For bottle (efficientnet_lite0 at 256 px, configs/demo.yaml) and the demo
   categories (built here with extra normal images, at the demo's 128 px): fit once on a fixed,
   seeded part of `train/good`; every other normal image (the rest of `train/good` and
   `test/good`) is then exchangeable under that fixed model, so its scores are re-split at
   random `--resplits` times into 99 calibration images and the rest as test images. Per split
   and false-alarm rate alpha, the conformal threshold is set on the calibration part and the
   realised false-alarm rate measured on the test part; the mean over the splits must be
   <= alpha + 0.01. Fitting and scoring happen once per category; the splits cost nothing.
2. The alarm. Bottle with the default settings (20% of `train/good` held out: 167 fit, 42
   calibrate, alpha 1/43), the test split and the 42 calibration images scored once unshifted and
   once per severity of each photometric shift of `padim_core.shifts`. For each variant,
   `--batches` random batches of 18 normal test images plus 2 defective ones (10%) go through
   the drift test with the `drift` defaults of jobs.score. Where a shift pushed the realised
   false-alarm rate on the normal test images above 3 x alpha, the alarm must ring in >= 95 of
   100 batches; unshifted, it must stay quiet in >= 95 of 100. Per shift: the first severity
   the alarm detects, beside the first severity that breaks detection by the shift report's rule
   (`jobs.shift.report`). Measured two ways:
   - on the model's own split: its 42 calibration scores against 18 of its 20 normal test
     images. The realised rate is then one draw (with no drift at all, as many flagged images
     come by the chance printed beside it: a beta-binomial);
   - over re-splits: the 42 + 20 held-out normal images are exchangeable under the fitted model,
     so each batch first re-splits them at random into 42 calibrating (unshifted) and 20 test
     images (shifted), as the guarantee is measured. The mean realised rate over the re-splits
     is what the shift did, free of which 42 images happened to calibrate.

3. The statistic (`--parts statistic`, simulated scores, no images): why the mean of the upper
   half of the p-values (`drift.trim`) against a null that allows 10% defects
   (`drift.defect_share`). With 42 calibration scores and batches of 20 (18 normal + 2 defects)
   and 1,000 (900 + 100), and with 1,000 calibration scores and batches of 1,000: how often each
   design raises the alarm with no drift but 10% defects, and how often it detects the normal
   scores risen by 0.3 standard deviations.

`--scores FILE.npz` keeps the scores: a second run with the same file only re-splits and
re-samples.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import betabinom

from jobs.common.config import JOB_SECTIONS, DriftConfig
from jobs.shift.report import verdicts
from padim_core.calibration import (
    Calibration,
    conformal_rank,
    random_splits,
    realised_false_alarm_rates,
    resolve_false_alarm_rate,
)
from padim_core.config import load_config
from padim_core.datasets import MvtecCategory
from padim_core.demo_data import TEXTURE_TINTS, build_demo_dataset
from padim_core.drift import drift_test, level_counts
from padim_core.evaluate import fit_detector
from padim_core.robustness import TestSplit, decode_images, load_test_split, score_variant, split_figures
from padim_core.scoring import score_all

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BOTTLE = Path(os.environ.get("PADIM_TEST_DATA", REPO.parent / "shared" / "data")) / "mvtec_ad" / "bottle"
RATES = (0.01, 0.05, 0.1)
CALIBRATION_COUNT = 99  # the fewest images alpha = 0.01 needs
PHOTOMETRIC = ("brightness", "contrast", "noise", "jpeg", "colour_temperature")
BATCH_NORMAL, BATCH_DEFECTIVE = 18, 2


def config_for(image_size: int, overrides: list[str] | None = None) -> Any:
    return load_config(REPO / "configs" / "demo.yaml", [f"padim.image_size={image_size}", *(overrides or [])],
                       others=JOB_SECTIONS)


# ------------------------------------------------------------------------------ guarantee
def normal_pool_scores(category: MvtecCategory, image_size: int, fit_count: int) -> tuple[np.ndarray, int]:
    """Fit on `fit_count` seeded images of train/good; the scores of every other normal image."""
    config = config_for(image_size)
    model = config.build_detector()
    train = sorted(category.train_images)
    order = np.random.default_rng(0).permutation(len(train))
    fit = [train[i] for i in sorted(order[:fit_count])]
    rest = [train[i] for i in sorted(order[fit_count:])] + [s.path for s in category.test_samples if s.label == 0]
    fit_detector(model, fit, config.data.batch_size, config.data.num_workers)
    scores, _ = score_all(model, rest, config.data.batch_size, config.data.num_workers)
    return scores, len(fit)


def guarantee_rows(name: str, scores: np.ndarray, fit_count: int, resplits: int) -> list[dict[str, Any]]:
    rows = []
    for rate in RATES:
        rates = realised_false_alarm_rates(scores, CALIBRATION_COUNT, rate, resplits, seed=0)
        rows.append({"category": name, "fit": fit_count, "pool": len(scores), "calibration": CALIBRATION_COUNT,
                     "test": len(scores) - CALIBRATION_COUNT, "alpha": rate, "resplits": resplits,
                     "mean_realised": float(rates.mean()), "p95_realised": float(np.quantile(rates, 0.95)),
                     "holds": bool(rates.mean() <= rate + 0.01)})
    return rows


def guarantee(bottle: Path, cache: dict[str, np.ndarray], resplits: int) -> list[dict[str, Any]]:
    """Bottle (fit 100, pool 129) and the demo categories (fit 50 of 150 train + 50 test good)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-calibration-") as scratch:
        demo = None
        categories = [("bottle", 256, 100)] + [(name, 128, 50) for name in TEXTURE_TINTS]
        for name, size, fit_count in categories:
            key = f"pool/{name}"
            if key not in cache:
                if name == "bottle":
                    folder = bottle
                else:
                    demo = demo or build_demo_dataset(Path(scratch) / "demo", train=150, test_good=50, test_defect=1)
                    folder = demo / name
                started = time.perf_counter()
                cache[key], _ = normal_pool_scores(MvtecCategory.from_folder(folder), size, fit_count)
                print(f"{name}: fitted on {fit_count}, scored {len(cache[key])} normal images in "
                      f"{time.perf_counter() - started:.0f} s", flush=True)
            rows += guarantee_rows(name, cache[key], fit_count, resplits)
    return rows


# ---------------------------------------------------------------------------------- alarm
def normal_split(paths: list[Path], transform: Any, batch_size: int, workers: int) -> TestSplit:
    """Normal images (no masks) decoded once, to score under every shift like the test split."""
    images = decode_images(paths, transform, batch_size, workers)
    count = len(images)
    return TestSplit(images, torch.zeros((count, *images.shape[-2:]), dtype=torch.bool),
                     np.zeros(count, dtype=np.int64), np.ones(count, dtype=bool))


def shifted_scores(bottle: Path, cache: dict[str, np.ndarray], config: Any) -> tuple[Calibration, np.ndarray, dict]:
    """The bottle model's calibration, the test labels, and per variant the test split's scores and
    figures and the held-out calibration images' scores."""
    shift_seed = config.shift.seed
    if "calibration" not in cache or "held_out/None/0" not in cache:
        model = config.build_detector()
        category = MvtecCategory.from_folder(bottle)
        split = config.calibration.split(category, model.min_fit_images)
        rate, _ = resolve_false_alarm_rate(config.calibration.false_alarm_rate, len(split.calibration))
        started = time.perf_counter()
        fit_detector(model, split.paths("fit"), config.data.batch_size, config.data.num_workers)
        held_out = normal_split(split.paths("calibration"), model.transform, config.data.batch_size,
                                config.data.num_workers)
        normal = score_variant(model, held_out, config.data.batch_size)[0]
        model.calibrate(Calibration.conformal(normal, rate))
        test = load_test_split(category, model.transform, config.data.batch_size, config.data.num_workers)
        cache["calibration"], cache["rate"], cache["labels"] = normal, np.array(rate), test.labels
        variants = [(None, 0, 0.0)] + [(shift, severity, level) for shift in PHOTOMETRIC
                                        for severity, level in enumerate(config.shift.shifts[shift], start=1)]
        for shift, severity, level in variants:
            scores, maps, masks = score_variant(model, test, config.data.batch_size, shift=shift, level=level,
                                                severity=severity, seed=shift_seed)
            figures = split_figures(test, scores, maps, masks, model.threshold_)
            cache[f"scores/{shift}/{severity}"] = scores
            cache[f"figures/{shift}/{severity}"] = np.array(
                [level, *(np.nan if figures[key] is None else figures[key] for key in FIGURE_KEYS)])
            cache[f"held_out/{shift}/{severity}"] = normal if shift is None else score_variant(
                model, held_out, config.data.batch_size, shift=shift, level=level, severity=severity,
                seed=shift_seed + 1)[0]
        print(f"bottle: model fitted, {len(variants)} variants of {len(test)} test and {len(held_out)} "
              f"calibration images in {time.perf_counter() - started:.0f} s", flush=True)
    calibration = Calibration.conformal(cache["calibration"], float(cache["rate"]))
    return calibration, cache["labels"], cache


FIGURE_KEYS = ("image_auroc", "pixel_auroc", "false_positive_rate", "false_negative_rate")


def rings(calibration: Calibration, scores: np.ndarray, settings: DriftConfig, seed: int) -> bool:
    """Whether the drift test with `settings` (jobs.score's defaults) alarms on a batch's scores."""
    counts = level_counts(calibration.exceeding(scores), calibration.count)
    return replace(settings, seed=settings.seed + seed).test(counts, calibration.count).alarm


def draw_batch(rng: np.random.Generator, normal: np.ndarray, defective: np.ndarray) -> np.ndarray:
    """18 normal and 2 defective scores, drawn without replacement."""
    return np.concatenate([rng.choice(normal, BATCH_NORMAL, replace=False),
                           rng.choice(defective, BATCH_DEFECTIVE, replace=False)])


def alarm_rate(calibration: Calibration, labels: np.ndarray, scores: np.ndarray, batches: int, settings: DriftConfig
               ) -> int:
    """On the model's own split: how many of `batches` random batches of its normal and defective
    test images ring the alarm."""
    rng = np.random.default_rng(0)
    normal, defective = scores[labels == 0], scores[labels == 1]
    return sum(rings(calibration, draw_batch(rng, normal, defective), settings, index) for index in range(batches))


def resplit_alarms(held_out: np.ndarray, shifted: np.ndarray, defective: np.ndarray, count: int, rate: float,
                   batches: int, settings: DriftConfig) -> tuple[float, int]:
    """Over `batches` random re-splits of the held-out normal images (the calibration and the normal
    test images, exchangeable under the fitted model) into `count` calibrating, unshifted, and the
    rest as shifted test images: the mean realised false-alarm rate on the test part, and how many
    batches of 18 of its images plus 2 shifted defective ones ring the alarm."""
    rng = np.random.default_rng(0)
    rates, alarms = np.empty(batches), 0
    for index, (calibrating, testing) in enumerate(random_splits(len(held_out), count, batches, seed=0)):
        calibration = Calibration.conformal(held_out[calibrating], rate)
        rates[index] = calibration.is_anomalous(shifted[testing]).mean()
        alarms += rings(calibration, draw_batch(rng, shifted[testing], defective), settings, index)
    return float(rates.mean()), alarms


def chance_of_as_many_flagged(calibration: Calibration, flagged: int, images: int) -> float:
    """P(at least `flagged` of `images` normal images above the conformal threshold) with no drift
    at all: exchangeable with the calibration scores, the count is beta-binomial (images, n + 1 - k, k)."""
    rank = conformal_rank(calibration.count, calibration.false_alarm_rate)
    return float(betabinom(images, calibration.count + 1 - rank, rank).sf(flagged - 1))


def alarm(bottle: Path, cache: dict[str, np.ndarray], batches: int, overrides: list[str]
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    config = config_for(256, overrides)
    calibration, labels, stored = shifted_scores(bottle, cache, config)
    settings, rate = DriftConfig(), calibration.false_alarm_rate
    unshifted = np.concatenate([stored["held_out/None/0"], stored["scores/None/0"][labels == 0]])
    rows = []
    for key in sorted(k for k in stored if k.startswith("scores/")):
        _, shift, severity = key.split("/")
        scores = stored[key]
        level, *figures = stored[f"figures/{shift}/{severity}"].tolist()
        flagged = calibration.is_anomalous(scores[labels == 0])
        realised = float(flagged.mean())
        shifted = np.concatenate([stored[f"held_out/{shift}/{severity}"], scores[labels == 0]])
        mean_realised, resplit_alarm_count = resplit_alarms(unshifted, shifted, scores[labels == 1], calibration.count,
                                                            rate, batches, settings)
        rows.append({"shift": None if shift == "None" else shift, "severity": int(severity),
                     "level": None if shift == "None" else level, "realised_false_alarm_rate": realised,
                     "chance_with_no_drift": chance_of_as_many_flagged(calibration, int(flagged.sum()), flagged.size),
                     "must_alarm": realised > 3 * rate, "alarms": alarm_rate(calibration, labels, scores, batches, settings),
                     "mean_realised_over_resplits": mean_realised, "resplit_must_alarm": mean_realised > 3 * rate,
                     "resplit_alarms": resplit_alarm_count, "batches": batches,
                     **{k: None if np.isnan(v) else v for k, v in zip(FIGURE_KEYS, figures)}})
    rows.sort(key=lambda row: (PHOTOMETRIC.index(row["shift"]) if row["shift"] else -1, row["severity"]))

    def detected(row: dict[str, Any], alarms: str = "alarms") -> bool:
        return row[alarms] >= 0.95 * batches

    def first(rows: list[dict[str, Any]], test: Any) -> int | None:
        return next((row["severity"] for row in rows if test(row)), None)

    baseline = rows[0]
    summary = []
    for shift in PHOTOMETRIC:
        shift_rows = [row for row in rows if row["shift"] == shift]
        verdict = verdicts([{**baseline, "shift": shift}, *shift_rows], config.shift.tolerance)[0]
        breaks = [s for s in (verdict.ranking_breaks_at, verdict.threshold_breaks_at) if s is not None]
        summary.append({
            "shift": shift, "first_detected": first(shift_rows, detected),
            "first_false_alarm_rate_above_3_alpha": first(shift_rows, lambda row: row["must_alarm"]),
            "every_damaged_severity_detected": all(detected(row) for row in shift_rows if row["must_alarm"]),
            "resplit_first_detected": first(shift_rows, lambda row: detected(row, "resplit_alarms")),
            "resplit_first_above_3_alpha": first(shift_rows, lambda row: row["resplit_must_alarm"]),
            "resplit_every_damaged_severity_detected": all(detected(row, "resplit_alarms") for row in shift_rows
                                                           if row["resplit_must_alarm"]),
            "ranking_breaks_at": verdict.ranking_breaks_at, "threshold_breaks_at": verdict.threshold_breaks_at,
            "first_break": min(breaks) if breaks else None})
    return rows, summary


# ------------------------------------------------------------------------------ statistic
DESIGNS = ((0.0, 0.0), (0.5, 0.0), (0.0, 0.1), (0.5, 0.1))  # (trim, defect_share)
SIMULATED = 200


def statistic_rows() -> list[dict[str, Any]]:
    """Alarm rates of each (trim, defect_share) on simulated normal (N(0, 1)) and defective
    (N(8, 1)) scores, against 42 and 1,000 calibration scores."""
    rows = []
    for count, images, defects in ((42, 20, 2), (42, 1000, 100), (1000, 1000, 100)):
        rate, _ = resolve_false_alarm_rate(None, count)
        for trim, defect_share in DESIGNS:
            rng = np.random.default_rng(0)
            quiet = risen = 0
            for index in range(SIMULATED):
                calibration = Calibration.conformal(rng.normal(size=count), rate)
                normal, defective = rng.normal(size=images - defects), rng.normal(8, 1, size=defects)
                for scores, is_risen in ((np.concatenate([normal, defective]), False),
                                         (np.concatenate([normal + 0.3, defective]), True)):
                    counts = level_counts(calibration.exceeding(scores), count)
                    alarm = drift_test(counts, count, trim=trim, defect_share=defect_share, draws=1000,
                                       seed=index).alarm
                    risen += alarm and is_risen
                    quiet += alarm and not is_risen
            rows.append({"calibration": count, "batch": f"{images - defects} + {defects}", "trim": trim,
                         "defect_share": defect_share, "alarms_with_defects": quiet / SIMULATED,
                         "detected_rise": risen / SIMULATED})
    return rows


# ----------------------------------------------------------------------------- reporting
def show(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    cells = [[title for title, _, _ in columns]] + [[show(row[key], spec) for _, key, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    print("| " + " | ".join(title for title, _, _ in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for line in cells[1:]:
        print("| " + " | ".join(cell.rjust(width) for cell, width in zip(line, widths)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bottle", type=Path, default=DEFAULT_BOTTLE)
    parser.add_argument("--resplits", type=int, default=200)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", default="guarantee,alarm,statistic")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the alarm part's model config (configs/demo.yaml at 256 px), e.g. "
                             "padim.regularization=0.01; a --scores file keeps the model it was made with")
    parser.add_argument("--scores", type=Path, help="keep the scores in this .npz (reused when it exists)")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache: dict[str, np.ndarray] = dict(np.load(args.scores)) if args.scores and args.scores.exists() else {}
    report: dict[str, Any] = {}
    parts = args.parts.split(",")
    try:
        if "guarantee" in parts:
            report["guarantee"] = guarantee(args.bottle, cache, args.resplits)
        if "alarm" in parts:
            report["alarm"], report["alarm_summary"] = alarm(args.bottle, cache, args.batches, args.set)
        if "statistic" in parts:
            report["statistic"] = statistic_rows()
    finally:
        if args.scores:
            np.savez(args.scores, **cache)
    if "guarantee" in report:
        print(f"\nThe guarantee: mean realised false-alarm rate over {args.resplits} calibration/test re-splits")
        print_table(report["guarantee"], [
            ("category", "category", ""), ("fit", "fit", ""), ("calibration", "calibration", ""), ("test", "test", ""),
            ("alpha", "alpha", ".2f"), ("mean realised", "mean_realised", ".4f"), ("95th pct of a split", "p95_realised", ".3f"),
            ("<= alpha + 0.01", "holds", "")])
    if "alarm" in report:
        print(f"\nThe alarm on bottle: alarms in {args.batches} batches of {BATCH_NORMAL} normal + {BATCH_DEFECTIVE} "
              f"defective test images (alpha {float(cache['rate']):.4g}; must alarm where the realised rate > 3 alpha), "
              f"on the model's own split and over {args.batches} re-splits of its held-out normal images")
        print_table(report["alarm"], [
            ("shift", "shift", ""), ("severity", "severity", ""), ("level", "level", "g"),
            ("image AUROC", "image_auroc", ".3f"), ("false alarms on normal", "realised_false_alarm_rate", ".2f"),
            ("as many by chance", "chance_with_no_drift", ".3f"), ("must alarm", "must_alarm", ""),
            ("alarms", "alarms", ""), ("mean false alarms, re-splits", "mean_realised_over_resplits", ".3f"),
            ("must alarm (re-splits)", "resplit_must_alarm", ""), ("alarms (re-splits)", "resplit_alarms", "")])
        print("\nPer shift: first severity detected (>= 95 alarms) beside the first that breaks detection")
        print_table(report["alarm_summary"], [
            ("shift", "shift", ""), ("first detected", "first_detected", ""),
            ("first rate > 3 alpha", "first_false_alarm_rate_above_3_alpha", ""),
            ("every such severity detected", "every_damaged_severity_detected", ""),
            ("first detected (re-splits)", "resplit_first_detected", ""),
            ("first mean rate > 3 alpha (re-splits)", "resplit_first_above_3_alpha", ""),
            ("every such severity detected (re-splits)", "resplit_every_damaged_severity_detected", ""),
            ("ranking breaks", "ranking_breaks_at", ""), ("threshold breaks", "threshold_breaks_at", "")])
    if "statistic" in report:
        print(f"\nThe statistic on simulated scores ({SIMULATED} batches each; alarm below 0.01): alarms with 10% "
              "defects and no drift, and detections of the same batches with normal scores risen by 0.3 sd")
        print_table(report["statistic"], [
            ("calibration", "calibration", ""), ("batch (normal + defective)", "batch", ""), ("trim", "trim", ".1f"),
            ("defect_share", "defect_share", ".1f"),
            ("alarms, no drift", "alarms_with_defects", ".3f"), ("detected rise", "detected_rise", ".3f")])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
