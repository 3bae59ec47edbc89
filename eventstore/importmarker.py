"""The files that mark an import under way in a store directory.

``eventstore import-sqlite`` (cli/transfer.py) writes one once it has opened
the store, and removes it once the import is whole.  Found later, the import
was killed before it could clean up: the store holds part of the file, so
writers refuse to open it (see ``unfinished_import``) and the next import
into the directory first undoes the part.

* ``IMPORTING``: an import into a new or empty directory.  Undone by
  deleting what the directory holds.
* ``IMPORTING-MORE``: an import into a store that held events already
  (``--force``).  It names the store's last position before the import;
  undone by cutting the log after it (``recovery.cut_after``).  A name of
  its own, because earlier releases take ``IMPORTING`` to mean the whole
  directory is the import's, and would delete the store's own history.

docs/format.md ("IMPORTING") describes both.
"""

from __future__ import annotations

import contextlib
import os
import re
import zlib

from .errors import IntegrityError
from .fsutil import fsync_dir, write_all

__all__ = [
    "IMPORTING",
    "IMPORTING_MORE",
    "position_before",
    "remove_marker",
    "unfinished_import",
    "write_marker",
]

IMPORTING = "IMPORTING"
IMPORTING_MORE = "IMPORTING-MORE"

_POSITION_LINE = re.compile(rb"^position before the import: (\d{1,19})$", re.MULTILINE)


def write_marker(directory: str, before: int | None) -> str:
    """Write ``IMPORTING`` (``before`` None: a new store) or ``IMPORTING-MORE``.

    Durable (fsync of the file and the directory) before it returns, and so
    before the import appends anything.  Returns the file's path.
    """
    if before is None:
        path = os.path.join(directory, IMPORTING)
        text = b"an import-sqlite into this directory has not finished\n"
    else:
        path = os.path.join(directory, IMPORTING_MORE)
        text = (
            b"an import-sqlite into this store has not finished; the events after the\n"
            b"position below are part of its file, and the next import-sqlite here\n"
            b"removes them first\n"
            b"position before the import: %d\n" % before
        )
        # The next import cuts the log after that position: a flipped digit
        # must be refused, not obeyed (it would cut the store's own history).
        text += b"crc32 %08x\n" % zlib.crc32(text)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            write_all(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(directory)
    except OSError as err:
        # The import does not start; a marker left behind would keep every
        # writer out of the store for an import that never was.
        with contextlib.suppress(OSError):
            os.unlink(path)
        if type(err) is OSError and err.filename is None:
            raise OSError(err.errno, err.strerror, path) from err  # write/fsync name no file
        raise
    return path


def remove_marker(path: str) -> None:
    """Remove a marker (the import is whole, or undone), durably."""
    os.unlink(path)
    fsync_dir(os.path.dirname(path) or ".")


def position_before(directory: str) -> int | None:
    """The position ``IMPORTING-MORE`` names; None if there is no such file.

    Raises IntegrityError if the file is there but damaged (its last line,
    ``crc32 XXXXXXXX``, is the CRC-32 of the bytes before it) or names no
    position: no position is guessed, since the next import cuts the log
    after it.
    """
    path = os.path.join(directory, IMPORTING_MORE)
    try:
        with open(path, "rb") as f:
            text = f.read(4096)
    except FileNotFoundError:
        return None
    body, _, last = text.removesuffix(b"\n").rpartition(b"\n")
    m = _POSITION_LINE.search(body + b"\n")
    if m is None or last != b"crc32 %08x" % zlib.crc32(body + b"\n"):
        raise IntegrityError(
            f"{path}: damaged (its checksum line does not match, or it names no "
            "position); delete the file to keep every event the store holds, or cut "
            "the log back yourself (eventstore.recovery.cut_after)"
        )
    return int(m.group(1))


def unfinished_import(directory: str) -> str | None:
    """Why a writer must not open ``directory``, or None if no import is unfinished."""
    if os.path.exists(os.path.join(directory, IMPORTING)):
        return (
            f"{directory}: an import into it did not finish ({IMPORTING} is there), so it "
            "holds only part of the file: run the import again (it starts anew), "
            f"or delete {IMPORTING} to keep this part"
        )
    if os.path.exists(os.path.join(directory, IMPORTING_MORE)):
        try:
            before = position_before(directory)
            after = f"after position {before}" if before is not None else "at its end"
        except (OSError, IntegrityError):
            after = "at its end"
        return (
            f"{directory}: an import that added to this store did not finish "
            f"({IMPORTING_MORE} is there), so the events {after} are part of a file: "
            "run the import again (it first removes them), or delete "
            f"{IMPORTING_MORE} to keep them"
        )
    return None
