r"""The bytes of a segment file: its header and its frames.

A segment is named by the position of its first event, zero-padded to 20
digits (``00000000000000000001.seg``) so that name order is position order.

Header, 48 bytes, little-endian::

    0   8  magic            b"\x89ESLOG\r\n"
    8   2  format version   u16 (1)
    10  2  flags            u16: bit 0 = written by compaction (gaps allowed);
                            bit 1 = frames may hold holes (only with bit 0)
    12  8  first position   u64, equals the number in the file name
    20  8  schema fingerprint  eventstore.events.SCHEMA_FINGERPRINT
    28  16 store id         random bytes chosen when the store was created
    44  4  header checksum  crc32 of bytes 0..43

Then frames, back to back, each::

    0   4  payload length   u32, at most MAX_FRAME_PAYLOAD
    4   4  checksum         crc32 of bytes 8..19 of this frame and the payload
    8   8  first position   u64, the position of the frame's first event
    16  4  event count      u32, at least 1
    20  n  payload          one msgpack array of ``count`` events (codec.py)

The events of a frame have consecutive positions.  After compaction frames
may leave gaps between them; and in a segment with flag bit 1 (what
compaction writes since golden store v10) an element of a frame's array may
be nil, a hole: a position without an event, never the first or the last.

Zero bytes may follow the last frame, up to the end of the file: a writer in
"fsync" mode fills space with zeros before it writes frames into it (see
``segmentlog.PREFILL_BYTES``).  A frame header of 20 zero bytes therefore
ends the frames, provided every byte after it is zero too; a non-zero byte
after it is damage.  ``docs/format.md`` says the same with examples.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from .codec import encode_batch_into
from .errors import IntegrityError, MigrationError
from .events import READABLE_FINGERPRINTS, SCHEMA_FINGERPRINT, Event

__all__ = [
    "FORMAT_VERSION",
    "FRAME_EVENTS",
    "FRAME_HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_FRAME_PAYLOAD",
    "FrameInfo",
    "SegmentHeader",
    "encode_frames",
    "frame_crc",
    "pack_frame_header",
    "pack_header",
    "segment_name",
    "unpack_header",
]

MAGIC = b"\x89ESLOG\r\n"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHHQ8s16sI")
HEADER_SIZE = HEADER.size  # 48
STORE_ID_SIZE = 16
FRAME_HEADER = struct.Struct("<IIQI")
FRAME_HEADER_SIZE = FRAME_HEADER.size  # 20
#: The largest payload a frame may declare.  Checked before a single byte of
#: the payload is read or allocated, so a damaged length field cannot make a
#: reader ask for gigabytes.  A single event is at most about 3 MiB (three
#: strings of 1 MiB), so 16 MiB leaves room and still bounds a bad read.
MAX_FRAME_PAYLOAD = 16 * 1024 * 1024

#: Most events one frame holds.  Replay favours big frames (fewer decode
#: calls), a read of one row favours small ones (it splits its whole frame).
#: Measured on 1M busy-channel events: 1024 a frame replayed 1.41M events/s
#: and a user's last 100 actions took 2.0 ms at p99; 64 a frame replayed
#: 1.29M events/s and took 0.43 ms.
FRAME_EVENTS = 64

SEGMENT_SUFFIX = ".seg"
SEGMENT_RE = re.compile(r"^(\d{20})\.seg$")


def segment_name(first_position: int) -> str:
    return f"{first_position:020d}{SEGMENT_SUFFIX}"


@dataclass(frozen=True)
class SegmentHeader:
    version: int
    flags: int
    first_position: int
    fingerprint: bytes
    store_id: bytes


#: Written by compaction: gaps between frames are allowed.
FLAG_COMPACTED = 1
#: Frames may hold nil in place of an event: a position with no event inside
#: a frame (compaction writes its kept events this way, see docs/format.md).
#: Only with FLAG_COMPACTED.
FLAG_HOLES = 2
KNOWN_FLAGS = FLAG_COMPACTED | FLAG_HOLES


def pack_header(
    first_position: int,
    store_id: bytes,
    fingerprint: bytes = SCHEMA_FINGERPRINT,
    flags: int = 0,
) -> bytes:
    head = HEADER.pack(MAGIC, FORMAT_VERSION, flags, first_position, fingerprint, store_id, 0)
    return head[:44] + struct.pack("<I", zlib.crc32(head[:44]))


def unpack_header(data: bytes, path: str) -> SegmentHeader:
    """Parse and check a segment header; errors name the file."""
    if len(data) < HEADER_SIZE:
        raise IntegrityError(f"{path}: segment header is {len(data)} bytes, expected {HEADER_SIZE}")
    magic, version, flags, first, fingerprint, store_id, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise IntegrityError(f"{path}: not a segment file (magic {magic!r})")
    if zlib.crc32(data[:44]) != crc:
        raise IntegrityError(f"{path}: segment header checksum mismatch at offset 0")
    if version != FORMAT_VERSION:
        raise MigrationError(
            f"{path}: segment format version {version}; this code reads version {FORMAT_VERSION}"
        )
    if flags & ~KNOWN_FLAGS:
        # A flag this code does not know may change how the frames read
        # (newer code's); guessing would risk reading them wrong.
        raise MigrationError(
            f"{path}: segment flags {flags:#06x} include bits this code does not know "
            f"(it knows {KNOWN_FLAGS:#06x}); open the store with the eventstore that wrote it"
        )
    if flags & FLAG_HOLES and not flags & FLAG_COMPACTED:
        raise IntegrityError(
            f"{path}: segment flags {flags:#06x}: holes in frames (bit 1) without "
            "compaction (bit 0), which no writer sets"
        )
    return SegmentHeader(version, flags, first, fingerprint, store_id)


def pack_frame_header(buf: bytearray, offset: int, first_position: int, count: int) -> None:
    """Fill the 20-byte frame header at ``offset``; the payload must follow it in ``buf``."""
    length = len(buf) - offset - FRAME_HEADER_SIZE
    struct.pack_into("<QI", buf, offset + 8, first_position, count)
    crc = zlib.crc32(memoryview(buf)[offset + 8 :])
    struct.pack_into("<II", buf, offset, length, crc)


def encode_frames(
    first_position: int, events: Sequence[Event | None]
) -> list[tuple[int, int, bytes]]:
    """Frames for events at consecutive positions: (first position, count, bytes).

    A frame holds at most FRAME_EVENTS events and MAX_FRAME_PAYLOAD payload
    bytes.  The byte cap binds only for events of hundreds of KiB each (a
    round of 1 MiB messages from many tasks): such a chunk is split in
    halves until each half fits.  Readers refuse a longer frame as damage,
    so one must never be written.  An event too large for a frame of its
    own raises ValueError before anything is written.

    None stands for a position without an event (compaction's frames, in
    segments with FLAG_HOLES).  A frame begins and ends with an event: the
    holes at its edges (where a chunk was cut) are left out of it.
    """
    frames: list[tuple[int, int, bytes]] = []
    for start in range(0, len(events), FRAME_EVENTS):
        _encode_frame(first_position + start, events[start : start + FRAME_EVENTS], frames)
    return frames


def _encode_frame(
    first_position: int, events: Sequence[Event | None], frames: list[tuple[int, int, bytes]]
) -> None:
    lo, hi = 0, len(events)
    while lo < hi and events[lo] is None:
        lo += 1
    while hi > lo and events[hi - 1] is None:
        hi -= 1
    if lo == hi:
        return  # holes only
    if lo or hi < len(events):
        first_position, events = first_position + lo, events[lo:hi]
    buf = bytearray(FRAME_HEADER_SIZE)
    encode_batch_into(events, buf, FRAME_HEADER_SIZE)
    if len(buf) - FRAME_HEADER_SIZE > MAX_FRAME_PAYLOAD:
        if len(events) == 1:
            raise ValueError(
                f"the event at position {first_position} encodes to "
                f"{len(buf) - FRAME_HEADER_SIZE} bytes, more than a frame holds "
                f"({MAX_FRAME_PAYLOAD})"
            )
        half = len(events) // 2
        _encode_frame(first_position, events[:half], frames)
        _encode_frame(first_position + half, events[half:], frames)
        return
    pack_frame_header(buf, 0, first_position, len(events))
    frames.append((first_position, len(events), bytes(buf)))


def frame_crc(header_tail: bytes | memoryview, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(header_tail))


@dataclass(slots=True)
class FrameInfo:
    """A frame found while scanning: where it is and what it holds.

    Not frozen: a frozen dataclass's __init__ costs a call per field, and
    replay makes one of these per frame (one per event for a bot that writes
    one event per "fsync" round).
    """

    offset: int
    first_position: int
    count: int
    payload_start: int
    end: int


class FrameError(Exception):
    """Why the bytes at an offset are not a valid frame (used by the scanners)."""

    def __init__(
        self,
        offset: int,
        reason: str,
        *,
        short: bool = False,
        checksum: bool = False,
        blank: bool = False,
    ) -> None:
        super().__init__(reason)
        self.offset = offset
        self.reason = reason
        #: True if the frame is complete but its checksum does not match.
        self.checksum = checksum
        #: True if the frame header is 20 zero bytes: the start of zero-filled
        #: space (FrameWalker then checks that only zeros follow).
        self.blank = blank
        #: True if the frame would extend past the end of the data: the shape
        #: a write cut short by a crash leaves behind.
        self.short = short


def parse_frame(buf: bytes | memoryview, offset: int, base: int = 0) -> FrameInfo:
    """Check the frame at ``offset`` of ``buf`` and return where it lies.

    ``base`` is the file offset of ``buf[0]``; returned offsets are file
    offsets.  Raises FrameError.
    """
    avail = len(buf) - offset
    if avail < FRAME_HEADER_SIZE:
        raise FrameError(base + offset, f"{avail} bytes left, a frame header is 20", short=True)
    length, crc, first, count = FRAME_HEADER.unpack_from(buf, offset)
    if length > MAX_FRAME_PAYLOAD:
        raise FrameError(
            base + offset, f"frame length {length} exceeds the cap {MAX_FRAME_PAYLOAD}"
        )
    end = offset + FRAME_HEADER_SIZE + length
    if end > len(buf):
        raise FrameError(
            base + offset, f"frame of {length} bytes runs past the end of the data", short=True
        )
    mv = memoryview(buf)
    if frame_crc(mv[offset + 8 : offset + 20], mv[offset + 20 : end]) != crc:
        if not (length or crc or first or count):
            raise FrameError(base + offset, "zero bytes instead of a frame", blank=True)
        raise FrameError(base + offset, "frame checksum mismatch", checksum=True)
    if count == 0:
        raise FrameError(base + offset, "frame holds no events")
    return FrameInfo(base + offset, first, count, base + offset + FRAME_HEADER_SIZE, base + end)


def check_fingerprint(header: SegmentHeader, path: str) -> None:
    """Refuse a segment holding event types this code cannot read.

    A known fingerprint is fine.  An unknown one (the segment was written by
    other code) is fine too if every event tag in it is one this code can
    read: newer code may only have added fields, which are ignored.
    Otherwise MigrationError names the unknown tags, before any replay.
    """
    if header.fingerprint in READABLE_FINGERPRINTS:
        return
    from .codec import batch_tags, known_tags
    from .framing import FrameWalker

    found: set[int] = set()
    with open(path, "rb") as f:
        f.seek(HEADER_SIZE)
        walker = FrameWalker(HEADER_SIZE, header.first_position, gaps_allowed=True)
        try:
            while data := f.read(4 * 1024 * 1024):
                for _info, payload in walker.feed(data):
                    found |= batch_tags(payload)
        except FrameError:
            pass  # damage is reported by whoever reads the frames
    unknown = found - known_tags()
    if unknown:
        raise MigrationError(
            f"{path}: holds events with tag(s) {', '.join(map(str, sorted(unknown)))} that "
            f"this code cannot read (event schema {header.fingerprint.hex()}, this code has "
            f"{SCHEMA_FINGERPRINT.hex()}); open the store with the newer eventstore that "
            "wrote it"
        )


def list_segments(directory: str) -> tuple[list[tuple[int, str]], list[str]]:
    """(first position, file name) of every segment, sorted; and stray names.

    Raises IntegrityError for an entry named like a segment that is not a
    file (a directory): every reader would fail on it with an error that
    names no file, and a writer rolling to that name could not create it.
    """
    segments: list[tuple[int, str]] = []
    stray: list[str] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            m = SEGMENT_RE.match(entry.name)
            if m is None:
                stray.append(entry.name)
                continue
            if not entry.is_file():
                raise IntegrityError(
                    f"{entry.path}: named like a segment, but not a regular file; "
                    "move it out of the store directory"
                )
            segments.append((int(m.group(1)), entry.name))
    segments.sort()
    return segments, stray
