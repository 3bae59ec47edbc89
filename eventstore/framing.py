"""Walking the frames of a segment, chunk by chunk.

``FrameWalker`` is fed the bytes of a segment in large chunks (replay reads
4 MiB at a time) and yields every complete, checksum-verified frame.  It keeps
the bytes of a frame that straddles two chunks.  It does not decode payloads:
callers decide whether to (replay does, the tail scan and ``info`` do not).

A frame header of 20 zero bytes ends the frames (zero-filled space, see
segment.py): from there the walker only checks that every byte it is fed is
zero, and raises FrameError at the first one that is not.  Except with
``zeros_checked=False``, for readers of a segment a live writer is filling:
the zeros they read in one chunk may be frames by the time they read the
next, so there the walker just stops.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

from .segment import (
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    MAX_FRAME_PAYLOAD,
    FrameError,
    FrameInfo,
    parse_frame,
)

__all__ = ["FrameWalker", "Scanned", "is_torn_tail"]


class Scanned:
    """Frames ``FrameWalker.scan`` found in its buffer, as parallel lists.

    Frame k holds ``counts[k]`` events from position ``firsts[k]``; its
    header starts at ``buf[starts[k]]`` (file offset ``base + starts[k]``)
    and it ends before ``buf[ends[k]]``; its payload follows the 20-byte
    header.
    """

    __slots__ = ("base", "buf", "counts", "ends", "firsts", "starts")

    def __init__(self, buf: bytes, base: int) -> None:
        self.buf, self.base = buf, base
        self.firsts: list[int] = []
        self.counts: list[int] = []
        self.starts: list[int] = []
        self.ends: list[int] = []


class FrameWalker:
    def __init__(
        self,
        start_offset: int,
        next_position: int,
        *,
        gaps_allowed: bool,
        zeros_checked: bool = True,
    ) -> None:
        self._buf = b""
        self._base = start_offset  # file offset of _buf[0]
        self._i = 0  # index in _buf of the next unparsed frame
        self.next_position = next_position
        self.gaps_allowed = gaps_allowed
        self.zeros_checked = zeros_checked
        #: File offset where zero-filled space began, once the walker met it.
        self.zeros_from: int | None = None
        self._fed_end = 0

    @property
    def offset(self) -> int:
        """File offset just past the last complete frame."""
        return self._base + self._i

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf) - self._i

    def wanted(self) -> int:
        """How many more bytes the frame in progress needs (at least 1)."""
        avail = self.pending
        if avail < FRAME_HEADER_SIZE:
            return FRAME_HEADER_SIZE - avail
        length: int = FRAME_HEADER.unpack_from(self._buf, self._i)[0]
        return max(1, FRAME_HEADER_SIZE + length - avail)

    def feed(self, data: bytes) -> Iterator[tuple[FrameInfo, memoryview]]:
        """Yield the frames completed by ``data``; raise FrameError at a bad one.

        A payload view is valid until the next call of ``feed``.
        """
        if self._take(data):
            yield from self._walk()

    def scan(self, data: bytes) -> tuple[Scanned, FrameError | None]:
        """``feed``, for replay: the frames completed by ``data``, in lists.

        A bad frame is returned as the error, after the frames before it,
        for the caller to raise once it has used them (non-zero bytes after
        zero-filled space still raise, as in ``feed``).

        A bot that awaits every "fsync" write leaves one frame per event,
        and ``feed``'s generator and FrameInfo per frame were a third of the
        replay of such a log.  Here one loop checks the frames and keeps
        plain ints: no object per frame the garbage collector tracks (tens
        of thousands of those alive at once set off its full collections).
        It takes only frames that pass every check of ``parse_frame`` and of
        ``feed``; at anything else it hands over to ``feed``'s own loop,
        which decides (and words the error) exactly as before.
        """
        if not self._take(data):
            return Scanned(self._buf, self._base), None
        buf, i = self._buf, self._i
        out = Scanned(buf, self._base)
        view = memoryview(buf)
        n = len(buf)
        expect, gaps = self.next_position, self.gaps_allowed
        firsts, counts, starts, ends = out.firsts, out.counts, out.starts, out.ends
        unpack, crc32 = FRAME_HEADER.unpack_from, zlib.crc32
        while n - i >= FRAME_HEADER_SIZE:
            length, crc, first, count = unpack(buf, i)
            end = i + FRAME_HEADER_SIZE + length
            if (
                end > n
                or length > MAX_FRAME_PAYLOAD
                or not count
                # The checksum covers bytes 8..19 of the header, then the
                # payload: one contiguous stretch.
                or crc32(view[i + 8 : end]) != crc
                or (first != expect and not (gaps and first > expect))
            ):
                break
            firsts.append(first)
            counts.append(count)
            starts.append(i)
            ends.append(end)
            expect = first + count
            i = end
        self._i, self.next_position = i, expect
        try:
            for info, _payload in self._walk():
                firsts.append(info.first_position)
                counts.append(info.count)
                starts.append(info.offset - out.base)
                ends.append(info.end - out.base)
        except FrameError as err:
            return out, err
        return out, None

    def _take(self, data: bytes) -> bool:
        """Add ``data`` after the unparsed bytes; False once in zero-filled space."""
        if self.zeros_from is not None:
            if self.zeros_checked:
                self._check_zeros(data, self._fed_end)
            self._fed_end += len(data)
            return False
        if self._i:
            self._buf = self._buf[self._i :]
            self._base += self._i
            self._i = 0
        self._buf = self._buf + data if self._buf else data
        return True

    def _walk(self) -> Iterator[tuple[FrameInfo, memoryview]]:
        buf = self._buf
        view = memoryview(buf)
        n = len(buf)
        while n - self._i >= FRAME_HEADER_SIZE:
            try:
                info = parse_frame(buf, self._i, self._base)
            except FrameError as err:
                if err.short:
                    return  # wait for more bytes
                if err.blank:
                    self._enter_zeros()
                    return
                raise
            if info.first_position != self.next_position and not (
                self.gaps_allowed and info.first_position > self.next_position
            ):
                raise FrameError(
                    info.offset,
                    f"frame starts at position {info.first_position}, "
                    f"expected {self.next_position}",
                )
            self.next_position = info.first_position + info.count
            start = info.payload_start - self._base
            self._i = info.end - self._base
            yield info, view[start : self._i]

    def _enter_zeros(self) -> None:
        """The frame header at ``_i`` is blank: the rest must be zeros too."""
        self.zeros_from = self._base + self._i
        rest, self._buf = self._buf[self._i :], self._buf[: self._i]
        # File offset just past the bytes fed so far (``offset`` stays put).
        self._fed_end = self.zeros_from + len(rest)
        if self.zeros_checked:
            self._check_zeros(rest, self.zeros_from)

    def _check_zeros(self, data: bytes, at: int) -> None:
        rest = data.lstrip(b"\0")
        if rest:
            # Reported where the frames stopped: what lies between is lost.
            assert self.zeros_from is not None
            raise FrameError(
                self.zeros_from,
                f"zero bytes instead of a frame, but a non-zero byte follows at offset "
                f"{at + len(data) - len(rest)}",
            )

    def finish(self) -> FrameError | None:
        """At the end of the data: the error for a trailing incomplete frame, if any.

        Fewer than 20 bytes left, all zero, is zero-filled space too short to
        hold a blank header: not an error.
        """
        if self.pending == 0:
            return None
        if not self._buf[self._i :].lstrip(b"\0"):
            self.zeros_from = self.offset
            return None
        try:
            parse_frame(self._buf, self._i, self._base)
        except FrameError as err:
            # Returned without its traceback: that holds this frame and its
            # callers', which hold what this walker read (see feed), and
            # whoever keeps the error would make a reference cycle of them.
            return err.with_traceback(None)
        return FrameError(self.offset, "unparsed bytes at the end")  # pragma: no cover

    def tail_bytes(self) -> bytes:
        """The bytes after the last complete frame."""
        return self._buf[self._i :]


def is_torn_tail(tail: bytes, err: FrameError) -> bool:
    """Is ``err`` the shape a crash mid-write leaves at the end of the log?

    ``tail`` is the file from the frame ``err`` is about to its end.  Torn:
    a frame running past the end of the file, a frame whose checksum fails
    with nothing but zeros after it (a power cut can leave a frame's last
    pages unwritten; the zeros are space filled in "fsync" mode, or none at
    all), or nothing but zeros -- provided no valid frame follows.  A damaged
    length field can make a frame in the middle look like it runs past the
    end; the frame after it then still parses, and that is damage, not a
    crash.  The writer cuts a torn tail; anything else stops it.
    """
    if not tail.strip(b"\0"):
        return True
    if not tail[:FRAME_HEADER_SIZE].strip(b"\0"):
        # Zeros where a frame should start, then other bytes: writes land
        # in order, so a crash does not leave this (a zeroed page does).
        return False
    if len(tail) >= FRAME_HEADER_SIZE and _valid_frame_follows(tail):
        return False
    if err.short:
        return True
    if err.checksum:
        length = int.from_bytes(tail[:4], "little")
        return not tail[FRAME_HEADER_SIZE + length :].strip(b"\0")
    return False


def _valid_frame_follows(tail: bytes) -> bool:
    """Does a valid frame start somewhere after the (damaged) frame at tail[0]?

    Looks for the header of the frame that should come next: its first
    position is this frame's first position plus its count.
    """
    first, count = struct.unpack_from("<QI", tail, 8)
    if first + count == 0:
        # Positions start at 1, so nothing can follow a frame "at position 0"
        # (a header torn after its length and checksum); and 8 zero bytes
        # would match all through the zero-filled space.
        return False
    needle = struct.pack("<Q", first + count)
    at = tail.find(needle, FRAME_HEADER_SIZE + 8)
    while at != -1:
        try:
            parse_frame(tail, at - 8)
            return True
        except FrameError:
            pass
        at = tail.find(needle, at + 1)
    return False
