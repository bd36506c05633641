"""The score table: its columns, and writing its files into a job's staging folder.

Layout of an output folder (hive partitioning, readable as one table by pyarrow, pandas,
DuckDB, Spark and Ray Data):

    OUTPUT/category=<name>/part-<job>-<n>.parquet
    OUTPUT/category=__unknown__/...                  rows whose category could not be told (see `error`)
    OUTPUT/_heatmaps/<name>/<image>-<hash>.png       overlays, when configured

Readers skip names starting with `_` or `.`, so the heatmaps never get in the way of the
table. Files are written to the job's staging folder and published with it as a whole
(`jobs.score.output`). Every row carries the MLflow run of the job that wrote it (`run_id`), so
the rows of several appended jobs can be told apart from the table alone.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
import uuid
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from padim_core.errors import PadimError

UNKNOWN_CATEGORY = "__unknown__"
"""The category of rows that cannot be routed to one. Not null: pyarrow cannot turn a table with
a null partition into a pandas DataFrame ("Cannot yet unify dictionaries with nulls")."""
HEATMAP_FOLDER = "_heatmaps"

SCORE_FIELDS = [
    pa.field("source", pa.string(), nullable=False),
    pa.field("detector", pa.string()),
    pa.field("image_score", pa.float32()),
    pa.field("p_value", pa.float64()),  # conformal p-value against the model's calibration scores
    pa.field("is_anomalous", pa.bool_()),  # score > threshold; for a conformal model, p_value <= its false-alarm rate
    pa.field("threshold", pa.float64()),
    pa.field("model_uri", pa.string()),
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
]
MAP_FIELDS = [
    pa.field("max_y", pa.int32()),  # where the map peaks, in pixels of the original image
    pa.field("max_x", pa.int32()),
    pa.field("anomaly_map", pa.list_(pa.float32())),  # map_size x map_size, row-major; cell = max over its area
]
HEATMAP_FIELD = pa.field("heatmap", pa.string())  # overlay PNG path relative to OUTPUT; null below threshold
ERROR_FIELD = pa.field("error", pa.string())  # null when scored
RUN_ID_FIELD = pa.field("run_id", pa.string(), nullable=False)  # the MLflow run of the job that wrote the row

# Columns that travel with each row from the scoring actors to the writer, but not into the files.
CATEGORY_FIELD = pa.field("category", pa.string(), nullable=False)
INPUT_FIELD = pa.field("input", pa.int32(), nullable=False)  # which --input the row came from (the drift alarm's batches)
HEATMAP_PNG_FIELD = pa.field("heatmap_png", pa.binary())
SKIPPED_FIELD = pa.field("skipped", pa.bool_(), nullable=False)


class OutputError(PadimError):
    """The output folder cannot be written in the chosen mode; says why and what would work."""


def _scored_fields(map_columns: bool, heatmaps: bool) -> list[pa.Field]:
    return [*SCORE_FIELDS, *(MAP_FIELDS if map_columns else []), *([HEATMAP_FIELD] if heatmaps else []), ERROR_FIELD]


def file_schema(map_columns: bool, heatmaps: bool) -> pa.Schema:
    """The columns of every Parquet file; `category` is the partition folder."""
    return pa.schema([*_scored_fields(map_columns, heatmaps), RUN_ID_FIELD])


def row_schema(map_columns: bool, heatmaps: bool) -> pa.Schema:
    """What the scoring actors emit: the scored columns plus category, input, overlay bytes and the skip flag
    (the writer adds `run_id`)."""
    return pa.schema([CATEGORY_FIELD, INPUT_FIELD, *_scored_fields(map_columns, heatmaps), HEATMAP_PNG_FIELD, SKIPPED_FIELD])


def partition_folder(category: str) -> str:
    """`category=<name>` with the name percent-encoded as pyarrow's hive partitioning expects."""
    return f"category={urllib.parse.quote(category, safe='')}"


