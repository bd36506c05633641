"""Writing files and folders so that a reader never sees half of one.

A file is written beside its destination and renamed over it (`write_file`); a folder is built
in a hidden staging folder beside its destination and swapped in (`StagedFolder`). Both remove
what they created when anything fails, and both honour the umask: the temporary files that
`tempfile` makes are private (0600), so their permissions are set as a plain `open` would.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

STAGING_MARK = ".staging-"
"""In the names of staging folders: `.<name>.staging-<id>` beside the destination."""


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file(path: str | Path, content: bytes | str | Callable[[Path], None]) -> Path:
    """Write `content` (bytes, text, or a function that writes a given path) to `path` atomically."""
    if not isinstance(content, (bytes, bytearray, memoryview, str)) and not callable(content):
        raise TypeError(f"content must be bytes, text or a function that writes a path, got {type(content).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temporary = Path(name)
    try:
        with os.fdopen(handle, "wb") as file:
            if isinstance(content, (bytes, bytearray, memoryview)):
                file.write(content)
            elif isinstance(content, str):
                file.write(content.encode("utf-8"))
        if callable(content):
            content(temporary)
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


class StagedFolder:
    """A folder that appears at `target` complete or not at all.

    Use as a context manager: fill `.path` inside the block; on a clean exit it replaces
    `target` (`replace_folder`); on an exception the staging folder is removed and `target` is
    left as it was.
    """

    def __init__(self, target: str | Path) -> None:
        self.target = Path(target)
        self.path = self.target.with_name(f".{self.target.name}{STAGING_MARK}{uuid.uuid4().hex[:12]}")

    def __enter__(self) -> StagedFolder:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir(mode=0o777)
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            replace_folder(self.path, self.target)
        finally:
            shutil.rmtree(self.path, ignore_errors=True)


def replace_folder(source: Path, target: Path) -> None:
    """Put folder `source` in `target`'s place, deleting what was there.

    Where the kernel can swap two paths atomically (Linux's renameat2 with RENAME_EXCHANGE), a
    reader of `target` sees the old folder or the new one, never neither. Elsewhere the old
    folder is renamed aside and the new one renamed in: between the two renames `target` is
    briefly absent.
    """
    if target.exists() and exchange_paths(source, target):
        shutil.rmtree(source, ignore_errors=True)  # now the old folder
        return
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
    had_target = target.exists()
    if had_target:
        os.replace(target, retired)
    try:
        os.replace(source, target)
    except BaseException:
        if had_target:
            os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system cannot (then nothing moved)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot swap {first} and {second}: {os.strerror(code)}")
