"""A hostile input corpus for jobs.score, built at test time: everything a careless or malicious
folder, archive or name can hold. `build_corpus` returns the inputs and the sources that must
each come out as exactly one row."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from support.images import broken_images, odd_images


@dataclass
class Corpus:
    inputs: list[Path] = field(default_factory=list)
    expected: dict[str, str | None] = field(default_factory=dict)  # source -> an error substring, or None: scored
    skipped: int = 0  # non-image files, counted once each


def multi_frame_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def build_corpus(root: Path, photos: list[bytes]) -> Corpus:
    """A folder, a tar and a zip under `root`; `photos` are real images of the `bottle` category."""
    corpus = Corpus()
    folder = root / "folder"
    bottle = folder / "bottle"
    bottle.mkdir(parents=True)
    good = {f"photo_{i}.png": data for i, data in enumerate(photos)}
    good.update({f"odd_{name}": data for name, data in odd_images().items()})
    good.update({"odd name #1 (ü).png": photos[0], "UPPER.PNG": photos[0], ("x" * 150) + ".png": photos[0]})
    for name, data in good.items():
        (bottle / name).write_bytes(data)
        corpus.expected[str(bottle / name)] = None
    failing = {**{f"broken_{name}": data for name, data in broken_images().items()}, "frames.tif.png": multi_frame_gif()}
    for name, data in failing.items():
        (bottle / name).write_bytes(data)
        corpus.expected[str(bottle / name)] = "cannot"
    corpus.expected[str(bottle / "frames.tif.png")] = None  # a GIF named .png: PIL reads its first frame
    (bottle / "notes.txt").write_text("not an image")
    corpus.skipped += 1
    # A symlink loop: followed once, so nothing under it is seen twice.
    (bottle / "loop").mkdir()
    (bottle / "loop" / "up").symlink_to("..")
    (bottle / "loop" / "readme.md").write_text("skipped once")
    corpus.skipped += 1
    # Links and special files named like images: one error row each, never opened.
    (bottle / "broken_link.png").symlink_to(bottle / "missing.png")
    corpus.expected[str(bottle / "broken_link.png")] = "broken symbolic link"
    (bottle / "device.png").symlink_to("/dev/zero")
    corpus.expected[str(bottle / "device.png")] = "character device"
    os.mkfifo(bottle / "pipe.png")
    corpus.expected[str(bottle / "pipe.png")] = "named pipe"
    (bottle / "copy_link.png").symlink_to(bottle / "photo_0.png")  # a link to a file is that file
    corpus.expected[str(bottle / "copy_link.png")] = None
    # A category folder whose name is not a usable category: its images become error rows.
    (folder / "bad name").mkdir()
    (folder / "bad name" / "a.png").write_bytes(photos[0])
    corpus.expected[str(folder / "bad name" / "a.png")] = "not a usable category name"
    corpus.inputs.append(folder)

    tar_path = root / "hostile.tar"
    with tarfile.open(tar_path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("bottle/a.png", photos[0])
        corpus.expected[f"{tar_path}::bottle/a.png"] = None
        add("../../escape.png", photos[0])  # path traversal: category ".." is refused, nothing is written
        corpus.expected[f"{tar_path}::../../escape.png"] = "not a usable category name"
        add("bottle/inner.tar", b"\0" * 1024)  # a nested archive is not an image
        corpus.skipped += 1
        for kind, name, target in ((tarfile.SYMTYPE, "bottle/sym.png", "a.png"), (tarfile.LNKTYPE, "bottle/hard.png", "bottle/a.png")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
            corpus.expected[f"{tar_path}::{name}"] = "link"
        folder_member = tarfile.TarInfo("bottle/sub")
        folder_member.type = tarfile.DIRTYPE
        tar.addfile(folder_member)
    corpus.inputs.append(tar_path)

    zip_path = root / "hostile.zip"
    with zipfile.ZipFile(zip_path, "w") as bundle:
        bundle.writestr("bottle/z.png", photos[1])
        corpus.expected[f"{zip_path}::bottle/z.png"] = None
        bundle.writestr("bottle/z_empty.png", b"")
        corpus.expected[f"{zip_path}::bottle/z_empty.png"] = "cannot"
        link = zipfile.ZipInfo("bottle/zlink.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        bundle.writestr(link, "z.png")
        corpus.expected[f"{zip_path}::bottle/zlink.png"] = "symbolic link"
        bundle.writestr("bottle/../../zescape.png", photos[1])
        corpus.expected[f"{zip_path}::../zescape.png"] = "not a usable category name"
        bundle.writestr("bottle/readme.txt", "x")
        corpus.skipped += 1
    corpus.inputs.append(zip_path)
    return corpus
