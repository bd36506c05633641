"""Where the images of a scoring job come from: find the inputs, then stream their images.

An input is a folder (walked recursively), a glob, one image file, a `.tar`/`.tar.gz`/`.tgz`/
`.tar.bz2`/`.tar.xz` or `.zip` archive, or a Parquet file with a column of encoded images; any of
them local or on a filesystem pyarrow understands (`s3://`, `gs://`, `hdfs://`, `file://`).

Work is split in two so that the driver never holds the images:
- `discover` runs on the driver and turns the inputs into small *units*: one per image file,
  archive or Parquet row group. Folders are listed here (a path per file); archives are not
  opened beyond a check that they can be.
- `read_unit` runs in Ray tasks and yields one `ImageRecord` per image: the encoded bytes, or
  the reason they could not be read. Archive members are streamed from the archive, never
  extracted to disk, and a tar.gz is read in a single pass.

Files and members whose names lack an image suffix are skipped: not records, but counted
(`Discovery.skipped` for folders, a `skipped` record for archive members) so the job can say
how many it left out. Every file or member whose name says image becomes exactly one record:
one that cannot be read (a broken symbolic link, a FIFO or device, a link inside an archive)
is an error record saying why. Local folders are walked following symbolic links, each folder
once by its identity (device and inode), so a link loop cannot multiply images.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import lzma
import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from padim_core.errors import PadimError
from padim_core.image_files import is_image_name

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIXES = (".zip",)
PARQUET_SUFFIXES = (".parquet", ".pq")

MAX_IMAGE_BYTES = 128 * 1024**2
"""Encoded images above this size are refused unread, from the size a file, a tar header or a
zip directory declares (a row with an error). It bounds what one decode task holds (see
`jobs.score.pipeline`); a 100-megapixel photo (`padim_core.images.MAX_PIXELS`) is far smaller
as JPEG, though a PNG of one may not be."""

SEPARATOR = "::"
"""Joins a container and the name inside it in the `source` column: `archive.tar::bottle/000.png`."""

# Column names recognised in Parquet inputs, in order of preference.
_IMAGE_COLUMNS = ("image", "image_bytes", "bytes", "content", "data")
_PATH_COLUMNS = ("path", "source", "file_name", "filename", "name")
_CATEGORY_COLUMN = "category"
_GLOB_CHARS = "*?["


class SourceError(PadimError):
    """An input that cannot be used at all (missing, unreadable, no image column); names it."""


@dataclass(frozen=True)
class Input:
    """One `--input`, resolved to a filesystem and a path inside it."""

    text: str
    filesystem: pafs.FileSystem
    path: str
    prefix: str  # "" for local paths; "s3://" etc., so `display` gives back what the user wrote

    def display(self, path: str) -> str:
        return self.prefix + path


@dataclass(frozen=True)
class ImageRecord:
    """One image found in an input: its bytes, or why they could not be read.

    `source` is what the score table shows: a path, `archive::member` or `file.parquet::name`.
    `relative` is its path under the input root (or inside the archive), from which the
    category is taken; `category` is set only where the input says it explicitly (a Parquet
    `category` column). A `skipped` record is a non-image member, counted and not scored.
    """

    source: str
    relative: str | None = None
    data: bytes | None = None
    error: str | None = None
    category: str | None = None
    skipped: bool = False


@dataclass
class Discovery:
    """The inputs, the units to read in Ray tasks, and what discovery already skipped."""

    inputs: list[Input]
    units: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for unit in self.units if unit["kind"] == kind)

    def describe(self) -> str:
        parts = [f"{self.count('image')} image files", f"{self.count('tar') + self.count('zip')} archives"]
        if self.count("parquet"):
            parts.append(f"{self.count('parquet')} Parquet row groups")
        return ", ".join(parts) + f"; {self.skipped} non-image files skipped"

    def _skip(self, name: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(name)


# ----------------------------------------------------------------------------- discovery
def resolve_input(text: str) -> Input:
    """A local path (made absolute) or a URI pyarrow can open."""
    if "://" in text:
        try:
            filesystem, path = pafs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
            raise SourceError(f"input {text}: no filesystem for this URI ({error})") from None
        scheme = text.split("://", 1)[0]
        return Input(text, filesystem, path, "" if scheme == "file" else f"{scheme}://")
    return Input(text, pafs.LocalFileSystem(), str(Path(text).expanduser().resolve()), "")


def kind_of(name: str) -> str | None:
    """'tar', 'zip', 'parquet' or 'image' from the file name; None for anything else."""
    lowered = name.lower()
    if lowered.endswith(TAR_SUFFIXES):
        return "tar"
    if lowered.endswith(ZIP_SUFFIXES):
        return "zip"
    if lowered.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "image" if is_image_name(lowered) else None


def discover(texts: Sequence[str], image_column: str | None = None) -> Discovery:
    """Resolve every input into units; raise `SourceError` for an input that cannot be used.

    Inside folders only image files are taken: archives and Parquet files are read when named
    as inputs (or matched by a glob), so a folder holding, say, an earlier score table is not
    mistaken for images.
    """
    if not texts:
        raise SourceError("no inputs given")
    discovery = Discovery(inputs=[resolve_input(text) for text in texts])
    for index, source in enumerate(discovery.inputs):
        if any(char in source.path for char in _GLOB_CHARS):
            matches = _glob(source)
            if not matches:
                raise SourceError(f"input {source.text}: no files match this pattern")
            root = _glob_root(source.path)
            for info in matches:
                _add_path(discovery, index, info, root, explicit=True)
            continue
        info = _file_info(source)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"input {source.text}: no such file or folder")
        if info.type == pafs.FileType.Directory:
            for item in _list(source.filesystem, source.path, recursive=True):
                _add_path(discovery, index, item, source.path, explicit=False)
        else:
            _add_path(discovery, index, info, posixpath.dirname(source.path), explicit=True)
    for unit in [unit for unit in discovery.units if unit["kind"] == "parquet"]:
        unit.update(_parquet_columns(discovery.inputs[unit["input"]], unit["path"], image_column))
    discovery.units = _split_parquet(discovery)
    return discovery


def _file_info(source: Input) -> pafs.FileInfo:
    try:
        return source.filesystem.get_file_info(source.path)
    except OSError as error:
        raise SourceError(f"input {source.text}: cannot be read ({error})") from None


@dataclass(frozen=True)
class Found:
    """A file found in a folder; `problem` says why it cannot be read (None: a regular file)."""

    path: str
    problem: str | None = None

    @property
    def base_name(self) -> str:
        return posixpath.basename(self.path)


def _list(filesystem: pafs.FileSystem, base: str, recursive: bool) -> list[Found]:
    if isinstance(filesystem, pafs.LocalFileSystem):
        return _walk_local(base, recursive)
    try:
        items = filesystem.get_file_info(pafs.FileSelector(base, recursive=recursive))
    except OSError as error:
        raise SourceError(f"folder {base}: cannot be listed ({error})") from None
    return sorted((Found(item.path) for item in items if item.type == pafs.FileType.File), key=lambda item: item.path)


_SPECIAL_FILES = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _walk_local(base: str, recursive: bool) -> list[Found]:
    """Every non-folder entry under `base`, following symbolic links to folders but entering each
    folder once (by device and inode): a loop such as `up -> ..` adds nothing."""
    found: list[Found] = []
    seen: set[tuple[int, int]] = set()
    pending = [base]
    while pending:
        folder = pending.pop()
        try:
            identity = os.stat(folder)
            if (identity.st_dev, identity.st_ino) in seen:
                continue
            seen.add((identity.st_dev, identity.st_ino))
            with os.scandir(folder) as entries:
                listed = sorted(entries, key=lambda entry: entry.name)
        except OSError as error:
            raise SourceError(f"folder {folder}: cannot be listed ({error.strerror or error})") from None
        for entry in listed:
            try:
                if entry.is_dir():
                    if recursive:
                        pending.append(entry.path)
                    continue
                if entry.is_file():
                    found.append(Found(entry.path))
                    continue
                found.append(Found(entry.path, _why_unreadable(entry)))
            except OSError as error:
                found.append(Found(entry.path, f"cannot be examined ({error.strerror or error})"))
    return sorted(found, key=lambda item: item.path)


def _why_unreadable(entry: os.DirEntry) -> str:
    if entry.is_symlink() and not os.path.exists(entry.path):
        return f"a broken symbolic link (to {os.readlink(entry.path)})"
    mode = os.stat(entry.path).st_mode
    return next((name for test, name in _SPECIAL_FILES if test(mode)), "not a regular file")


def _add_path(discovery: Discovery, index: int, info: Found | pafs.FileInfo, root: str, explicit: bool) -> None:
    kind = kind_of(info.base_name)
    if kind is None or (kind != "image" and not explicit):
        discovery._skip(discovery.inputs[index].display(info.path))
        return
    relative = posixpath.relpath(info.path, root) if root else info.path
    unit = {"input": index, "kind": kind, "path": info.path, "relative": relative, "row_group": 0}
    problem = getattr(info, "problem", None)
    if problem is not None:
        unit.update(kind="image", problem=problem)  # never opened: reading a FIFO would block
    discovery.units.append(unit)


def _glob_root(pattern: str) -> str:
    """The folders before the first wildcard: the root that categories are taken under."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(char in part for char in _GLOB_CHARS))
    return "/".join(parts[:fixed]) or "/"


