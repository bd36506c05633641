"""How close a PatchCore update comes to a full refit, on bottle.

    python -m bench.bench_update [--data DIR] [--image-size 256] [--first 0.5] [--threads 2] [--json FILE]

Bottle's default split (20% of `train/good` held out for calibration) with the demo config's
PatchCore (efficientnet_lite0, coreset 0.1). The update fits on the first `--first` share of the
fit images, then adds the rest with `PatchcoreModel.update` (their coreset joins the bank); the
refit fits on all of them at once. Both are calibrated and judged on the same split: image and
pixel AUROC, memory bank size, and the seconds of the refit, of the first fit and of the update.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("PADIM_TEST_DATA", REPO.parent / "shared" / "data")) / "mvtec_ad" / "bottle"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--first", type=float, default=0.5, help="share of the fit images fitted before the update")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import torch

    from jobs.common.config import load_job_config
    from padim_core.datasets import MvtecCategory
    from padim_core.evaluate import evaluate_category
    from padim_core.loader import image_batches

    torch.set_num_threads(args.threads)
    config = load_job_config(REPO / "configs" / "demo.yaml", [f"patchcore.image_size={args.image_size}"])
    category = MvtecCategory.from_folder(args.data)
    split = config.calibration.split(category, 2)
    seconds: dict[str, float] = {}

    def fit_then_update(model, images: list[Path]) -> None:
        first = round(len(images) * args.first)
        for name, part, step in (("first_fit", images[:first], model.fit), ("update", images[first:], model.update)):
            started = time.perf_counter()
            step(image_batches(part, model.transform.to_pixels, config.data.batch_size, config.data.num_workers))
            seconds[name] = time.perf_counter() - started

    figures = {}
    for name, fit in (("refit", None), ("update", fit_then_update)):
        evaluation = evaluate_category(category, config, "cpu", "patchcore", split, fit=fit)
        metrics = evaluation.metrics
        figures[name] = {"image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"],
                         "bank": int(evaluation.model.memory_bank_.shape[0]), "fit_seconds": metrics["fit_seconds"]}
        print(f"{name}: image AUROC {metrics['image_auroc']:.4f}, pixel AUROC {metrics['pixel_auroc']:.4f}, "
              f"bank {figures[name]['bank']} patches, {metrics['fit_seconds']:.1f} s", flush=True)
    figures["update"] |= {f"{name}_seconds": value for name, value in seconds.items()}
    figures["images"] = {"fit": len(split.fit), "first": round(len(split.fit) * args.first), "test": len(split.test)}
    print(f"update: first fit {seconds['first_fit']:.1f} s, update {seconds['update']:.1f} s "
          f"({figures['images']['first']} + {len(split.fit) - figures['images']['first']} of {len(split.fit)} images)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
