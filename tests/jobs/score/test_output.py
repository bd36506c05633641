"""jobs.score.output: an output folder is checked, locked and staged before any work, published as a
whole in each --mode, and cleaned after jobs that died."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.score.output import OutputFolder
from jobs.score.table import OutputError, ScoreTableWriter, file_schema, row_schema
from padim_core.errors import PadimError

SCHEMA = file_schema(False, False)


def write_rows(folder: Path, job: str, categories: list[str]) -> None:
    schema = row_schema(False, False)
    count = len(categories)
    values = {name: [None] * count for name in schema.names}
    values.update(category=categories, source=[f"/in/{job}/{i}.png" for i in range(count)], skipped=[False] * count)
    writer = ScoreTableWriter(folder, SCHEMA, job, f"run-{job}")
    writer.write(pa.table(values, schema=schema))
    writer.close()


def run_job(output: Path, mode: str, job: str, categories: list[str]) -> None:
    folder = OutputFolder(output, mode, job).claim(SCHEMA)
    try:
        write_rows(folder.staging, job, categories)
        folder.publish()
    finally:
        folder.release()


def test_claim_refuses_what_a_mode_cannot_write(tmp_path: Path) -> None:
    output = tmp_path / "scores"
    run_job(output, "error", "a", ["bottle"])
    with pytest.raises(OutputError, match="--mode overwrite"):
        OutputFolder(output, "error", "b").claim(SCHEMA)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        OutputFolder(tmp_path / "file", "overwrite", "b").claim(SCHEMA)
    with pytest.raises(OutputError, match="cannot prepare it"):  # a file where a parent folder should be
        OutputFolder(tmp_path / "file" / "sub" / "scores", "error", "b").claim(SCHEMA)
    with pytest.raises(OutputError, match=r"--mode 'merge' is not allowed; allowed: \['error', 'overwrite', 'append'\]"):
        OutputFolder(tmp_path / "new", "merge", "b").claim(SCHEMA)
    with pytest.raises(OutputError, match="map_columns"):
        OutputFolder(output, "append", "b").claim(file_schema(True, False))
    assert issubclass(OutputError, PadimError)
    assert sorted(os.listdir(tmp_path)) == [".scores.lock", "file", "scores"]  # refused claims leave nothing


def test_an_output_where_nothing_can_be_written_is_refused_before_any_work() -> None:
    with pytest.raises(OutputError, match=r"output /proc/padim-scores: (cannot prepare it|its folder /proc is not writable)"):
        OutputFolder(Path("/proc/padim-scores"), "error", "a").claim(SCHEMA)


def test_the_staging_folder_says_whose_it_is_and_publishing_moves_it_into_place(tmp_path: Path) -> None:
    output = tmp_path / "deep" / "scores"
    folder = OutputFolder(output, "error", "job1").claim(SCHEMA)
    assert folder.staging.parent == output.parent and folder.staging.name == ".scores.staging-job1"
    folder.record(run_id="r1", tracking_uri="sqlite:///x.db")
    info = json.loads((folder.staging / "job.json").read_text())
    assert info["pid"] == os.getpid() and info["run_id"] == "r1" and info["job_id"] == "job1"
    write_rows(folder.staging, "job1", ["bottle"])
    folder.publish()
    folder.release()
    assert pq.read_table(output).num_rows == 1 and not (output / "job.json").exists()
    assert sorted(os.listdir(output.parent)) == [".scores.lock", "scores"]


def test_overwrite_swaps_and_append_adds_without_the_table_ever_missing(tmp_path: Path) -> None:
    output = tmp_path / "scores"
    run_job(output, "error", "old", ["bottle", "bottle"])
    first_file = next(output.rglob("*.parquet"))
    inode = first_file.stat().st_ino
    run_job(output, "append", "new", ["cable"])
    table = pq.read_table(output).to_pandas()
    assert sorted(table["category"]) == ["bottle", "bottle", "cable"]
    assert sorted(set(table["run_id"])) == ["run-new", "run-old"]  # appended jobs are told apart
    assert first_file.stat().st_ino == inode  # the earlier files were linked, not copied
    run_job(output, "overwrite", "newer", ["grid"])
    assert pq.read_table(output).to_pandas()["category"].tolist() == ["grid"]
    assert sorted(os.listdir(tmp_path)) == [".scores.lock", "scores"]  # no staging or replaced folder left


def test_a_second_job_on_the_same_output_is_refused_while_the_first_holds_it(tmp_path: Path) -> None:
    output = tmp_path / "scores"
    first = OutputFolder(output, "overwrite", "first").claim(SCHEMA)
    try:
        # another process (flock is per open file: a second process is what a second job is)
        code = (
            "import sys; from pathlib import Path; from jobs.score.output import OutputFolder; "
            "from jobs.score.table import OutputError, file_schema\n"
            "try:\n    OutputFolder(Path(sys.argv[1]), 'overwrite', 'second').claim(file_schema(False, False))\n"
            "except OutputError as error:\n    print(error); sys.exit(3)\n"
        )
        second = subprocess.run([sys.executable, "-c", code, str(output)], capture_output=True, text=True, timeout=120,
                                check=False)
        assert second.returncode == 3, second.stderr
        assert "is being written by another padim-score job" in second.stdout and "job first" in second.stdout
        assert f"pid {os.getpid()}" in second.stdout
    finally:
        first.release()
    run_job(output, "overwrite", "third", ["bottle"])  # released: the next job may write


def test_a_later_job_removes_what_a_dead_job_left(tmp_path: Path) -> None:
    output = tmp_path / "scores"
    dead = tmp_path / ".scores.staging-dead1"
    dead.mkdir()
    (dead / "job.json").write_text(json.dumps({"job_id": "dead1", "pid": 1, "host": "h", "started": time.time() - 60,
                                               "run_id": "r0", "tracking_uri": "sqlite:///x.db"}))
    (tmp_path / ".scores.old-abc").mkdir()
    folder = OutputFolder(output, "error", "job2").claim(SCHEMA)
    try:
        assert [info["job_id"] for info in folder.stale] == ["dead1"] and folder.stale[0]["run_id"] == "r0"
        assert not dead.exists() and not (tmp_path / ".scores.old-abc").exists()
    finally:
        folder.release()
    assert sorted(os.listdir(tmp_path)) == [".scores.lock"]