def _glob(source: Input) -> list[pafs.FileInfo]:
    """Shell-style matching on any filesystem: `*`, `?` and `[...]` stay within one folder
    level, `**` spans any number of them (as in `glob.glob(..., recursive=True)`)."""
    root = _glob_root(source.path)
    pattern = source.path[len(root):].strip("/").split("/")
    recursive = len(pattern) > 1 or "**" in pattern
    if source.filesystem.get_file_info(root).type != pafs.FileType.Directory:
        return []
    items = _list(source.filesystem, root, recursive)
    return [item for item in items if _match(posixpath.relpath(item.path, root).split("/"), pattern)]


def _match(parts: list[str], pattern: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(parts[1:], pattern[1:])


# ------------------------------------------------------------------------------ Parquet
def _parquet_columns(source: Input, path: str, image_column: str | None) -> dict[str, Any]:
    """Which columns of a Parquet input hold the image bytes, a name and a category.

    The image column is `image_column` when given, else the first binary column named like
    an image (`image`, `bytes`, ...), else the only binary column. A struct column with a
    binary `bytes` field (a Hugging Face `Image` feature) counts, its `path` field as the name.
    """
    where = source.display(path)
    try:
        with source.filesystem.open_input_file(path) as file:
            parquet = pq.ParquetFile(file)
            schema, row_groups = parquet.schema_arrow, parquet.metadata.num_row_groups
    except (OSError, pa.ArrowException) as error:
        raise SourceError(f"Parquet input {where}: cannot be read ({error})") from None
    candidates = {}
    for column in schema:
        if _is_binary(column.type):
            candidates[column.name] = None
        elif pa.types.is_struct(column.type) and _struct_field(column.type, "bytes", _is_binary):
            candidates[column.name] = "bytes"
    if image_column is not None:
        if image_column not in candidates:
            raise SourceError(
                f"Parquet input {where}: column {image_column!r} is not a column of image bytes; "
                f"binary columns: {sorted(candidates) or 'none'}"
            )
        chosen = image_column
    else:
        named = [name for name in _IMAGE_COLUMNS if name in candidates]
        if named:
            chosen = named[0]
        elif len(candidates) == 1:
            chosen = next(iter(candidates))
        else:
            raise SourceError(
                f"Parquet input {where}: cannot tell which column holds the images "
                f"(binary columns: {sorted(candidates) or 'none'}); name it with --image-column"
            )
    names = [column.name for column in schema]
    path_column = next((name for name in _PATH_COLUMNS if name in names and pa.types.is_string(schema.field(name).type)), None)
    path_field = "path" if candidates[chosen] and _struct_field(schema.field(chosen).type, "path", pa.types.is_string) else None
    category = _CATEGORY_COLUMN if _CATEGORY_COLUMN in names and pa.types.is_string(schema.field(_CATEGORY_COLUMN).type) else None
    return {
        "image_column": chosen, "image_field": candidates[chosen], "path_column": path_column,
        "path_field": path_field, "category_column": category, "row_groups": row_groups,
    }


def _is_binary(data_type: pa.DataType) -> bool:
    return pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type)


