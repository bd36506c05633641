"""jobs.score.sources: finding inputs (folders, globs, archives, Parquet, pyarrow URIs) and streaming
their images, with the odd cases: skipped non-images, corrupt and truncated archives, oversized
members, ambiguous Parquet columns."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.score import sources
from jobs.score.sources import SourceError, discover, member_name, read_unit
from padim_core.errors import PadimError

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 40  # bytes only: these tests never decode


def write(path: Path, data: bytes = PNG) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def records(discovery) -> list:
    return [record for unit in discovery.units for record in read_unit(unit, discovery.inputs)]


def tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_folders_are_walked_recursively_and_non_images_skipped(tmp_path: Path) -> None:
    write(tmp_path / "in" / "bottle" / "good" / "000.png")
    write(tmp_path / "in" / "bottle" / "b.JPG")
    write(tmp_path / "in" / "bottle" / "notes.txt", b"x")
    write(tmp_path / "in" / "bottle" / "nested.tar", tar_bytes({"a.png": PNG}))  # only read when named as an input
    discovery = discover([str(tmp_path / "in")])
    assert [unit["relative"] for unit in discovery.units] == ["bottle/b.JPG", "bottle/good/000.png"]
    assert discovery.skipped == 2 and discovery.skipped_examples[0].endswith("nested.tar")
    found = records(discovery)
    assert [record.source for record in found] == [str(tmp_path / "in" / "bottle" / "b.JPG"), str(tmp_path / "in/bottle/good/000.png")]
    assert all(record.data == PNG and record.error is None for record in found)


def test_globs_match_per_folder_level_and_double_star_spans_levels(tmp_path: Path) -> None:
    for name in ("bottle/test/a.png", "bottle/test/deep/b.png", "cable/test/c.png", "cable/train/d.png"):
        write(tmp_path / name)
    one_level = discover([str(tmp_path / "*" / "test" / "*.png")])
    assert [unit["relative"] for unit in one_level.units] == ["bottle/test/a.png", "cable/test/c.png"]
    any_level = discover([str(tmp_path / "**" / "*.png")])
    assert len(any_level.units) == 4
    assert discover([str(tmp_path / "bottle" / "test" / "**")]).units[1]["relative"] == "deep/b.png"


def test_missing_inputs_and_empty_globs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or folder"):
        discover([str(tmp_path / "absent")])
    with pytest.raises(SourceError, match="no files match"):
        discover([str(tmp_path / "*.png")])
    with pytest.raises(SourceError, match="no inputs"):
        discover([])
    assert issubclass(SourceError, PadimError)  # a refused input stops the job before it starts (exit 2)


@pytest.mark.parametrize("name, mode", [("a.tar", "w"), ("a.tar.gz", "w:gz"), ("a.tgz", "w:gz"), ("a.tar.xz", "w:xz")])
def test_tar_members_stream_in_order_with_non_images_skipped(tmp_path: Path, name: str, mode: str) -> None:
    archive = write(tmp_path / name, tar_bytes({"./bottle/000.png": PNG, "bottle/readme.md": b"x", "bottle/sub/001.png": PNG + b"1"}, mode))
    found = records(discover([str(archive)]))
    assert [(r.source, r.relative, r.skipped) for r in found] == [
        (f"{archive}::bottle/000.png", "bottle/000.png", False),
        (f"{archive}::bottle/readme.md", "bottle/readme.md", True),
        (f"{archive}::bottle/sub/001.png", "bottle/sub/001.png", False),
    ]
    assert found[2].data == PNG + b"1" and found[1].data is None


def test_a_truncated_archive_keeps_what_came_before_and_reports_the_rest(tmp_path: Path) -> None:
    whole = tar_bytes({f"bottle/{i}.png": PNG * 200 for i in range(4)}, "w:gz")
    archive = write(tmp_path / "cut.tar.gz", whole[: len(whole) // 2])
    found = records(discover([str(archive)]))
    assert found[-1].source == str(archive) and "unreadable after" in found[-1].error
    assert all(record.data for record in found[:-1])
    not_an_archive = write(tmp_path / "junk.zip", b"not a zip at all")
    (junk,) = records(discover([str(not_an_archive)]))
    assert junk.source == str(not_an_archive) and "unreadable" in junk.error


def test_zip_member_with_a_bad_checksum_is_one_error_row(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("bottle/000.png", PNG)
        bundle.writestr("bottle/001.png", b"B" * 64)
        bundle.writestr("bottle/notes.txt", b"x")
        bundle.writestr("bottle/folder/", b"")
    data = bytearray(archive.read_bytes())
    data[data.index(b"B" * 64)] ^= 0xFF  # corrupt the stored member: its CRC no longer matches
    archive.write_bytes(bytes(data))
    found = records(discover([str(archive)]))
    assert [(r.relative, r.skipped, r.error is not None) for r in found] == [
        ("bottle/000.png", False, False), ("bottle/001.png", False, True), ("bottle/notes.txt", True, False),
    ]
    assert "BadZipFile" in found[1].error and f"{archive}::bottle/001.png" in found[1].error


def test_oversized_files_and_members_are_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 100)
    big = write(tmp_path / "in" / "bottle" / "big.png", PNG * 10)
    archive = write(tmp_path / "a.tar", tar_bytes({"bottle/big.png": PNG * 10}))
    for record in records(discover([str(big.parent.parent), str(archive)])):
        assert record.data is None and "more than the 100 bytes" in record.error


def test_a_zip_member_declared_too_large_is_refused_before_inflating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("bottle/zeros.png", bytes(10_000))
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 1000)
    opened = []
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *args, **kwargs: opened.append(args) or pytest.fail("inflated"))
    (record,) = records(discover([str(archive)]))
    assert "10000 bytes, more than the 1000 bytes" in record.error and not opened


def test_a_folder_link_loop_is_walked_once_and_broken_links_and_pipes_are_error_rows(tmp_path: Path) -> None:
    import os

    bottle = tmp_path / "in" / "bottle"
    write(bottle / "a.png")
    write(bottle / "notes.txt", b"x")
    (bottle / "loop").mkdir()
    (bottle / "loop" / "up").symlink_to("..")  # would repeat everything 40 levels deep
    (bottle / "elsewhere").symlink_to(bottle)  # the same folder under another name: once
    (bottle / "gone.png").symlink_to(bottle / "missing.png")
    os.mkfifo(bottle / "pipe.png")  # opening it would block the reader forever
    discovery = discover([str(tmp_path / "in")])
    assert discovery.skipped == 1
    found = {record.source: record for record in records(discovery)}
    assert sorted(found) == sorted(str(bottle / name) for name in ("a.png", "gone.png", "pipe.png"))
    assert found[str(bottle / "a.png")].data == PNG
    assert "a broken symbolic link" in found[str(bottle / "gone.png")].error
    assert "a named pipe (FIFO)" in found[str(bottle / "pipe.png")].error


def test_link_members_of_archives_are_error_rows(tmp_path: Path) -> None:
    import stat

    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tar:
        for kind, name in ((tarfile.SYMTYPE, "bottle/sym.png"), (tarfile.LNKTYPE, "bottle/hard.png")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "bottle/a.png"
            tar.addfile(info)
    bundle_path = tmp_path / "links.zip"
    with zipfile.ZipFile(bundle_path, "w") as bundle:
        link = zipfile.ZipInfo("bottle/zsym.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        bundle.writestr(link, "a.png")
    errors = [record.error for record in records(discover([str(archive), str(bundle_path)]))]
    assert len(errors) == 3
    assert "a symbolic link (to bottle/a.png) in the archive, not image data" in errors[0]
    assert "a hard link (to bottle/a.png) in the archive, not image data" in errors[1]
    assert "a symbolic link in the archive, not image data" in errors[2]


def test_member_names_lose_dot_and_slash_prefixes() -> None:
    assert member_name("./bottle/a.png") == "bottle/a.png"
    assert member_name("/bottle//a.png") == "bottle/a.png"


def test_parquet_image_column_path_and_category_are_detected(tmp_path: Path) -> None:
    table = pa.table({
        "path": ["bottle/a.png", None, "c.png"], "image": [PNG, PNG + b"2", None], "category": ["bottle", "cable", None],
        "label": [0, 1, 0],
    })
    pq.write_table(table, tmp_path / "images.parquet", row_group_size=2)
    discovery = discover([str(tmp_path / "images.parquet")])
    assert [unit["row_group"] for unit in discovery.units] == [0, 1]
    found = records(discovery)
    where = tmp_path / "images.parquet"
    assert [(r.source, r.category) for r in found] == [
        (f"{where}::bottle/a.png", "bottle"), (f"{where}::#1", "cable"), (f"{where}::c.png", None),
    ]
    assert found[1].data == PNG + b"2" and "empty" in found[2].error


def test_parquet_struct_image_column_as_hugging_face_writes_it(tmp_path: Path) -> None:
    images = pa.array([{"bytes": PNG, "path": "bottle/x.png"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"picture": images}), tmp_path / "hf.parquet")
    (record,) = records(discover([str(tmp_path / "hf.parquet")]))
    assert record.relative == "bottle/x.png" and record.data == PNG


def test_ambiguous_or_missing_image_columns_are_refused_before_reading(tmp_path: Path) -> None:
    pq.write_table(pa.table({"left": [PNG], "right": [PNG]}), tmp_path / "two.parquet")
    with pytest.raises(SourceError, match="--image-column"):
        discover([str(tmp_path / "two.parquet")])
    assert len(discover([str(tmp_path / "two.parquet")], image_column="right").units) == 1
    pq.write_table(pa.table({"n": [1]}), tmp_path / "none.parquet")
    with pytest.raises(SourceError, match="binary columns: none"):
        discover([str(tmp_path / "none.parquet")])


def test_uris_go_through_pyarrow_filesystems(tmp_path: Path) -> None:
    write(tmp_path / "bottle" / "a.png")
    write(tmp_path / "a.tar", tar_bytes({"bottle/b.png": PNG}))
    discovery = discover([f"file://{tmp_path}/bottle", f"file://{tmp_path}/a.tar"])
    assert [record.source for record in records(discovery)] == [str(tmp_path / "bottle" / "a.png"), f"{tmp_path}/a.tar::bottle/b.png"]
    with pytest.raises(SourceError, match="no filesystem"):
        discover(["nosuchscheme://bucket/x"])


@pytest.mark.parametrize("mode, cut", [("w", 700), ("w", 2600), ("w:gz", None), ("w:bz2", None), ("w:xz", None)])
def test_archives_cut_anywhere_end_in_an_error_row_never_silently(tmp_path: Path, mode: str, cut: int | None) -> None:
    """tarfile alone stops quietly at a truncated header, as if the archive had ended there."""
    whole = tar_bytes({f"bottle/{i}.png": bytes(range(256)) * 4 for i in range(4)}, mode)
    suffix = {"w": ".tar", "w:gz": ".tar.gz", "w:bz2": ".tar.bz2", "w:xz": ".tar.xz"}[mode]
    archive = write(tmp_path / f"cut{suffix}", whole[: cut or len(whole) // 2])
    found = records(discover([str(archive)]))
    assert found[-1].source == str(archive) and "unreadable after" in found[-1].error
    assert all(record.data for record in found[:-1])
    complete = write(tmp_path / f"whole{suffix}", whole)
    assert [record.error for record in records(discover([str(complete)]))] == [None] * 4


def test_garbled_header_in_the_middle_is_reported(tmp_path: Path) -> None:
    whole = bytearray(tar_bytes({f"bottle/{i}.png": b"x" * 512 for i in range(3)}))
    whole[1024:1030] = b"\xff" * 6  # the second member's header: its checksum no longer matches
    found = records(discover([str(write(tmp_path / "bad.tar", bytes(whole)))]))
    assert [record.relative for record in found[:-1]] == ["bottle/0.png"] and "unreadable after 1 members" in found[-1].error
