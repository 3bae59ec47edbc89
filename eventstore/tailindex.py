r"""The tail index: where the last segment's frames lie, saved by a writer.

A writer's open must know where the frames of the last segment end, and
checks each of them on the way.  A bot that awaits every "fsync" write
leaves one frame per event, so a full last segment holds about a million
frames, and walking them took about half a second of every start.  close()
therefore saves the segment's sparse frame index (the same entries the
writer keeps in memory, one per INDEX_STRIDE bytes of frames) to
``tail.index``, and so does each snapshot in "fsync" mode (where every
frame it names is synced), so that a start after a crash walks little
more than what came after the snapshot; the next writer checks the frame
at the last entry and walks only from there.  The frames before it are
checked in the background after connect(), as those of older segments are.

It is only a hint.  A file that is missing, damaged, of another store or
of a segment that is no longer the last one, that does not start at the
segment's first frame, or whose last entry does not name the same frame
(the same 20 header bytes, checksum included, and they must be a frame's)
at the same offset, is ignored, and so is one whose walk from that frame
finds anything but a clean end: the writer then walks the whole segment,
exactly as without the file.  So it is written without fsync, in place: a
crash leaves at worst a file that fails its checksum.  docs/format.md
("tail.index") lists every condition.

Layout, little-endian::

    0   8   magic            b"\x89ESTAIL\n"
    8   2   format version   u16 (1)
    10  2   flags            u16 (0; a file with flags set is ignored)
    12  4   checksum         crc32 of bytes 16..end
    16  16  store id         as in segment headers
    32  8   segment          u64: the first position of the segment it indexes
    40  20  frame header     the 20 header bytes of the frame at the last entry
    60  4   entries          u32 n, at least 1
    64  8n  positions        i64: first position of each indexed frame
    64+8n  8n  offsets       i64: file offset of each indexed frame
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from array import array
from dataclasses import dataclass

from .fsutil import write_all
from .segment import (
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    MAX_FRAME_PAYLOAD,
)

__all__ = ["TAIL_INDEX", "TailIndex", "read_tail_index", "remove_tail_index", "write_tail_index"]

#: The file's name in the store directory.
TAIL_INDEX = "tail.index"
MAGIC = b"\x89ESTAIL\n"
VERSION = 1
_HEAD = struct.Struct("<8sHHI16sQ20sI")
HEAD_SIZE = _HEAD.size  # 64
FILE_MODE = 0o600


@dataclass
class TailIndex:
    """A saved index of segment ``segment``: entries in file order."""

    segment: int
    positions: array[int]
    offsets: array[int]
    #: The 20 header bytes of the frame at ``offsets[-1]``.
    frame_header: bytes


def write_tail_index(
    directory: str,
    store_id: bytes,
    segment: int,
    positions: array[int],
    offsets: array[int],
    frame_header: bytes,
) -> None:
    """Save the index of the last segment (raises OSError; the caller decides)."""
    if not offsets or len(positions) != len(offsets) or len(frame_header) != FRAME_HEADER_SIZE:
        raise ValueError("a tail index needs at least one entry and the header of its frame")
    body = bytearray(HEAD_SIZE)
    body += _le(positions).tobytes()
    body += _le(offsets).tobytes()
    _HEAD.pack_into(body, 0, MAGIC, VERSION, 0, 0, store_id, segment, frame_header, len(offsets))
    struct.pack_into("<I", body, 12, zlib.crc32(memoryview(body)[16:]))
    path = os.path.join(directory, TAIL_INDEX)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        write_all(fd, body)
    finally:
        os.close(fd)


def read_tail_index(directory: str, store_id: bytes, segment: int) -> TailIndex | None:
    """The saved index of segment ``segment`` of store ``store_id``, or None.

    None for anything but a whole, unflagged file of this version, store and
    segment whose first entry is the segment's first frame, whose entries
    rise, and whose saved header is a frame's (at least one event, a payload
    within the cap, the last entry's first position).  Whether the frames are
    still where it says is the caller's to check.
    """
    try:
        with open(os.path.join(directory, TAIL_INDEX), "rb") as f:
            data = f.read()
    except OSError:
        return None
    if len(data) < HEAD_SIZE:
        return None
    magic, version, flags, crc, sid, seg, header, n = _HEAD.unpack_from(data)
    if (
        magic != MAGIC
        or version != VERSION
        or flags != 0
        or len(data) != HEAD_SIZE + 16 * n
        or n == 0
        or zlib.crc32(memoryview(data)[16:]) != crc
        or sid != store_id
        or seg != segment
    ):
        return None
    positions = _le(array("q", data[HEAD_SIZE : HEAD_SIZE + 8 * n]))
    offsets = _le(array("q", data[HEAD_SIZE + 8 * n :]))
    # The first entry is the segment's first frame: a replay or a read of a
    # position before the second entry starts its walk there.
    if offsets[0] != HEADER_SIZE or positions[0] != segment:
        return None
    for k in range(1, n):
        if offsets[k] <= offsets[k - 1] or positions[k] <= positions[k - 1]:
            return None
    # The saved header is a frame's: 20 zero bytes (free space after the
    # last frame) would "match" zeros anywhere and pass for a clean end.
    length, _crc, first, count = FRAME_HEADER.unpack(header)
    if count < 1 or not 0 < length <= MAX_FRAME_PAYLOAD or first != positions[-1]:
        return None
    return TailIndex(seg, positions, offsets, header)


def remove_tail_index(directory: str) -> None:
    """Remove the file if there is one (a segment without frames needs none)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, TAIL_INDEX))


def _le(values: array[int]) -> array[int]:
    """``values`` as little-endian int64 (a copy on a big-endian machine)."""
    if struct.pack("=q", 1) == struct.pack("<q", 1):
        return values
    swapped = array("q", values)
    swapped.byteswap()
    return swapped