# ------------------------------------------------------------------------------ writing
class ScoreTableWriter:
    """Append score rows to per-category Parquet files in a staging folder.

    Rows are buffered per category into row groups of `rows_per_group`, and a category's file
    is closed once it holds `rows_per_file` rows (or a buffer more), so memory stays bounded and
    files stay a sensible size however many images a job scores.
    """

    def __init__(
        self, folder: Path, schema: pa.Schema, job_id: str, run_id: str, rows_per_group: int = 8192,
        rows_per_file: int = 1_000_000,
    ) -> None:
        self.folder = Path(folder)
        self.schema = schema
        self.job_id = job_id
        self.run_id = run_id
        self.rows_per_group = rows_per_group
        self.rows_per_file = rows_per_file
        self._buffers: dict[str, list[pa.Table]] = {}
        self._buffered: dict[str, int] = {}
        self._writers: dict[str, tuple[pq.ParquetWriter, int]] = {}
        self._file_counts: dict[str, int] = {}
        self.files: list[Path] = []
        self.heatmaps = 0

    def write(self, rows: pa.Table) -> None:
        """Take rows in `row_schema` (skipped rows already removed)."""
        for category in rows.column("category").unique().to_pylist():
            part = rows.filter(pc.equal(rows["category"], category))
            if "heatmap" in self.schema.names:
                part = self._write_heatmaps(category, part)
            part = part.append_column(RUN_ID_FIELD, pa.array([self.run_id] * part.num_rows, pa.string()))
            part = part.select(self.schema.names).cast(self.schema)
            self._buffers.setdefault(category, []).append(part)
            self._buffered[category] = self._buffered.get(category, 0) + part.num_rows
            if self._buffered[category] >= self.rows_per_group:
                self._flush(category)

    def close(self) -> list[Path]:
        """Flush every buffer and close every file; returns the files written."""
        for category in list(self._buffers):
            self._flush(category)
        for writer, _ in self._writers.values():
            writer.close()
        self._writers.clear()
        return self.files

    def _write_heatmaps(self, category: str, rows: pa.Table) -> pa.Table:
        from padim_core.viz import (
            save_png,  # matplotlib: only the driver needs it, not every Ray worker
        )

        pngs = rows.column("heatmap_png").to_pylist()
        sources = rows.column("source").to_pylist()
        paths = []
        for source, png in zip(sources, pngs):
            if png is None:
                paths.append(None)
                continue
            relative = PurePosixPath(HEATMAP_FOLDER, urllib.parse.quote(category, safe=""), heatmap_name(source))
            save_png(self.folder / relative, png)
            self.heatmaps += 1
            paths.append(str(relative))
        index = rows.schema.get_field_index("heatmap")
        return rows.set_column(index, HEATMAP_FIELD, pa.array(paths, pa.string()))

    def _flush(self, category: str) -> None:
        parts = self._buffers.pop(category, [])
        self._buffered.pop(category, None)
        if not parts:
            return
        table = pa.concat_tables(parts)
        writer, rows = self._writers.get(category, (None, 0))
        if writer is None:
            count = self._file_counts.get(category, 0)
            self._file_counts[category] = count + 1
            path = self.folder / partition_folder(category) / f"part-{self.job_id}-{count:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = pq.ParquetWriter(path, self.schema)
            self.files.append(path)
        writer.write_table(table, row_group_size=self.rows_per_group)
        rows += table.num_rows
        if rows >= self.rows_per_file:
            writer.close()
            self._writers.pop(category, None)
        else:
            self._writers[category] = (writer, rows)


def heatmap_name(source: str) -> str:
    """A file name for an image's overlay: its stem (made safe) plus a hash of the full source,
    so `a/000.png` and `b/000.png` do not collide."""
    stem = PurePosixPath(source.replace("::", "/")).stem
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80] or "image"
    digest = hashlib.sha1(source.encode("utf-8")).hexdigest()[:10]
    return f"{safe}-{digest}.png"


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]
