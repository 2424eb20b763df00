"""Webdataset tars, read and written one sample at a time: the downloaded shards (img2dataset's
``NNNNN.tar``: ``<key>.jpg``, ``<key>.json``, ``<key>.txt`` per sample) are read by the labeler
and by the webdataset export, and the export writes its own. A sample is the run of members
whose names share the part before the first dot of the base name (webdataset's own grouping).
Imports no ``dagster``.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from coyo_platform.common.storage import Storage

#: The image members a downloaded sample may have (gif, bmp: img2dataset's ``keep_original``).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")


def iter_tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a webdataset tar, streamed in order."""
    current, members = None, {}
    # through Storage: S3 reads get its retry settings (throttling, dropped connections)
    fs = Storage(url.rsplit("/", 1)[0]).fs
    with fs.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = os.path.basename(info.name).partition(".")
            if key != current and current is not None:
                yield current, members
                members = {}
            current = key
            members[ext.lower()] = tar.extractfile(info).read()
    if current is not None:
        yield current, members


def image_member(members: dict[str, bytes]) -> tuple[str, bytes] | None:
    """A sample's image: (extension, bytes), or None where it has none."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    return None if ext is None else (ext, members[ext])


class TarWriter:
    """A tar written sample by sample, the same bytes for the same samples: members in the order
    given, with a fixed time, owner and mode (no trace of the machine or the hour that wrote it),
    in the plain ustar format."""

    MTIME = 1_600_000_000  # a fixed time: tools that warn about a zero mtime stay quiet

    def __init__(self, fileobj: BinaryIO) -> None:
        self.fileobj = fileobj
        self.tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """One sample: ``(extension, bytes)`` members, named ``<key>.<extension>``."""
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), self.MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))

    @property
    def bytes(self) -> int:
        """Bytes written so far (the tar's end blocks, added on close, not counted)."""
        return self.fileobj.tell()

    def close(self) -> None:
        self.tar.close()