def _struct_field(data_type: pa.DataType, name: str, check: Any) -> bool:
    index = data_type.get_field_index(name)
    return index >= 0 and check(data_type.field(index).type)


def _split_parquet(discovery: Discovery) -> list[dict[str, Any]]:
    """One unit per row group, so a large Parquet file is read by several tasks."""
    units = []
    for unit in discovery.units:
        if unit["kind"] != "parquet":
            units.append(unit)
            continue
        units.extend({**unit, "row_group": group} for group in range(unit.pop("row_groups")))
    return units


# ------------------------------------------------------------------------------ reading
def read_unit(unit: dict[str, Any], inputs: Sequence[Input]) -> Iterator[ImageRecord]:
    """The images of one unit, in order. Never raises for bad content: that is an error record."""
    source = inputs[unit["input"]]
    kind = unit["kind"]
    if unit.get("problem"):
        name = source.display(unit["path"])
        yield ImageRecord(name, unit["relative"], error=f"cannot read {name}: {unit['problem']}")
    elif kind == "image":
        yield _read_file(source, unit["path"], unit["relative"])
    elif kind == "tar":
        yield from _read_tar(source, unit["path"])
    elif kind == "zip":
        yield from _read_zip(source, unit["path"])
    else:
        yield from _read_parquet(source, unit)


