"""Exact nearest-neighbour search for PatchCore on the CPU: `padim_core.nearest` against faiss.

    python -m bench.bench_nearest [--bank-rows 2140,21403] [--queries 84992] [--repeats 3]

The shapes of bottle at 256 px with efficientnet_lite0 `blocks.2` + `blocks.4`: 152 channels,
banks of 1% and 10% of the 209 training images' patches, and the 83 test images' 32x32 patches
as queries. Search cost does not depend on the values, so they are seeded Gaussian noise. Each
repeat times both searches one after the other (torch's chunked matrix products, then faiss's
exact `IndexFlatL2`, k = 1, both on `torch.get_num_threads()` threads) and the median is
reported, so a load shared with other jobs weighs on both alike. faiss is not a dependency:
install `faiss-cpu` to run this.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from padim_core.nearest import nearest

CHANNELS = 152


def seconds(search: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    search(*args)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank-rows", default="2140,21403", help="comma-separated bank sizes")
    parser.add_argument("--queries", type=int, default=83 * 32 * 32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        import faiss
    except ImportError:
        print("faiss is not installed: pip install faiss-cpu", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(args.queries, CHANNELS, generator=generator)
    print(f"{args.queries} queries x {CHANNELS} channels, k = 1, {threads} threads, faiss {faiss.__version__}, "
          f"torch {torch.__version__}, median of {args.repeats}", flush=True)
    for rows in (int(n) for n in args.bank_rows.split(",")):
        bank = torch.randn(rows, CHANNELS, generator=generator)
        index = faiss.IndexFlatL2(CHANNELS)
        index.add(bank.numpy())
        ours_distances, ours_indices = nearest(queries, bank)
        faiss_squared, faiss_indices = index.search(queries.numpy(), 1)
        agree = float((ours_indices.numpy() == faiss_indices).mean())
        gap = float(np.abs(ours_distances.numpy() - np.sqrt(faiss_squared)).max())
        timings: dict[str, list[float]] = {"torch": [], "faiss": []}
        for _ in range(args.repeats):
            timings["torch"].append(seconds(nearest, queries, bank))
            timings["faiss"].append(seconds(index.search, queries.numpy(), 1))
        ours, theirs = statistics.median(timings["torch"]), statistics.median(timings["faiss"])
        print(f"bank {rows:6d} rows  torch {ours:6.2f} s  faiss IndexFlatL2 {theirs:6.2f} s  faiss / torch {theirs / ours:.2f}x"
              f"  (same nearest row for {agree:.2%} of queries, distances within {gap:.1e})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
