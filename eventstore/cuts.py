"""``CUTS``: how many times the log was cut, so that readers open before a cut notice it.

A cut (``recovery.cut_after``, undoing an unfinished import, and
``recovery.repair``) removes events from the end of the log; the next
writer gives their positions to other events.  A follower that had read
them must not go on as if nothing happened, and the files alone cannot
always tell it: a compaction also removes and replaces files, and new
events may already fill the positions again when it next looks.  So each
cut counts itself in this file, once before it changes anything and once
after: a reader records the file as it opens the log and is told to open it
again when the file differs (see ``SegmentLog._look_for_rewrite``).  Only
equality matters to readers, so they compare bytes, not numbers.

The file holds a decimal count and a newline; a store without it has never
been cut.  docs/format.md ("CUTS") describes it.
"""

from __future__ import annotations

import os

from .fsutil import fsync_dir, write_all

__all__ = ["CUTS", "count_cut", "cuts_seen", "settle_cuts"]

CUTS = "CUTS"


def cuts_seen(directory: str) -> bytes:
    """The file's bytes as a reader compares them (empty if there is none)."""
    try:
        with open(os.path.join(directory, CUTS), "rb") as f:
            return f.read(64)
    except FileNotFoundError:
        return b""


def _count(raw: bytes) -> int:
    try:
        return int(raw.decode("ascii"))
    except ValueError:
        return 0


def settle_cuts(directory: str) -> None:
    """Finish the count of a cut a crash stopped between its two counts.

    The count is then odd, and a reader that opened meanwhile recorded that
    odd count; the cut itself, run again, finds nothing left to cut, so
    nothing would ever count again and tell it.  Called, with the writer
    lock held, by every writer's open and before every cut.
    """
    tmp = os.path.join(directory, CUTS + ".tmp")
    if os.path.exists(tmp):  # a crash in count_cut
        os.unlink(tmp)
    if _count(cuts_seen(directory)) % 2:
        count_cut(directory)


def count_cut(directory: str) -> None:
    """Count one more cut, durably (temporary file, fsync, rename, directory fsync).

    A file this code cannot read counts as 0: what matters is that the
    bytes change.
    """
    raw = cuts_seen(directory)
    count = _count(raw)
    new = b"%d\n" % (count + 1)
    if new == raw:  # cannot be, but a reader must see a change
        new = b"%d\n" % (count + 2)
    path = os.path.join(directory, CUTS)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, new)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(path + ".tmp", path)
    fsync_dir(directory)
