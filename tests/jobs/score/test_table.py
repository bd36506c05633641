"""jobs.score.table: the score table's columns and partitioned writing (every row carries its job's run id)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.score import table as score_table
from jobs.score.table import ScoreTableWriter, file_schema, row_schema

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 8


def rows(categories: list[str], map_columns: bool = False, heatmaps: bool = False, png: bytes | None = None) -> pa.Table:
    """Score rows as the actors emit them: row i has score i and is anomalous when odd."""
    schema = row_schema(map_columns, heatmaps)
    count = len(categories)
    values = {name: [None] * count for name in schema.names}
    values.update(
        category=categories, source=[f"/in/{c}/{i}.png" for i, c in enumerate(categories)],
        image_score=[float(i) for i in range(count)], is_anomalous=[i % 2 == 1 for i in range(count)],
        p_value=[1 / (i + 1) for i in range(count)], input=[0] * count, threshold=[0.5] * count, model_uri=["m"] * count, height=[900] * count, width=[900] * count, skipped=[False] * count,
        detector=["padim"] * count,
    )
    if map_columns:
        values.update(max_y=[1] * count, max_x=[2] * count, anomaly_map=[[0.0, float(i)] for i in range(count)])
    if heatmaps:
        values["heatmap_png"] = [png if i % 2 else None for i in range(count)]
    return pa.table(values, schema=schema)


def test_files_hold_the_contract_columns_and_category_is_the_partition(tmp_path: Path) -> None:
    writer = ScoreTableWriter(tmp_path, file_schema(False, False), "job1", "run1")
    writer.write(rows(["bottle", "cable", "bottle", score_table.UNKNOWN_CATEGORY]))
    files = writer.close()
    assert sorted(path.relative_to(tmp_path).parent.name for path in files) == [
        "category=__unknown__", "category=bottle", "category=cable",
    ]
    assert pq.read_schema(files[0]).names == [
        "source", "detector", "image_score", "p_value", "is_anomalous", "threshold", "model_uri", "height", "width", "error",
        "run_id",
    ]
    table = pq.read_table(tmp_path).to_pandas()
    assert len(table) == 4 and (table["category"] == "__unknown__").sum() == 1 and set(table["detector"]) == {"padim"}
    assert set(table["run_id"]) == {"run1"}
    assert table.sort_values("image_score")["category"].tolist()[:3] == ["bottle", "cable", "bottle"]
    assert pq.read_schema(files[0]).field("image_score").type == pa.float32()
    assert pq.read_schema(files[0]).field("p_value").type == pa.float64()


def test_rows_are_grouped_into_row_groups_and_files_roll_over(tmp_path: Path) -> None:
    writer = ScoreTableWriter(tmp_path, file_schema(False, False), "job1", "run1", rows_per_group=4, rows_per_file=8)
    for _ in range(5):
        writer.write(rows(["bottle"] * 3))
    files = writer.close()
    # buffers of 6 rows (two writes) are flushed as row groups of 4 and 2; a file closes at >= 8 rows
    assert [pq.ParquetFile(path).metadata.num_rows for path in files] == [12, 3]
    assert [group.num_rows for group in [pq.ParquetFile(files[0]).metadata.row_group(i) for i in range(4)]] == [4, 2, 4, 2]
    assert pq.read_table(tmp_path).num_rows == 15


def test_map_columns_and_heatmaps_beside_the_table(tmp_path: Path) -> None:
    writer = ScoreTableWriter(tmp_path, file_schema(True, True), "job1", "run1")
    writer.write(rows(["bottle", "bottle", "my cable"], map_columns=True, heatmaps=True, png=PNG))
    writer.close()
    table = pq.read_table(tmp_path).to_pandas().sort_values("image_score")
    assert table["anomaly_map"].map(list).tolist() == [[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]]
    assert table["heatmap"].isna().tolist() == [True, False, True]
    assert (tmp_path / table["heatmap"].iloc[1]).read_bytes() == PNG
    assert table["heatmap"].iloc[1].startswith("_heatmaps/bottle/1-")
    assert (tmp_path / "category=my%20cable").is_dir() and table["category"].iloc[2] == "my cable"


def test_heatmap_names_do_not_collide_for_equal_file_names() -> None:
    first, second = score_table.heatmap_name("/a/000.png"), score_table.heatmap_name("/b/000.png")
    assert first != second and first.startswith("000-") and first.endswith(".png")
    assert score_table.heatmap_name("x.tar::bottle/a b?.png").startswith("a_b_-")