def _reason(error: BaseException) -> str:
    message = str(error).strip() or "no details"
    return f"{type(error).__name__}: {message}"


def _too_large(size: int) -> str:
    return f"{size} bytes, more than the {MAX_IMAGE_BYTES} bytes an image may have"


def _read_file(source: Input, path: str, relative: str) -> ImageRecord:
    name = source.display(path)
    try:
        with source.filesystem.open_input_file(path) as file:
            size = file.size()
            if size > MAX_IMAGE_BYTES:
                return ImageRecord(name, relative, error=f"cannot read {name}: {_too_large(size)}")
            return ImageRecord(name, relative, data=file.read())
    except (OSError, pa.ArrowException) as error:
        return ImageRecord(name, relative, error=f"cannot read {name}: {_reason(error)}")


def member_name(name: str) -> str:
    """An archive member's path without `./` or a leading `/`: `./bottle/a.png` -> `bottle/a.png`."""
    return posixpath.normpath(name).lstrip("/").removeprefix("./")


_DECOMPRESSORS = {
    (".tar.gz", ".tgz"): lambda file: gzip.GzipFile(fileobj=file),
    (".tar.bz2", ".tbz2"): bz2.BZ2File,
    (".tar.xz", ".txz"): lzma.LZMAFile,
}


class _EndOfArchiveCheck:
    """A read-through file that remembers the last bytes it passed on.

    tarfile's stream mode ends the member loop quietly when a header is truncated or garbled
    (after the first), exactly as at the real end of the archive, so the members after the
    damage would vanish unnoticed. A real end is a block of zeros where the next header would
    be; this keeps enough of the stream to look at that block once the loop is over.
    """

    _KEEP = 1 << 16  # more than tarfile reads ahead (one 10 KiB record)

    def __init__(self, file: Any) -> None:
        self._file = file
        self._tail = b""
        self._end = 0  # stream offset just past `_tail`

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._tail = (self._tail + data)[-self._KEEP:]
        self._end += len(data)
        return data

    def ends_at(self, offset: int) -> bool:
        """Whether a full block of zeros starts at `offset`: tar's end-of-archive marker."""
        start = offset - (self._end - len(self._tail))
        block = self._tail[start : start + tarfile.BLOCKSIZE] if start >= 0 else b""
        return len(block) == tarfile.BLOCKSIZE and not any(block)


def _decompressed(file: Any, path: str) -> Any:
    """Python's decompressing file objects raise EOFError on a truncated stream (tarfile's own
    `r|gz` reader would just stop), so compressed tars are unpacked with them."""
    lowered = path.lower()
    opener = next((opener for suffixes, opener in _DECOMPRESSORS.items() if lowered.endswith(suffixes)), None)
    return opener(file) if opener else file


def _read_tar(source: Input, path: str) -> Iterator[ImageRecord]:
    """Stream a tar (any compression) front to back: one pass, one member in memory at a time."""
    archive = source.display(path)
    read = 0
    try:
        with source.filesystem.open_input_stream(path, compression=None) as raw:
            stream = _EndOfArchiveCheck(_decompressed(raw, path))
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if member.isdir():
                        continue
                    name = member_name(member.name)
                    record = f"{archive}{SEPARATOR}{name}"
                    read += 1
                    if not is_image_name(name):
                        yield ImageRecord(record, name, skipped=True)
                    elif not member.isfile():
                        yield ImageRecord(record, name, error=f"cannot read {record}: {_tar_member_kind(member)}, not image data")
                    elif member.size > MAX_IMAGE_BYTES:
                        yield ImageRecord(record, name, error=f"cannot read {record}: {_too_large(member.size)}")
                    else:
                        yield ImageRecord(record, name, data=tar.extractfile(member).read())
                if not stream.ends_at(tar.offset):
                    raise tarfile.ReadError("a damaged or missing header where the next member or the end should be")
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, pa.ArrowException) as error:
        # What came before was yielded; the rest of a damaged archive is unknowable, so the
        # archive itself becomes an error row rather than a crashed job or missing rows.
        yield ImageRecord(archive, error=f"archive {archive} is unreadable after {read} members: {_reason(error)}")


