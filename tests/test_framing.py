"""FrameWalker.scan (replay's walk) finds what FrameWalker.feed finds.

scan checks frames in one loop of its own and hands over to feed's loop at
the first frame it does not take, so the two must agree on every byte
string: the same frames, the same error at the same offset, the same state
after each chunk.  Checked on frames with gaps (a compacted segment) and
without, damaged by flipped bytes, cuts and zero-filled space, fed in
chunks of any size.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventstore.events import MessageSaved, UserCountLogged
from eventstore.framing import FrameWalker
from eventstore.segment import FrameError, encode_frames

START = 48  # file offset of the first frame: after the segment header


def _walk(data: bytes, chunks: list[int], gaps: bool, fast: bool) -> list[Any]:
    """Every step of a walk: frames found, the error, the state after each chunk."""
    walker = FrameWalker(START, 1, gaps_allowed=gaps)
    seen: list[Any] = []
    at = 0
    for size in [*chunks, len(data)]:
        chunk, at = data[at : at + size], at + size
        if not chunk:
            continue
        try:
            if fast:
                frames, bad = walker.scan(chunk)
                buf = memoryview(frames.buf)
                for first, count, start, end in zip(
                    frames.firsts, frames.counts, frames.starts, frames.ends, strict=True
                ):
                    seen.append(
                        ("frame", first, count, frames.base + start, bytes(buf[start + 20 : end]))
                    )
                if bad is not None:
                    raise bad
            else:
                for info, payload in walker.feed(chunk):
                    seen.append(
                        ("frame", info.first_position, info.count, info.offset, bytes(payload))
                    )
        except FrameError as err:
            seen.append(("error", err.offset, err.reason))
            return seen
        seen.append(("state", walker.offset, walker.next_position, walker.zeros_from))
    bad = walker.finish()
    seen.append(("finish", None if bad is None else (bad.offset, bad.reason)))
    return seen


@st.composite
def _logs(draw: st.DrawFn) -> tuple[bytes, bool]:
    gaps = draw(st.booleans())
    data = bytearray()
    position = 1
    for _ in range(draw(st.integers(0, 12))):
        if gaps:
            position += draw(st.integers(0, 3))
        n = draw(st.integers(1, 4))
        events = [
            MessageSaved(1000 + position + i, f"u{i}", "x" * draw(st.integers(0, 30)))
            if draw(st.booleans())
            else UserCountLogged(1000 + position + i, i, i + 1)
            for i in range(n)
        ]
        for _first, _count, frame in encode_frames(position, events):
            data += frame
        position += n
    data += b"\0" * draw(st.integers(0, 40))
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "cut", "zero"]))
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[i:]
        else:
            data[i : i + draw(st.integers(1, 24))] = b"\0" * 24
    return bytes(data), gaps


@settings(max_examples=400, deadline=None)
@given(_logs(), st.lists(st.integers(1, 200), max_size=8))
def test_scan_finds_what_feed_finds(log: tuple[bytes, bool], chunks: list[int]) -> None:
    data, gaps = log
    assert _walk(data, chunks, gaps, fast=True) == _walk(data, chunks, gaps, fast=False)


def test_scan_refuses_a_frame_whose_position_goes_back() -> None:
    """The check scan makes before handing over: gaps only forward, and
    only where they are allowed."""
    one = encode_frames(1, [UserCountLogged(1000, 1, 2)])[0][2]
    two = encode_frames(3, [UserCountLogged(1001, 1, 2)])[0][2]
    back = encode_frames(2, [UserCountLogged(1002, 1, 2)])[0][2]
    for gaps, data, reason in [
        (False, one + two, "frame starts at position 3, expected 2"),
        (True, one + two + back, "frame starts at position 2, expected 4"),
    ]:
        frames, bad = FrameWalker(START, 1, gaps_allowed=gaps).scan(data)
        assert bad is not None and bad.reason == reason
        assert frames.firsts == ([1] if not gaps else [1, 3])


def test_scan_refuses_a_frame_of_no_events_whose_checksum_holds() -> None:
    """Flipped bytes fail the checksum first; a frame written with a count of
    0 (by a faulty writer) does not, and is refused all the same."""
    payload = b"\x90"  # an empty msgpack array
    tail = struct.pack("<QI", 2, 0)
    empty = struct.pack("<II", len(payload), zlib.crc32(tail + payload)) + tail + payload
    one = encode_frames(1, [UserCountLogged(1000, 1, 2)])[0][2]
    frames, bad = FrameWalker(START, 1, gaps_allowed=False).scan(one + empty + one)
    assert bad is not None and bad.reason == "frame holds no events"
    assert bad.offset == START + len(one)
    assert frames.firsts == [1]


@pytest.mark.parametrize("sizes", ["varied", "aligned"])
async def test_replay_builds_the_same_sparse_index_as_noting_every_frame(
    tmp_path: Any, sizes: str
) -> None:
    """Replay indexes a segment's frames with a bisect per entry
    (segmentlog._note_frames); the index must be the one Segment.note
    builds frame by frame: an entry at least INDEX_STRIDE bytes after the
    last, from the first frame on.  "aligned": frames of a size that
    divides INDEX_STRIDE, so frames start exactly INDEX_STRIDE after an
    entry (at least, not more than)."""
    from eventstore import EventStore
    from eventstore.segment import HEADER_SIZE
    from eventstore.segmentlog import INDEX_STRIDE, SegmentLog

    def text(i: int) -> str:
        if sizes == "varied":
            return "y" * (i % 50)
        # A frame of 64 bytes: 20 of header, the rest the payload.
        for n in range(64):
            frame = encode_frames(1, [MessageSaved(1000, "u0", "y" * n)])[0][2]
            if len(frame) == 64:
                return "y" * n
        raise AssertionError("no text length makes a 64-byte frame")

    assert INDEX_STRIDE % 64 == 0
    d = tmp_path / "s"
    async with EventStore(d, durability="flush", segment_size=64 * 1024) as store:
        for i in range(4000):  # awaited one by one: a frame per event
            await store.save_message(f"u{i % 7}", text(i), timestamp=1000 + i)
    log = SegmentLog(str(d), read_only=True)
    await log.open()
    try:
        async for _first, _events in log.read_runs(1):
            pass
        segments = log.segments
        assert len(segments) > 3
        for seg in segments:
            assert seg.indexed
            with open(seg.path, "rb") as f:
                data = f.read()
            walker = FrameWalker(HEADER_SIZE, seg.first, gaps_allowed=False)
            pos: list[int] = []
            off: list[int] = []
            for info, _payload in walker.feed(data[HEADER_SIZE:]):
                if not off or info.offset - off[-1] >= INDEX_STRIDE:
                    pos.append(info.first_position)
                    off.append(info.offset)
            assert len(off) > 2
            assert (list(seg.frame_pos), list(seg.frame_off)) == (pos, off)
    finally:
        await log.close()


async def test_a_reader_gets_every_event_before_a_bad_frame(tmp_path: Any) -> None:
    """docs/format.md: a reader of the log gets every event before the first
    bad frame of a sealed segment, then the error naming that frame (it used
    to get only whole groups of RUN_EVENTS events of the chunk, so none
    here)."""
    from eventstore import EventStore, IntegrityError
    from eventstore.segment import HEADER_SIZE

    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096) as store:
        for i in range(150):  # awaited "fsync" writes: a frame per event
            await store.save_message("u", f"line {i}", timestamp=1000 + i)
    first = sorted(d.glob("*.seg"))[0]
    data = bytearray(first.read_bytes())
    walker = FrameWalker(HEADER_SIZE, 1, gaps_allowed=False)
    offsets = [info.offset for info, _ in walker.feed(bytes(data[HEADER_SIZE:]))]
    assert len(offsets) > 5
    data[offsets[5] + 22] ^= 0xFF  # in the payload of the sixth frame
    first.write_bytes(bytes(data))
    async with EventStore(d, read_only=True, snapshot_every=None) as reader:
        seen: list[int] = []
        with pytest.raises(IntegrityError, match=f"checksum mismatch at offset {offsets[5]}"):
            async for position, _event in reader.read(1):
                seen.append(position)
        assert seen == [1, 2, 3, 4, 5]
