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


def _half_write_the_last_two_frames(seg: Path) -> tuple[int, bytes]:
    """Take the last two frames away (zeros in their place), then put back the
    first of them half-written: the state a reader can catch mid-pwrite.
    Returns where they began and their bytes, to finish the write with."""
    data = seg.read_bytes()
    end = frames_end(data)
    a, b = _frame_offsets(data)[-2:]
    with open(seg, "r+b") as f:
        f.seek(a)
        f.write(bytes(end - a))
        f.seek(a)
        f.write(data[a : a + (b - a) // 2])
    return a, data[a:end]


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


# -- readers beside a live writer, and the rarer shapes -------------------------------------


def test_the_walker_checks_zeros_unless_a_writer_may_be_filling_them() -> None:
    from eventstore.codec import encode_batch
    from eventstore.events import MessageSaved
    from eventstore.framing import FrameWalker
    from eventstore.segment import FrameError, pack_frame_header

    buf = bytearray(FRAME_HEADER_SIZE)
    buf += encode_batch([MessageSaved(1, "u", "x")])
    pack_frame_header(buf, 0, 1, 1)
    frames, end = bytes(buf), HEADER_SIZE + len(buf)
    checked = FrameWalker(HEADER_SIZE, 1, gaps_allowed=False)
    assert len(list(checked.feed(frames + bytes(100)))) == 1
    with pytest.raises(FrameError, match="non-zero byte follows") as err:
        list(checked.feed(bytes(50) + b"\x07"))
    assert err.value.offset == end
    live = FrameWalker(HEADER_SIZE, 1, gaps_allowed=False, zeros_checked=False)
    assert len(list(live.feed(frames + bytes(100)))) == 1
    assert list(live.feed(bytes(50) + b"\x07")) == []  # the writer's new frame, perhaps
    assert live.finish() is None and live.offset == end


async def test_followers_and_verify_stop_at_the_zeros_of_a_live_writer(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d) as writer:
        await fill(writer, 30)
        seg = segment_files(d)[0]
        end = frames_end(seg.read_bytes())
        # Bytes far into the zeros, as a reader may see them when the writer
        # has written there after the reader read the zeros before them.
        with open(seg, "r+b") as f:
            f.seek(end + 3000)
            f.write(b"\x05")
        assert verify(d).problems == []  # the writer holds the lock
        async with EventStore(d, read_only=True) as reader:
            assert reader.position == writer.position == 30
            await fill(writer, 10, prefix="more")
            await reader.refresh()
            assert reader.position == 40
            assert await reader.get_recent_messages(limit=100) == await writer.get_recent_messages(
                limit=100
            )


async def test_a_follower_looks_again_when_a_frame_completes_while_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk meets a half-copied frame; by the time the tail is read again it
    is complete and another frame follows it, which looks like damage."""
    from eventstore.segmentlog import SegmentLog

    copy, events, _end = await _open_copy(tmp_path)
    seg = segment_files(copy)[0]
    a, whole = _half_write_the_last_two_frames(seg)
    real_is_torn = SegmentLog._is_torn
    calls = {"n": 0}

    def is_torn_after_the_writer_finished(self: SegmentLog, *args: object) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            with open(seg, "r+b") as f:
                f.seek(a)
                f.write(whole)
        return real_is_torn(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(SegmentLog, "_is_torn", is_torn_after_the_writer_finished)
    async with EventStore(copy, read_only=True, snapshot_every=None) as reader:
        assert calls["n"] >= 1
        assert [ev async for _, ev in reader.read()] == events


async def test_no_room_for_the_zeros_only_stops_filling_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import os

    import eventstore.segmentlog as segmentlog

    real = os.pwrite

    def no_room_for_zeros(fd: int, data: bytes | memoryview, offset: int) -> int:
        if len(data) >= 4096 and not bytes(data).strip(b"\0"):
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(segmentlog.os, "pwrite", no_room_for_zeros)
    caplog.set_level(logging.WARNING)
    d = tmp_path / "s"
    async with EventStore(d) as store:
        await fill(store, 25)
        data = segment_files(d)[0].read_bytes()
        assert len(data) == frames_end(data)  # no zeros, and no failure
    assert "cannot fill ahead" in caplog.text
    assert [e.message for e in await all_events(d)] == [f"m{i}" for i in range(25)]


async def test_a_header_torn_after_its_checksum_is_cut(tmp_path: Path) -> None:
    from eventstore.framing import _valid_frame_follows

    copy, events, end = await _open_copy(tmp_path)
    seg = segment_files(copy)[0]
    data = seg.read_bytes()
    with open(seg, "r+b") as f:
        f.seek(end)
        f.write(data[HEADER_SIZE : HEADER_SIZE + 8])  # length and checksum, no more
    tail = seg.read_bytes()[end:]
    assert len(tail) > 100_000 and not _valid_frame_follows(tail)
    assert await all_events(copy) == events


async def test_verify_calls_a_torn_frame_before_zeros_a_torn_tail(tmp_path: Path) -> None:
    copy, _events, end = await _open_copy(tmp_path)
    seg = segment_files(copy)[0]
    data = seg.read_bytes()
    start = max(o for o in _frame_offsets(data) if o < end)
    with open(seg, "r+b") as f:
        f.seek(end)
        f.write(data[start:end][: (end - start) // 2])
    [problem] = verify(copy).problems
    assert problem.offset == end and "torn tail" in problem.message


async def test_a_dry_run_compaction_does_not_count_the_zeros(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096) as store:
        await fill(store, 300)
        report = await store.compact(dry_run=True)
        files = segment_files(d)
        assert files[-1].stat().st_size > frames_end(files[-1].read_bytes())
        assert report.bytes_before == sum(frames_end(f.read_bytes()) for f in files)


# -- damage beside a live writer, and read-only openers without one ------------------------


def _flip(seg: Path, offset: int) -> None:
    with open(seg, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


async def test_verify_beside_a_live_writer_reports_damage_before_good_frames(
    tmp_path: Path,
) -> None:
    d = tmp_path / "s"
    async with EventStore(d) as writer:
        await fill(writer, 10)  # one awaited write, one frame
        seg = segment_files(d)[0]
        offs = _frame_offsets(seg.read_bytes())
        assert len(offs) == 10
        _flip(seg, offs[3] + FRAME_HEADER_SIZE + 1)  # frame 4's payload
        # Six good frames follow it: not the frame the writer is writing.
        problems = verify(d).problems
        assert [p.offset for p in problems] == [offs[3]], problems
        assert "checksum" in problems[0].message


async def test_verify_calls_a_damaged_length_with_frames_after_it_damage(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d) as store:
        await fill(store, 6)
    seg = segment_files(d)[0]
    data = seg.read_bytes()
    offs = _frame_offsets(data)
    length = struct.unpack_from("<I", data, offs[2])[0]
    with open(seg, "r+b") as f:
        f.seek(offs[2])
        f.write(struct.pack("<I", length + 65536))  # now runs past the end
    [problem] = verify(d).problems
    assert problem.offset == offs[2] and "torn tail" not in problem.message
    with pytest.raises(IntegrityError, match=f"offset {offs[2]}"):
        await all_events(d)
    assert (
        seg.read_bytes()
        == data[: offs[2]] + struct.pack("<I", length + 65536) + data[offs[2] + 4 :]
    )  # refused, nothing cut


async def test_a_reader_without_a_writer_reports_frames_hidden_behind_zeros(
    tmp_path: Path,
) -> None:
    copy, _events, _end = await _open_copy(tmp_path, n=6)
    seg = segment_files(copy)[0]
    data = seg.read_bytes()
    offs = _frame_offsets(data)
    victim = offs[3]
    with open(seg, "r+b") as f:
        f.seek(victim)
        f.write(bytes(offs[4] - victim))  # frame 4 lost to zeros; 5 and 6 intact
    with pytest.raises(IntegrityError, match=f"offset {victim}"):
        await all_events(copy, read_only=True)


async def test_verify_looks_again_when_a_frame_completes_while_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for followers: verify meets a half-copied frame of the live writer,
    which is complete, with another after it, when verify reads the tail."""
    from eventstore import verify as verify_mod

    d = tmp_path / "s"
    async with EventStore(d) as writer:
        await fill(writer, 30)
        seg = segment_files(d)[0]
        a, whole = _half_write_the_last_two_frames(seg)
        real = verify_mod.is_torn_tail
        calls = {"n": 0}

        def torn_after_the_writer_finished(tail: bytes, err: object) -> bool:
            calls["n"] += 1
            if calls["n"] == 1:
                with open(seg, "r+b") as f:
                    f.seek(a)
                    f.write(whole)
                tail = seg.read_bytes()[a:]
            return real(tail, err)  # type: ignore[arg-type]

        monkeypatch.setattr(verify_mod, "is_torn_tail", torn_after_the_writer_finished)
        seen: list[tuple[int, int]] = []
        report = verify(d, progress=lambda done, total: seen.append((done, total)))
        assert calls["n"] >= 1
        # Bytes read again after the look are not counted twice.
        assert seen and all(done <= total for done, total in seen), seen[-3:]
        assert report.problems == []
        assert report.events == 30 and report.last_position == 30


async def test_verify_reads_no_more_than_a_frame_can_hold_for_a_damaged_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from eventstore import verify as verify_mod
    from eventstore.segment import MAX_FRAME_PAYLOAD

    d = tmp_path / "s"
    async with EventStore(d) as writer:  # a live writer: verify looks again at errors
        await fill(writer, 6)
        seg = segment_files(d)[0]
        offs = _frame_offsets(seg.read_bytes())
        with open(seg, "r+b") as f:
            f.seek(offs[2])
            f.write(struct.pack("<I", 0xFFFFFFF0))  # frames after it are good
        asked: list[int] = []
        real = os.pread

        def pread(fd: int, n: int, offset: int) -> bytes:
            asked.append(n)
            return real(fd, n, offset)

        monkeypatch.setattr(verify_mod.os, "pread", pread)
        problems = verify(d).problems
        monkeypatch.undo()
    assert [p.offset for p in problems] == [offs[2]]
    assert max(asked) <= max(MAX_FRAME_PAYLOAD, 4 * 1024 * 1024)