def _tar_member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {member.linkname}) in the archive"
    if member.islnk():
        return f"a hard link (to {member.linkname}) in the archive"
    return "a device, FIFO or other special member"


def _read_zip(source: Input, path: str) -> Iterator[ImageRecord]:
    """Read a zip member by member through its central directory (pyarrow files are seekable)."""
    archive = source.display(path)
    try:
        file = source.filesystem.open_input_file(path)
        try:
            bundle = zipfile.ZipFile(file)
        except BaseException:
            file.close()
            raise
    except (zipfile.BadZipFile, OSError, EOFError, pa.ArrowException) as error:
        yield ImageRecord(archive, error=f"archive {archive} is unreadable: {_reason(error)}")
        return
    with file, bundle:
        for info in bundle.infolist():
            if info.is_dir():
                continue
            name = member_name(info.filename)
            record = f"{archive}{SEPARATOR}{name}"
            if not is_image_name(name):
                yield ImageRecord(record, name, skipped=True)
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                yield ImageRecord(record, name, error=f"cannot read {record}: a symbolic link in the archive, not image data")
                continue
            if info.file_size > MAX_IMAGE_BYTES:  # refused from the directory, before inflating anything
                yield ImageRecord(record, name, error=f"cannot read {record}: {_too_large(info.file_size)}")
                continue
            try:
                # The header's size can lie (a zip bomb): read at most one byte past the limit.
                with bundle.open(info) as member:
                    data = member.read(MAX_IMAGE_BYTES + 1)
            except Exception as error:  # noqa: BLE001 - bad CRC, encryption, unsupported method: one member's problem
                yield ImageRecord(record, name, error=f"cannot read {record}: {_reason(error)}")
                continue
            if len(data) > MAX_IMAGE_BYTES:
                yield ImageRecord(record, name, error=f"cannot read {record}: {_too_large(info.file_size)}")
            else:
                yield ImageRecord(record, name, data=data)


def _read_parquet(source: Input, unit: dict[str, Any]) -> Iterator[ImageRecord]:
    where = source.display(unit["path"])
    columns = [unit["image_column"], *(name for name in (unit["path_column"], unit["category_column"]) if name)]
    columns = list(dict.fromkeys(columns))
    try:
        with source.filesystem.open_input_file(unit["path"]) as file:
            parquet = pq.ParquetFile(file)
            first_row = sum(parquet.metadata.row_group(i).num_rows for i in range(unit["row_group"]))
            for batch in parquet.iter_batches(batch_size=256, row_groups=[unit["row_group"]], columns=columns):
                images = batch.column(unit["image_column"])
                names = batch.column(unit["path_column"]).to_pylist() if unit["path_column"] else None
                if unit["image_field"]:
                    if unit["path_field"] and names is None:
                        names = images.field(unit["path_field"]).to_pylist()
                    images = images.field(unit["image_field"])
                categories = batch.column(unit["category_column"]).to_pylist() if unit["category_column"] else None
                for offset, data in enumerate(images.to_pylist()):
                    row = first_row + offset
                    name = names[offset] if names and names[offset] else f"#{row}"
                    record = f"{where}{SEPARATOR}{name}"
                    category = categories[offset] if categories else None
                    if data is None:
                        yield ImageRecord(record, name, error=f"{record}: the image column is empty in row {row}", category=category)
                    elif len(data) > MAX_IMAGE_BYTES:
                        yield ImageRecord(record, name, error=f"cannot read {record}: {_too_large(len(data))}", category=category)
                    else:
                        yield ImageRecord(record, name, data=data, category=category)
                first_row += batch.num_rows
    except (OSError, pa.ArrowException) as error:
        yield ImageRecord(where, error=f"Parquet input {where} is unreadable in row group {unit['row_group']}: {_reason(error)}")
