"""The Ray Data pipeline of jobs.score: units -> image bytes -> pixels -> score rows.

    from_items(units)                       one row per image file, archive or Parquet row group
      .flat_map(read_rows)                  tasks: stream the images out of each unit, pick the category
      .map_batches(decode_batch)            tasks: decode and resize, in parallel, to uint8 at model size
      .map_batches(ScoreActor, compute=ActorPoolStrategy(size=actors))
                                            actors: each loads a category's model once, then scores

Everything streams: the blocks in flight between the stages are capped (`MIN_IN_FLIGHT_BYTES`),
so memory does not grow with the number of images, and nothing here collects the dataset. An
image that cannot be read or decoded travels on as a row with `error` set and skips the model.

Decoded images travel as uint8 (a byte per value through the object store, not float32's
four) and each actor scores them with `padim_core.scoring.score_batch`, the one path every
caller takes, so scores equal what the model gives in one process.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from PIL import Image

from jobs.common import ray_runtime
from jobs.score.decoding import decode_batch
from jobs.score.reading import CategoryRouter, read_rows
from jobs.score.sources import Input
from jobs.score.table import row_schema
from padim_core.errors import ConfigError
from padim_core.images import ImageTransform

READ_CPUS = 0.1
"""Per read task. Reading waits on the disk or network and on the decoders downstream, and one
archive is one task for as long as it streams: a whole CPU per read task would keep the
scoring actors from starting on a small node until whole archives had been read, so the first
scores would wait for them. How many read at once is `PoolPlan.readers`; a reader's process
imports no torch (see `jobs.score.reading`)."""

DECODE_CPUS = 0
"""Per decode task: none. Ray Data shares the CPUs it may use between its stages in fixed parts,
which on a small node leaves room for one decode task beside an actor, although decoding a
large photo takes more CPU time than scoring it, so the actor would wait on that one decoder.
The number of decode tasks is capped by `PoolPlan.decoders` instead, and Ray Data spreads them
over the nodes (its default scheduling strategy)."""

DECODE_MEMORY = 1024**3
"""Per decode task. Keeps Ray from starting more decodes of large images than a node can hold
(a 100-megapixel image needs several hundred MB while it is resized). It also keeps Ray Data
from fusing decoding into the scoring actors, which it does for a task stage followed by an
actor stage with identical resource requests."""

BLOCK_BYTES = 16 * 1024**2
"""Target size of a block: about 30 encoded 900 x 900 photos (see `build_dataset`). Decoding takes
one block at a time, so what a decode task holds is bounded by bytes, whatever the images' count:
a block, or one image up to `sources.MAX_IMAGE_BYTES` when a single image is larger."""

IN_FLIGHT_BYTES_PER_CPU = 64 * 1024**2
MIN_IN_FLIGHT_BYTES = 512 * 1024**2
"""Object-store memory the pipeline may fill with blocks between its stages. Reading is far
faster than scoring, so without a cap Ray Data reads ahead until its default budget (a share of
the whole object store) is full, and the footprint grows with the input up to that point."""


# ------------------------------------------------------------------------------ scoring
@dataclass(frozen=True)
class ModelHandle:
    """What an actor needs to score a category: the model file's bytes in the object store."""

    uri: str
    detector: str
    threshold: float | None
    data: ray.ObjectRef


@dataclass(frozen=True)
class RowOptions:
    """The optional columns (config `scoring`)."""

    map_size: int | None = None  # None: no max_y, max_x, anomaly_map
    heatmaps: bool = False  # overlay PNG bytes for rows above the threshold


