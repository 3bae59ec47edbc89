"""Zero-filled space after the last frame ("fsync" mode fills ahead of its writes).

The writer grows the active segment by PREFILL_BYTES of zeros whenever a round
writes past its end, so that the rounds after it overwrite existing blocks.
Zeros after the last frame are free space, not a torn tail; anything else
after them is damage.  Sealed segments and closed stores carry no zeros.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest
from storeutil import all_events, copy_store, fill, frames_end, segment_files

from eventstore import EventStore, IntegrityError
from eventstore.recovery import find_damage
from eventstore.segment import FRAME_HEADER_SIZE, HEADER_SIZE
from eventstore.segmentlog import PREFILL_BYTES
from eventstore.verify import verify


async def test_fsync_mode_fills_ahead_and_close_cuts_the_zeros(tmp_path: Path) -> None:
    d = tmp_path / "s"
    store = EventStore(d)  # "fsync" is the default
    await store.connect()
    await store.save_message("u", "first", timestamp=1)
    first = segment_files(d)[0].read_bytes()
    # The first round grew the file, and PREFILL_BYTES of zeros with it.
    assert len(first) == frames_end(first) + PREFILL_BYTES
    await fill(store, 20)
    data = segment_files(d)[0].read_bytes()
    end = frames_end(data)
    assert len(data) == len(first) and end > frames_end(first)
    assert not data[end:].strip(b"\0")
    # Later rounds write into the zeros: the file does not grow.
    await fill(store, 20, prefix="again")
    data2 = segment_files(d)[0].read_bytes()
    assert len(data2) == len(data)
    assert frames_end(data2) > end
    await store.close()
    closed = segment_files(d)[0].read_bytes()
    assert len(closed) == frames_end(closed) == frames_end(data2)
    assert [e.message for e in await all_events(d)] == ["first"] + [f"m{i}" for i in range(20)] + [
        f"again{i}" for i in range(20)
    ]


@pytest.mark.parametrize("durability", ["flush", "none"])
async def test_other_modes_do_not_fill(tmp_path: Path, durability: str) -> None:
    d = tmp_path / "s"
    async with EventStore(d, durability=durability) as store:  # type: ignore[arg-type]
        await fill(store, 20)
        await store.log.flush()
        data = segment_files(d)[0].read_bytes()
        assert len(data) == frames_end(data)


async def test_sealed_segments_carry_no_zeros(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096) as store:
        await fill(store, 600)
        files = segment_files(d)
        assert len(files) > 3
        for f in files[:-1]:
            data = f.read_bytes()
            assert len(data) == frames_end(data), f.name
        last = files[-1].read_bytes()
        assert len(last) == 4096 > frames_end(last)  # filled up to segment_size


async def _open_copy(tmp_path: Path, n: int = 30) -> tuple[Path, list[object], int]:
    """A copy of a store taken while its "fsync" writer was open: zeros at the end."""
    d = tmp_path / "live"
    async with EventStore(d) as store:
        await fill(store, n)
        copy = copy_store(d, tmp_path / "copy")
    seg = segment_files(copy)[0]
    data = seg.read_bytes()
    assert len(data) > frames_end(data)
    return copy, await all_events(d), frames_end(data)


async def test_zeros_after_the_last_frame_are_free_space_not_a_torn_tail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy, events, end = await _open_copy(tmp_path)
    assert find_damage(str(copy)) is None
    assert verify(copy).problems == []
    caplog.set_level(logging.WARNING)
    seg = segment_files(copy)[0]
    size = seg.stat().st_size
    store = EventStore(copy)
    await store.connect()
    assert [ev async for _, ev in store.read()] == events
    assert caplog.records == []
    assert seg.stat().st_size == size  # kept for the writer ...
    await store.save_message("new", "into the zeros", timestamp=1)
    data = seg.read_bytes()
    assert len(data) == size and frames_end(data) > end  # ... which writes into it
    await store.close()
    got = await all_events(copy)
    assert got[:-1] == events and got[-1].message == "into the zeros"


async def test_a_torn_frame_in_filled_space_is_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy, events, end = await _open_copy(tmp_path)
    seg = segment_files(copy)[0]
    data = seg.read_bytes()
    last = end - 1
    while data[last] == 0:
        last -= 1
    # Write the last frame again after itself, but only its first half: the
    # shape a crash leaves in the middle of a pwrite into filled space.
    start = max(o for o in _frame_offsets(data) if o < end)
    torn = data[start:end][: (end - start) // 2]
    with open(seg, "r+b") as f:
        f.seek(end)
        f.write(torn)
    caplog.set_level(logging.WARNING)
    assert await all_events(copy) == events
    assert "torn tail" in caplog.text


def _frame_offsets(data: bytes) -> list[int]:
    offs = []
    off = HEADER_SIZE
    end = frames_end(data)
    while off < end:
        offs.append(off)
        off += FRAME_HEADER_SIZE + struct.unpack_from("<I", data, off)[0]
    return offs


async def test_zeroed_frames_before_good_ones_are_damage(tmp_path: Path) -> None:
    copy, _events, _end = await _open_copy(tmp_path)
    seg = segment_files(copy)[0]
    data = seg.read_bytes()
    offs = _frame_offsets(data)
    victim = offs[len(offs) // 2]
    length = FRAME_HEADER_SIZE + struct.unpack_from("<I", data, victim)[0]
    with open(seg, "r+b") as f:
        f.seek(victim)
        f.write(bytes(length))  # a page of the log lost to zeros
    with pytest.raises(IntegrityError, match=f"offset {victim}"):
        await all_events(copy)
    damage = find_damage(str(copy))
    assert damage is not None and damage.offset == victim
    assert [p.offset for p in verify(copy).problems] == [victim]


async def test_a_stray_byte_in_filled_space_is_damage(tmp_path: Path) -> None:
    copy, _events, end = await _open_copy(tmp_path)
    seg = segment_files(copy)[0]
    with open(seg, "r+b") as f:
        f.seek(end + 5000)
        f.write(b"\x01")
    with pytest.raises(IntegrityError, match=f"non-zero byte follows at offset {end + 5000}"):
        await all_events(copy)
    damage = find_damage(str(copy))
    assert damage is not None and damage.offset == end
    assert "non-zero byte" in damage.reason
