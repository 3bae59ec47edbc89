"""Writing files whole and making directory entries durable.

A new, renamed or removed file is durable only once its directory is
fsynced too; every module that creates files (segments, snapshots,
compaction, repair, exports) calls ``fsync_dir`` for it.  ``write_all``
loops where ``os.write`` may write less than it was given (a full disk, a
signal).
"""

from __future__ import annotations

import os

__all__ = ["fsync_dir", "write_all"]


def fsync_dir(path: str) -> None:
    """fsync the directory ``path`` (its entries: new, renamed, removed files)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` at ``fd``'s file offset."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