class ScoreActor:
    """map_batches (actor pool): score decoded images, loading each category's model on first use."""

    def __init__(self, models: Mapping[str, ModelHandle], device: str, threads: int, options: RowOptions) -> None:
        import torch

        torch.set_num_threads(threads)
        self.handles = dict(models)
        self.device = device
        self.options = options
        self.schema = row_schema(options.map_size is not None, options.heatmaps)
        self._models: dict[str, Any] = {}

    def _model(self, category: str) -> Any:
        if category not in self._models:
            from padim_core.detector import load_detector

            # The file's bytes came through Ray's object store, so any node can score.
            self._models[category] = load_detector(ray.get(self.handles[category].data), device=self.device)
        return self._models[category]

    def __call__(self, batch: pa.Table) -> pa.Table:
        count = batch.num_rows
        rows: dict[str, list[Any]] = {name: [None] * count for name in self.schema.names}
        for name in ("source", "category", "input", "height", "width", "error", "skipped"):
            rows[name] = batch.column(name).to_pylist()
        pixels = batch.column("pixels").to_pylist()
        groups: dict[str, list[int]] = defaultdict(list)
        for index, category in enumerate(rows["category"]):
            handle = self.handles.get(category)
            if handle is None:
                continue
            rows["model_uri"][index] = handle.uri
            rows["detector"][index] = handle.detector
            rows["threshold"][index] = handle.threshold
            if pixels[index] is not None:
                groups[category].append(index)
        for category, indices in groups.items():
            self._score(self._model(category), indices, pixels, rows)
        return pa.table(rows, schema=self.schema)

    def _score(self, model: Any, indices: list[int], pixels: list[bytes | None], rows: dict[str, list[Any]]) -> None:
        import torch
        import torch.nn.functional as F

        from padim_core.scoring import score_batch

        height, width = model.image_size
        arrays = [np.frombuffer(pixels[i], dtype=np.uint8).reshape(height, width, 3) for i in indices]
        batch = score_batch(model, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
        maps = batch.maps
        flagged = batch.is_anomalous if batch.is_anomalous is not None else [None] * len(indices)
        p_values = batch.p_values if batch.p_values is not None else [None] * len(indices)
        for position, index in enumerate(indices):
            rows["image_score"][index] = float(batch.scores[position])
            rows["p_value"][index] = None if p_values[position] is None else float(p_values[position])
            rows["is_anomalous"][index] = None if flagged[position] is None else bool(flagged[position])
        if self.options.map_size is not None:
            peaks = maps.flatten(1).argmax(1).numpy()
            pooled = F.adaptive_max_pool2d(maps[:, None], self.options.map_size)[:, 0].flatten(1).numpy()
            for position, index in enumerate(indices):
                y, x = divmod(int(peaks[position]), width)
                # the peak's cell centre, scaled from the model's input to the original image
                rows["max_y"][index] = min(rows["height"][index] - 1, int((y + 0.5) * rows["height"][index] / height))
                rows["max_x"][index] = min(rows["width"][index] - 1, int((x + 0.5) * rows["width"][index] / width))
                rows["anomaly_map"][index] = pooled[position].tolist()
        if self.options.heatmaps and batch.is_anomalous is not None:
            from padim_core.viz import heatmap_overlay

            low, high = model.score_stats_.get("map_min"), model.score_stats_.get("map_max")
            for position, index in enumerate(indices):
                if flagged[position]:
                    overlay = heatmap_overlay(arrays[position], maps[position].numpy(), vmin=low, vmax=high)
                    buffer = io.BytesIO()
                    Image.fromarray(overlay).save(buffer, format="PNG")
                    rows["heatmap_png"][index] = buffer.getvalue()


# ------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class PoolPlan:
    """The actor pool: how many actors, what each reserves, and where torch runs."""

    actors: int
    cpus: float
    gpus: float
    device: str
    threads: int
    batch_size: int
    decoders: int
    readers: int

    def describe(self) -> str:
        return (f"{self.actors} scoring actors x ({self.cpus:g} CPU, {self.gpus:g} GPU, {self.threads} torch threads, "
                f"device {self.device}), up to {self.decoders} decode and {self.readers} read tasks, "
                f"batches of {self.batch_size}")


def plan_pool(actors: int, batch_size: int, num_gpus: str | float, cluster: Mapping[str, float], node_cpus: float) -> PoolPlan:
    """Size the actors and the decode tasks from the config and the cluster.

    On GPUs each actor takes `num_gpus` and one CPU. On CPUs the actors together take half the
    cluster's CPUs (less a read task's share), and torch in each actor gets one thread per whole
    CPU of its half: more would only spin against the decoders. Either way up to one decode task
    per CPU runs beside them (see `DECODE_CPUS`), fed by one read task per 8 CPUs: reading an
    image costs a small fraction of decoding it.
    """
    gpus = ray_runtime.resolve_num_gpus(num_gpus, float(cluster.get("GPU", 0)), "scoring.num_gpus")
    decoders = max(1, int(cluster.get("CPU", 1)))
    readers = max(1, decoders // 8)
    if gpus > 0:
        needed = actors * gpus
        if needed > cluster.get("GPU", 0):
            raise ConfigError(
                f"scoring.actors={actors} with {gpus:g} GPU each needs {needed:g} GPUs; the Ray cluster has "
                f"{cluster.get('GPU', 0):g}; lower scoring.actors or scoring.num_gpus"
            )
        return PoolPlan(actors, 1.0, gpus, "cuda", 1, batch_size, decoders, readers)
    share = min(float(cluster.get("CPU", 1)) / (2 * actors), node_cpus / 2)
    threads = ray_runtime.torch_threads(share)
    return PoolPlan(actors, share - READ_CPUS / actors, 0.0, "cpu", threads, batch_size, decoders, readers)


def build_dataset(
    units: list[dict[str, Any]],
    inputs: Sequence[Input],
    router: CategoryRouter,
    transforms: Mapping[str, ImageTransform],
    models: Mapping[str, ModelHandle],
    plan: PoolPlan,
    options: RowOptions,
) -> ray.data.Dataset:
    """The lazy dataset of score rows (in `score_table.row_schema`); iterating it runs the job."""
    from ray.data import (
        ActorPoolStrategy,
        DataContext,
        ExecutionResources,
        TaskPoolStrategy,
    )

    # The dataset keeps the context it was built under. Ray's default block size (128 MiB)
    # would put hundreds of encoded images in one block, and one block is one decode task:
    # smaller blocks keep every CPU decoding and the memory in flight small.
    context = DataContext.get_current().copy()
    context.target_max_block_size = BLOCK_BYTES
    context.enable_progress_bars = False  # the driver prints its own progress
    cpus = float(ray.cluster_resources().get("CPU", 1))
    context.execution_options.resource_limits = ExecutionResources(
        object_store_memory=max(MIN_IN_FLIGHT_BYTES, int(IN_FLIGHT_BYTES_PER_CPU * cpus))
    )
    with DataContext.current(context):
        return (
            ray.data.from_items(units)
            .flat_map(
                read_rows, fn_kwargs={"inputs": list(inputs), "router": router},
                compute=TaskPoolStrategy(size=plan.readers), num_cpus=READ_CPUS,
            )
            .map_batches(
                decode_batch, batch_size=None, batch_format="pyarrow",
                fn_kwargs={"transforms": dict(transforms)}, compute=TaskPoolStrategy(size=plan.decoders),
                num_cpus=DECODE_CPUS, memory=DECODE_MEMORY,
            )
            .map_batches(
                ScoreActor, batch_size=plan.batch_size, batch_format="pyarrow",
                compute=ActorPoolStrategy(size=plan.actors), num_cpus=plan.cpus, num_gpus=plan.gpus or None,
                fn_constructor_kwargs={"models": dict(models), "device": plan.device, "threads": plan.threads, "options": options},
            )
        )
