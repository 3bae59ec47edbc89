"""Making directory entries durable.

A new, renamed or removed file is durable only once its directory is
fsynced too; every module that creates files (segments, snapshots,
compaction, repair, exports) calls this one function for it.
"""

from __future__ import annotations

import os

__all__ = ["fsync_dir"]


def fsync_dir(path: str) -> None:
    """fsync the directory ``path`` (its entries: new, renamed, removed files)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
