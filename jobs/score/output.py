"""The score table's folder: checked, locked and staged before any work; published as a whole.

Protocol, for one output folder OUTPUT:
- `.OUTPUT.lock` (beside it) is held with an exclusive `flock` from the job's start to its end,
  so two jobs never write one output: the second is refused at once, naming the first. The
  kernel drops the lock when its process dies, however it dies. The file stays (tiny) and says
  whose it was.
- the job's rows go to `.OUTPUT.staging-<job>/`, which also holds `job.json` (who, since when,
  which MLflow run). Creating it before Ray starts proves the folder is writable and has room.
- publishing swaps the staging folder into place: a rename when there is no table yet; an
  atomic exchange for `overwrite`, and for `append` after hard-linking the existing files into
  the staging folder (see `padim_core.safe_write.replace_folder`): readers see the old table or
  the new one, never a mix or nothing.
- a job that holds the lock removes staging folders left by dead jobs (older than its own start)
  and reports their MLflow runs, so the caller can mark them KILLED.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.score.table import OutputError
from padim_core.safe_write import STAGING_MARK, replace_folder

MODES = ("error", "overwrite", "append")
JOB_FILE = "job.json"


@dataclass
class OutputFolder:
    """One job's claim on an output folder (see the module docstring)."""

    path: Path
    mode: str
    job_id: str
    started: float = field(default_factory=time.time)
    staging: Path | None = None
    stale: list[dict[str, Any]] = field(default_factory=list)  # job.json of dead jobs' staging folders
    _lock: Any = None

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(f".{self.path.name}.lock")

    def check(self, schema: pa.Schema) -> OutputFolder:
        """Refuse an output that this mode cannot write (`OutputError`); cheap, takes nothing."""
        try:
            self._check(schema)
        except OSError as error:
            raise OutputError(f"output {self.path}: cannot prepare it ({error.strerror or error})") from None
        return self

    def claim(self, schema: pa.Schema) -> OutputFolder:
        """Check the output for this mode, take its lock, clean after dead jobs, create the staging
        folder. Raises `OutputError` (and holds nothing) when any of it cannot be done."""
        try:
            self._check(schema)
            self._take_lock()
            self._clean_stale()
            self.staging = self.path.with_name(f".{self.path.name}{STAGING_MARK}{self.job_id}")
            self.staging.mkdir()
            self.record()
        except OSError as error:
            self.release()
            raise OutputError(f"output {self.path}: cannot prepare it ({error.strerror or error})") from None
        except BaseException:
            self.release()
            raise
        return self

    def record(self, **values: Any) -> None:
        """Write (or update) `job.json` in the staging folder: who writes it, and its MLflow run."""
        info = {"job_id": self.job_id, "pid": os.getpid(), "host": socket.gethostname(), "started": self.started, **values}
        previous = self.staging / JOB_FILE
        if previous.exists():
            info = {**json.loads(previous.read_text()), **values}
        previous.write_text(json.dumps(info))

    def publish(self) -> None:
        """Swap the finished table into place (the lock is still held)."""
        (self.staging / JOB_FILE).unlink(missing_ok=True)
        if self.mode == "error" and self.path.exists():
            raise OutputError(f"output {self.path} appeared while the job ran; the scores are left in {self.staging}")
        if self.mode == "append" and self.path.exists():
            _link_existing(self.path, self.staging)
        replace_folder(self.staging, self.path)
        self.staging = None

    def release(self) -> None:
        """Remove the staging folder (if not published) and drop the lock."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the flock
            self._lock = None

    # ---------------------------------------------------------------------------- internals
    def _check(self, schema: pa.Schema) -> None:
        if self.mode not in MODES:
            raise OutputError(f"--mode {self.mode!r} is not allowed; allowed: {list(MODES)}")
        parent = self.path.parent
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"output {self.path}: {parent} is a file, not a folder")
        parent.mkdir(parents=True, exist_ok=True)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"output {self.path}: its folder {parent} is not writable")
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"output {self.path} is a file, not a folder")
        if self.mode == "error" and self.path.exists():
            raise OutputError(
                f"output {self.path} already exists; choose another folder, or pass --mode overwrite to replace it "
                "or --mode append to add to it"
            )
        if self.mode == "append" and self.path.exists():
            existing = next(self.path.glob("category=*/*.parquet"), None)
            if existing is not None and not pq.read_schema(existing).equals(schema):
                raise OutputError(
                    f"cannot append to {self.path}: its files have columns {pq.read_schema(existing).names}, this job "
                    f"writes {schema.names} (scoring.map_columns and scoring.heatmaps_above_threshold must match the "
                    "earlier job's, and tables from before run_id existed cannot be appended to); use --mode overwrite "
                    "or another output folder"
                )

    def _take_lock(self) -> None:
        lock = open(self.lock_path, "a+")  # noqa: SIM115 (held open, and so locked, until the job ends)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "another job"
            lock.close()
            raise OutputError(
                f"output {self.path} is being written by another padim-score job ({owner}); wait for it to "
                "finish or choose another output"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}, job {self.job_id}, since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}")
        lock.flush()
        self._lock = lock

    def _clean_stale(self) -> None:
        """Holding the lock, every other staging or half-replaced folder of this output is a dead job's."""
        for leftover in self.path.parent.glob(f".{self.path.name}{STAGING_MARK}*"):
            info = _job_info(leftover)
            if info.get("started", 0) < self.started:
                self.stale.append({"folder": str(leftover), **info})
                shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.path.parent.glob(f".{self.path.name}.old-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _job_info(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / JOB_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _link_existing(table: Path, staging: Path) -> None:
    """Hard-link every file of the existing table into the staging folder (names are unique per
    job), so the staging folder holds the whole appended table before the swap."""
    for path in sorted(table.rglob("*")):
        if path.is_file():
            target = staging / path.relative_to(table)
            if target.exists():
                raise OutputError(f"cannot append {path.name}: {target} was written by this job too")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
