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

from collections.abc import Iterator

from .segment import FRAME_HEADER, FRAME_HEADER_SIZE, FrameError, FrameInfo, parse_frame

__all__ = ["FrameWalker"]


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
        if self.zeros_from is not None:
            if self.zeros_checked:
                self._check_zeros(data, self._fed_end)
            self._fed_end += len(data)
            return
        if self._i:
            self._buf = self._buf[self._i :]
            self._base += self._i
            self._i = 0
        self._buf = self._buf + data if self._buf else data
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
            return err
        return FrameError(self.offset, "unparsed bytes at the end")  # pragma: no cover

    def tail_bytes(self) -> bytes:
        """The bytes after the last complete frame."""
        return self._buf[self._i :]
