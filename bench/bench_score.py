"""jobs.score against PadimModel.predict in one process, and jobs.score's memory as images grow.

    python -m bench.bench_score [--throughput-images 8000] [--actors 1,2] [--memory-images 2000,20000]
                                [--limit-members 3] [--image-size 128] [--source-side 0] [--work DIR] [--json FILE]

Uses the bottle images of MVTec AD (`PADIM_TEST_DATA`, default ../shared/data), repeated as
often as needed and packed into tar archives of at most 2,000 members (`--source-side N`
first shrinks them to N x N pixels, for a quicker run; 0 keeps the 900 x 900 originals).
The model is fitted once on 32 training images with the demo config's backbone and layers.

1. Throughput on the same archive: a single process that streams the tar, decodes each image
   with the model's transform and calls `PadimModel.predict` in batches (torch on every core,
   model loaded and traced before the clock starts), against jobs.score with 1 and 2 actors
   (the CLI in a subprocess; the rate it reports runs from the start of the Ray Data
   pipeline to the last row written, so actor start-up counts against it).
2. Peak memory of jobs.score's whole process tree (the driver, Ray's own processes and every
   worker), sampled with psutil while it scores each of `--memory-images`.
   Reported both as summed RSS every 0.5 s (counts shared pages, such as Ray's object store
   and torch's libraries, once per process that maps them) and summed PSS every 5 s (shares
   them out, so it adds up to the real footprint).
3. The decode memory ceiling: peak tree memory while scoring a zip of `--limit-members` members of
   zeros just under `sources.MAX_IMAGE_BYTES` each (a few MB on disk: the zip bomb of the hostile
   input review), against a zip of 200 ordinary bottle photos.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import psutil
import torch
from PIL import Image

from jobs.score.sources import MAX_IMAGE_BYTES
from padim_core.calibration import Calibration
from padim_core.padim import PadimModel

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("PADIM_TEST_DATA", REPO.parent / "shared" / "data")) / "mvtec_ad" / "bottle"
LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
ARCHIVE_MEMBERS = 2000
BATCH_SIZE = 32


def bottle_images(data: Path, side: int) -> list[bytes]:
    """Every bottle image (train and test) as PNG bytes, shrunk to `side` when side > 0."""
    paths = sorted(data.glob("train/good/*.png")) + sorted(data.glob("test/*/*.png"))
    images = []
    for path in paths:
        if side <= 0:
            images.append(path.read_bytes())
            continue
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").resize((side, side), Image.BILINEAR).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def write_archives(folder: Path, images: list[bytes], count: int) -> list[Path]:
    """`count` images cycled from `images`, under bottle/ in tars of at most ARCHIVE_MEMBERS members."""
    folder.mkdir(parents=True, exist_ok=True)
    cycle = itertools.cycle(images)
    archives = []
    for start in range(0, count, ARCHIVE_MEMBERS):
        path = folder / f"part-{start // ARCHIVE_MEMBERS:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(start, min(count, start + ARCHIVE_MEMBERS)):
                data = next(cycle)
                info = tarfile.TarInfo(f"bottle/{index:06d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        archives.append(path)
    return archives


def fit_model(data: Path, image_size: int, path: Path) -> Path:
    model = PadimModel("efficientnet_lite0", LAYERS, n_features=100, image_size=image_size)
    train = sorted(data.glob("train/good/*.png"))[:32]
    images = torch.stack([model.transform(p) for p in train])
    model.fit([images[i : i + BATCH_SIZE] for i in range(0, len(images), BATCH_SIZE)])
    scores, maps = model.predict(images)
    # Any threshold will do: the bench times scoring, not decisions; the highest training score keeps it plausible.
    calibration = Calibration("max training score", float(scores.max()), tuple(sorted(scores.tolist())))
    model.calibrate(calibration, map_min=float(maps.min()), map_max=float(maps.max()))
    return model.save(path)


def single_process(model_file: Path, archives: list[Path]) -> float:
    """Images per second: stream the tars, decode, predict in batches, in this process."""
    torch.set_num_threads(os.cpu_count() or 1)
    model = PadimModel.load(model_file, device="cpu")
    model.predict(torch.zeros(2, 3, *model.image_size))  # trace before the clock starts
    count = 0
    started = time.perf_counter()
    batch = []
    for archive in archives:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                batch.append(model.transform(tar.extractfile(member).read(), name=member.name))
                if len(batch) == BATCH_SIZE:
                    model.predict(torch.stack(batch))
                    count += len(batch)
                    batch = []
    if batch:
        model.predict(torch.stack(batch))
        count += len(batch)
    return count / (time.perf_counter() - started)


class TreeMemory:
    """Peak summed RSS and PSS of a process and all its descendants, sampled in a thread.

    RSS is cheap to read and sampled every `interval` seconds. PSS needs the kernel to walk
    every mapping, which is slow for a process that imported torch, so it is sampled every
    `pss_every` samples, keeping the sampler itself from eating a core of the few it measures.
    """

    def __init__(self, pid: int, interval: float = 0.5, pss_every: int = 10) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.pss_every = pss_every
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        for sample in itertools.count():
            if self._stop.is_set():
                return
            try:
                members = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            with_pss = sample % self.pss_every == 0
            rss = pss = 0
            for member in members:
                try:
                    rss += member.memory_info().rss
                    if with_pss:
                        pss += member.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            if with_pss:
                self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(self.interval)


def run_job(archives: list[Path], model_file: Path, actors: int, work: Path, tag: str) -> dict[str, float]:
    """jobs.score as a subprocess: its reported images/s, wall seconds and peak tree memory."""
    output = work / f"scores-{tag}"
    shutil.rmtree(output, ignore_errors=True)
    command = [
        sys.executable, "-m", "jobs.score", "--input", *map(str, archives), "--output", str(output),
        "--model", str(model_file), "--category", "bottle",
        "--set", f"scoring.actors={actors}", "--set", f"scoring.batch_size={BATCH_SIZE}",
        "--set", f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
    ]
    environment = {**os.environ, "RAY_ADDRESS": ""}  # always the embedded Ray, never a cluster
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeMemory(process.pid) as memory:
        log, _ = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"jobs.score failed ({process.returncode}):\n{log[-4000:]}")
    match = re.search(r"scored (\d+) images, (\d+) errors.*\(([\d.]+) images/s; ([\d.]+) images/s after ([\d.]+) s", log)
    shutil.rmtree(output, ignore_errors=True)
    return {
        "images": int(match[1]) + int(match[2]), "images_per_second": float(match[3]),
        "steady_images_per_second": float(match[4]), "startup_seconds": float(match[5]), "wall_seconds": wall,
        "peak_rss_mb": memory.peak_rss / 2**20, "peak_pss_mb": memory.peak_pss / 2**20,
    }


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return path


def decode_ceiling(images: list[bytes], model_file: Path, members: int, work: Path) -> dict[str, float]:
    """Peak tree memory for members just under the size limit against ordinary photos."""
    zeros = bytes(MAX_IMAGE_BYTES - 2**20)
    bomb = write_zip(work / "limit.zip", {f"bottle/{i}.png": zeros for i in range(members)})
    photos = write_zip(work / "photos.zip", {f"bottle/{i}.png": images[i % len(images)] for i in range(200)})
    figures = {"members": members, "member_bytes": len(zeros), "zip_bytes": bomb.stat().st_size}
    for tag, archive in (("photos", photos), ("limit", bomb)):
        result = run_job([archive], model_file, 1, work, tag)
        figures.update({f"{tag}_peak_rss_mb": result["peak_rss_mb"], f"{tag}_peak_pss_mb": result["peak_pss_mb"]})
        print(f"jobs.score on {archive.name}: peak tree RSS {result['peak_rss_mb']:.0f} MB, PSS {result['peak_pss_mb']:.0f} MB",
              flush=True)
    for kind in ("rss", "pss"):
        figures[f"ratio_{kind}"] = figures[f"limit_peak_{kind}_mb"] / figures[f"photos_peak_{kind}_mb"]
        print(f"members just under the limit vs ordinary photos, peak {kind.upper()}: {figures[f'ratio_{kind}']:.2f}x",
              flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="an MVTec AD category folder")
    parser.add_argument("--throughput-images", type=int, default=8000, help="images for the throughput part (0: skip)")
    parser.add_argument("--actors", default="1,2", help="actor pool sizes to time")
    parser.add_argument("--memory-images", default="2000,20000", help="image counts for the memory part ('': skip)")
    parser.add_argument("--limit-members", type=int, default=3, help="members just under the size limit (0: skip)")
    parser.add_argument("--image-size", type=int, default=128, help="the model's input side")
    parser.add_argument("--source-side", type=int, default=0, help="shrink the bottle images to this side first (0: 900 px originals)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-score-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    figures: dict[str, object] = {"cpus": os.cpu_count(), "image_size": args.image_size, "source_side": args.source_side}
    try:
        images = bottle_images(args.data, args.source_side)
        model_file = fit_model(args.data, args.image_size, work / "bottle.safetensors")
        if args.throughput_images > 0:
            archives = write_archives(work / "throughput", images, args.throughput_images)
            single = single_process(model_file, archives)
            print(f"single process PadimModel.predict: {single:.1f} images/s", flush=True)
            figures["single_process_images_per_second"] = single
            for actors in [int(n) for n in args.actors.split(",") if n]:
                result = run_job(archives, model_file, actors, work, f"actors{actors}")
                ratio = result["images_per_second"] / single
                steady = result["steady_images_per_second"] / single
                print(f"jobs.score, {actors} actor(s): {result['images_per_second']:.1f} images/s = {ratio:.2f}x single process; "
                      f"after {result['startup_seconds']:.1f} s of start-up {result['steady_images_per_second']:.1f} images/s = "
                      f"{steady:.2f}x (whole command {result['wall_seconds']:.1f} s)", flush=True)
                figures[f"actors_{actors}"] = {**result, "ratio_to_single_process": ratio, "steady_ratio_to_single_process": steady}
            shutil.rmtree(work / "throughput")
        if args.limit_members > 0:
            figures["decode_ceiling"] = decode_ceiling(images, model_file, args.limit_members, work)
        counts = [int(n) for n in args.memory_images.split(",") if n]
        for count in counts:
            archives = write_archives(work / f"memory-{count}", images, count)
            result = run_job(archives, model_file, 1, work, f"memory{count}")
            shutil.rmtree(work / f"memory-{count}")
            print(f"jobs.score on {count} images: peak tree RSS {result['peak_rss_mb']:.0f} MB, PSS {result['peak_pss_mb']:.0f} MB, "
                  f"{result['images_per_second']:.1f} images/s, {result['wall_seconds']:.0f} s", flush=True)
            figures[f"memory_{count}"] = result
        if len(counts) >= 2:
            low, high = figures[f"memory_{counts[0]}"], figures[f"memory_{counts[-1]}"]
            for kind in ("rss", "pss"):
                ratio = high[f"peak_{kind}_mb"] / low[f"peak_{kind}_mb"]
                figures[f"memory_ratio_{kind}"] = ratio
                print(f"peak memory ({kind.upper()}) {counts[-1]} vs {counts[0]} images: {ratio:.2f}x", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    figures["bench_seconds"] = time.perf_counter() - began
    print(f"bench took {figures['bench_seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
