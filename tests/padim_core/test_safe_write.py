"""Writing a file or a folder so that a reader sees the old one or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from padim_core import safe_write
from padim_core.safe_write import StagedFolder, replace_folder, write_file


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def test_write_file_takes_bytes_text_or_a_writer(tmp_path: Path) -> None:
    assert write_file(tmp_path / "a" / "b.bin", b"\x00\x01") == tmp_path / "a" / "b.bin"
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    write_file(tmp_path / "text.txt", "grüße\n")
    assert (tmp_path / "text.txt").read_text(encoding="utf-8") == "grüße\n"
    write_file(tmp_path / "made.txt", lambda path: path.write_text("by a writer"))
    assert (tmp_path / "made.txt").read_text() == "by a writer"
    write_file(tmp_path / "text.txt", b"replaced")
    assert (tmp_path / "text.txt").read_bytes() == b"replaced"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a", "made.txt", "text.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def half_then_fail(path: Path) -> None:
        path.write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_file(target, half_then_fail)
    with pytest.raises(TypeError):
        write_file(target, 12345)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path: Path, mask: int, mode: int) -> None:
    with umask(mask):
        assert safe_write.current_umask() == mask
        path = write_file(tmp_path / "shared.bin", b"x")
        plain = tmp_path / "plain.bin"
        plain.write_bytes(b"x")  # what a plain open() gives, for comparison
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == mode


def test_staged_folder_replaces_the_folder_as_a_whole(tmp_path: Path) -> None:
    target = tmp_path / "report"
    target.mkdir()
    (target / "old.md").write_text("old")
    with StagedFolder(target) as staged:
        assert staged.path.parent == tmp_path and staged.path.name.startswith(f".report{safe_write.STAGING_MARK}")
        assert (target / "old.md").exists()  # readers still see the old folder while the new one is built
        (staged.path / "new.md").write_text("new")
        (staged.path / "plots").mkdir()
    assert sorted(path.name for path in target.iterdir()) == ["new.md", "plots"]
    assert [path.name for path in tmp_path.iterdir()] == ["report"]  # neither staging nor retired folder left


def test_a_failure_inside_the_block_leaves_the_old_folder_and_no_staging(tmp_path: Path) -> None:
    target = tmp_path / "report"
    target.mkdir()
    (target / "old.md").write_text("old")
    with pytest.raises(RuntimeError, match="plot failed"), StagedFolder(target) as staged:
        (staged.path / "new.md").write_text("new")
        raise RuntimeError("plot failed")
    assert [path.name for path in target.iterdir()] == ["old.md"] and (target / "old.md").read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["report"]


def test_staged_folder_creates_a_new_folder_with_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "new"
    with umask(0o027), StagedFolder(target) as staged:
        (staged.path / "a.txt").write_text("a")
    assert (target / "a.txt").read_text() == "a"
    assert target.stat().st_mode & 0o777 == 0o750


def test_replace_folder_puts_the_old_folder_back_when_the_new_one_cannot_move(tmp_path: Path) -> None:
    target = tmp_path / "table"
    target.mkdir()
    (target / "old.parquet").write_text("old")
    with pytest.raises(FileNotFoundError):
        replace_folder(tmp_path / "missing-staging", target)
    assert [path.name for path in target.iterdir()] == ["old.parquet"]
    assert [path.name for path in tmp_path.iterdir()] == ["table"]
    source = tmp_path / "fresh"
    source.mkdir()
    (source / "new.parquet").write_text("new")
    replace_folder(source, target)
    assert [path.name for path in target.iterdir()] == ["new.parquet"] and not source.exists()
