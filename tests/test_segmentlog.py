"""The segment-file log: format, rolls, recovery, repair, locking, readers, errors."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import re
import stat
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from storeutil import all_events, copy_store, fill, segment_files

from eventstore import ConnectionError, EventStore, IntegrityError, QueryError, StorageError
from eventstore.events import SCHEMA_FINGERPRINT, MessageSaved
from eventstore.recovery import find_damage, repair
from eventstore.segment import FRAME_HEADER_SIZE, HEADER_SIZE, MAGIC, MAX_FRAME_PAYLOAD
from eventstore.segmentlog import Segment, SegmentLog


async def test_creates_directory_owner_only(tmp_path: Path) -> None:
    d = tmp_path / "new" / "store"
    async with EventStore(d) as store:
        await store.save_message("alice", "hi")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    files = segment_files(d)
    assert len(files) == 1
    assert files[0].name == "00000000000000000001.seg"
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600


async def test_segment_header_bytes(tmp_path: Path) -> None:
    async with EventStore(tmp_path / "s") as store:
        await store.save_message("alice", "hi", timestamp=5)
    data = segment_files(tmp_path / "s")[0].read_bytes()
    assert data[:8] == MAGIC
    version, flags, first = struct.unpack_from("<HHQ", data, 8)
    assert (version, flags, first) == (1, 0, 1)
    assert data[20:28] == SCHEMA_FINGERPRINT
    store_id = data[28:44]
    assert len(set(store_id)) > 1  # random, not a constant
    assert struct.unpack_from("<I", data, 44)[0] == zlib.crc32(data[:44])
    length, _crc, pos, count = struct.unpack_from("<IIQI", data, HEADER_SIZE)
    assert (pos, count) == (1, 1)
    assert len(data) == HEADER_SIZE + FRAME_HEADER_SIZE + length


async def test_rolls_segments_and_replays_across_them(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=2048) as store:
        await fill(store, 300)
    files = segment_files(d)
    assert len(files) > 5
    # Names are first positions; each header agrees with its name.
    for f in files:
        first = struct.unpack_from("<Q", f.read_bytes(), 12)[0]
        assert f.name == f"{first:020d}.seg"
    async with EventStore(d, segment_size=2048) as store:
        msgs = await store.get_recent_messages(limit=1000)
        assert [m["message"] for m in msgs] == [f"m{i}" for i in reversed(range(300))]
        assert [m["id"] for m in msgs] == list(reversed(range(1, 301)))


async def test_group_commit_puts_concurrent_writes_in_one_frame(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d) as store:
        await asyncio.gather(*(store.save_message("u", f"m{i}") for i in range(50)))
    data = segment_files(d)[0].read_bytes()
    frames = []
    off = HEADER_SIZE
    while off < len(data):
        length, _crc, _pos, count = struct.unpack_from("<IIQI", data, off)
        frames.append(count)
        off += FRAME_HEADER_SIZE + length
    assert sum(frames) == 50
    assert len(frames) < 50  # some writes shared a frame (and an fsync)


@pytest.mark.parametrize("durability", ["fsync", "flush", "none"])
async def test_every_mode_keeps_everything_across_close(tmp_path: Path, durability: str) -> None:
    d = tmp_path / durability
    async with EventStore(d, durability=durability, segment_size=4096) as store:  # type: ignore[arg-type]
        await fill(store, 200)
        await asyncio.gather(*(store.save_message("x", f"c{i}") for i in range(100)))
    events = await all_events(d)
    assert len(events) == 300


async def test_read_sees_unwritten_events_in_order(tmp_path: Path) -> None:
    async with EventStore(tmp_path / "s", durability="none") as store:
        await fill(store, 10)
        got = [(p, ev.message) async for p, ev in store.read()]
        assert got == [(i + 1, f"m{i}") for i in range(10)]
        assert [m["message"] for m in await store.get_recent_messages(limit=3)] == [
            "m9",
            "m8",
            "m7",
        ]


# -- recovery -----------------------------------------------------------------------


async def _small_store(tmp_path: Path, n: int = 40) -> tuple[Path, list[MessageSaved]]:
    d = tmp_path / "orig"
    async with EventStore(d, segment_size=1024) as store:
        await fill(store, n)
    events = await all_events(d)
    return d, events


async def test_truncation_at_every_offset_of_last_segment_recovers_a_prefix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d, events = await _small_store(tmp_path)
    last = segment_files(d)[-1]
    full = last.read_bytes()
    first_in_last = struct.unpack_from("<Q", full, 12)[0]
    for cut in range(len(full)):
        work = copy_store(d, tmp_path / f"cut{cut}")
        (work / last.name).write_bytes(full[:cut])
        store = EventStore(work)
        await store.connect()
        got = [ev async for _, ev in store.read()]
        # A prefix, and at least everything before the damaged segment.
        assert got == events[: len(got)]
        assert len(got) >= first_in_last - 1
        # The store takes new writes after recovery.
        await store.save_message("after", "crash", timestamp=1)
        await store.close()
        again = await all_events(work)
        assert again[:-1] == got and again[-1].message == "crash"
    assert "torn tail" in caplog.text


async def test_torn_tail_is_cut_and_logged_with_byte_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d, events = await _small_store(tmp_path)
    last = segment_files(d)[-1]
    size = last.stat().st_size
    with open(last, "r+b") as f:
        f.truncate(size - 3)
    caplog.set_level(logging.WARNING)
    got = await all_events(d)
    assert got == events[:-1]
    assert any("torn tail" in r.message for r in caplog.records)
    assert last.stat().st_size < size - 3  # the partial frame is gone from disk


async def test_zeros_after_last_frame_are_skipped_then_cut_on_close(tmp_path: Path) -> None:
    d, events = await _small_store(tmp_path)
    last = segment_files(d)[-1]
    size = last.stat().st_size
    with open(last, "ab") as f:
        f.write(b"\0" * 4096)
    assert await all_events(d) == events
    assert last.stat().st_size == size


def _frame_offsets(data: bytes) -> list[int]:
    offs = []
    off = HEADER_SIZE
    while off + FRAME_HEADER_SIZE <= len(data):
        offs.append(off)
        off += FRAME_HEADER_SIZE + struct.unpack_from("<I", data, off)[0]
    return offs


async def test_flipped_byte_in_an_earlier_frame_raises_with_file_and_offset(
    tmp_path: Path,
) -> None:
    d, events = await _small_store(tmp_path)
    files = segment_files(d)
    # Every byte of the first frame of the first (sealed) segment, and of an
    # earlier frame of the last segment.
    targets = []
    data0 = files[0].read_bytes()
    off0 = _frame_offsets(data0)[0]
    targets += [(files[0], off0, off0 + i) for i in range(FRAME_HEADER_SIZE + 4)]
    data_last = files[-1].read_bytes()
    offs = _frame_offsets(data_last)
    assert len(offs) >= 2
    targets += [(files[-1], offs[0], offs[0] + i) for i in range(FRAME_HEADER_SIZE + 4)]
    for n, (path, frame_off, byte) in enumerate(targets):
        work = copy_store(d, tmp_path / f"flip{n}")
        target = work / path.name
        data = bytearray(target.read_bytes())
        data[byte] ^= 0x40
        target.write_bytes(bytes(data))
        with pytest.raises(IntegrityError) as info:
            await all_events(work)
        assert path.name in str(info.value)
        assert f"offset {frame_off}" in str(info.value)
        # find_damage agrees, and repair then opens to a prefix.
        damage = find_damage(str(work))
        assert damage is not None and damage.offset == frame_off
        report = repair(str(work))
        assert report.repaired
        assert (work / (path.name + ".broken")).exists()
        got = await all_events(work)
        assert got == events[: len(got)]
        assert find_damage(str(work)) is None


async def test_repair_makes_its_copy_durable_before_it_cuts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a power cut during repair, the bytes it removes must still be in
    the .broken copy: the copy and its name are synced before the cut."""
    from eventstore import recovery

    d, _events = await _small_store(tmp_path)
    target = segment_files(d)[0]
    data = bytearray(target.read_bytes())
    offset = _frame_offsets(bytes(data))[1]
    data[offset + FRAME_HEADER_SIZE] ^= 0x40
    target.write_bytes(bytes(data))
    synced: list[tuple[str, int]] = []
    real_fsync, real_fsync_dir = os.fsync, recovery.fsync_dir

    def fsync(fd: int) -> None:  # os.fsync itself: fsync_dir's own calls come here too
        real_fsync(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not os.path.isdir(path):
            synced.append((os.path.basename(path), target.stat().st_size))

    def fsync_dir(path: str) -> None:
        real_fsync_dir(path)
        synced.append(("<dir>", target.stat().st_size))

    monkeypatch.setattr(recovery.os, "fsync", fsync)
    monkeypatch.setattr(recovery, "fsync_dir", fsync_dir)
    report = recovery.repair(str(d))
    assert report.damage is not None and report.damage.offset == offset
    whole = len(data)
    synced = [(name, size) for name, size in synced if not name.startswith("CUTS")]
    assert synced[:3] == [
        (target.name + ".broken", whole),  # the copy, while the original is whole
        ("<dir>", whole),  # and its name
        (target.name, offset),  # only then the cut original
    ]


async def test_a_repair_that_cannot_copy_aside_leaves_no_partial_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No room for the copy of the damaged segment (ENOSPC half-way): repair
    cuts nothing, says so, and removes its partial copy.  Left behind, it
    would pass for the bytes repair keeps, hold the space it took, and push
    the next repair's copy to .broken.1."""
    import shutil

    from eventstore import recovery

    d, _events = await _small_store(tmp_path)
    target = segment_files(d)[0]
    data = bytearray(target.read_bytes())
    data[_frame_offsets(bytes(data))[1] + FRAME_HEADER_SIZE] ^= 0x40
    target.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    real_copy = shutil.copyfileobj

    def copy_then_full(src: object, dst: object, length: int = 0) -> None:
        dst.write(src.read(100))  # type: ignore[attr-defined]
        dst.flush()  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(recovery.shutil, "copyfileobj", copy_then_full)
    with pytest.raises(StorageError, match=r"cannot copy it aside to .*\.broken .*No sp.*nothing"):
        recovery.repair(str(d))
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    monkeypatch.setattr(recovery.shutil, "copyfileobj", real_copy)
    report = recovery.repair(str(d))  # with room again
    segments = sorted(n for n in before if n.endswith(".seg"))
    assert [Path(p).name for p in report.set_aside] == [f"{n}.broken" for n in segments]
    assert (d / (target.name + ".broken")).read_bytes() == bytes(data)


async def test_a_second_repair_keeps_the_copies_of_the_first(tmp_path: Path) -> None:
    """Repairing the same segment again must not write over the first repair's
    copies: the events that repair cut are in no other file.  Neither must the
    later segments' renames, whose names the log uses again after the cut."""
    from eventstore.inspect import store_info
    from eventstore.verify import verify

    d, _events = await _small_store(tmp_path)
    target = segment_files(d)[0]

    def damage_second_frame() -> dict[str, bytes]:
        data = bytearray(target.read_bytes())
        data[_frame_offsets(bytes(data))[1] + FRAME_HEADER_SIZE] ^= 0x40
        target.write_bytes(bytes(data))
        return {p.name: p.read_bytes() for p in segment_files(d)}

    before_first = damage_second_frame()
    first = repair(str(d))
    assert first.repaired
    assert [Path(p).name for p in first.set_aside] == [f"{n}.broken" for n in before_first]
    # The log goes on from the cut, through the same segment names.
    async with EventStore(d, segment_size=1024) as store:
        await fill(store, 40, prefix="n")
    before_second = damage_second_frame()
    assert len(set(before_first) & set(before_second)) >= 2
    second = repair(str(d))
    assert second.repaired
    assert [Path(p).name for p in second.set_aside] == [
        f"{n}.broken.1" if n in before_first else f"{n}.broken" for n in before_second
    ]
    for name, data in before_first.items():
        assert (d / f"{name}.broken").read_bytes() == data
    for path in second.set_aside:
        copy = Path(path)
        assert copy.read_bytes() == before_second[copy.name.split(".broken")[0]]
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    # Still files beside the log, not part of it.
    aside = sorted(Path(p).name for p in first.set_aside + second.set_aside)
    assert store_info(d).other_files == aside
    report = verify(d)
    assert report.ok
    assert any(all(name in note for name in aside) for note in report.notes)
    assert await all_events(d) == [MessageSaved(1000, "user0", "m0")]


async def test_repair_on_a_healthy_store_changes_nothing(tmp_path: Path) -> None:
    d, _events = await _small_store(tmp_path)
    before = {p.name: p.read_bytes() for p in segment_files(d)}
    report = repair(str(d))
    assert not report.repaired
    assert {p.name: p.read_bytes() for p in segment_files(d)} == before


async def test_frame_length_over_the_cap_is_rejected_before_reading(tmp_path: Path) -> None:
    d, _ = await _small_store(tmp_path)
    first = segment_files(d)[0]
    data = bytearray(first.read_bytes())
    struct.pack_into("<I", data, HEADER_SIZE, MAX_FRAME_PAYLOAD + 1)
    first.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="exceeds the cap"):
        await all_events(d)


async def test_bad_magic_is_an_integrity_error(tmp_path: Path) -> None:
    d, _ = await _small_store(tmp_path)
    first = segment_files(d)[0]
    data = bytearray(first.read_bytes())
    data[0] ^= 1
    first.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="not a segment file"):
        await all_events(d)


async def test_segment_of_another_store_is_refused(tmp_path: Path) -> None:
    a, _ = await _small_store(tmp_path)
    b = tmp_path / "b"
    async with EventStore(b, segment_size=1024) as store:
        await fill(store, 40, prefix="b")
    # Slip b's last segment into a, as if files were mixed up by hand.
    last_a = segment_files(a)[-1]
    last_b = segment_files(b)[-1]
    last_a.unlink()
    (a / last_b.name).write_bytes(last_b.read_bytes())
    with pytest.raises(IntegrityError, match="another store"):
        await all_events(a)
    damage = find_damage(str(a))
    assert damage is not None and "another store" in damage.reason


async def test_stray_files_are_ignored_and_unfinished_rolls_removed(tmp_path: Path) -> None:
    d, events = await _small_store(tmp_path)
    (d / "notes.txt").write_text("operator notes")
    (d / "00000000000000000999.seg.tmp").write_bytes(b"partial")
    assert await all_events(d) == events
    assert (d / "notes.txt").exists()
    assert not (d / "00000000000000000999.seg.tmp").exists()


# -- one writer, many readers ----------------------------------------------------------


async def test_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d):
        other = EventStore(d)
        with pytest.raises(ConnectionError, match=f"process {os.getpid()}"):
            await other.connect()
        assert not other.is_connected
    # Released on close: the next writer gets in.
    async with EventStore(d) as again:
        assert again.is_connected


async def test_reader_opens_beside_a_writer_and_rejects_writes(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d) as writer:
        await fill(writer, 5)
        async with EventStore(d, read_only=True) as reader:
            assert len(await reader.get_recent_messages()) == 5
            with pytest.raises(ConnectionError, match="read-only"):
                await reader.save_message("x", "y")
            await fill(writer, 7, prefix="later")
            assert await reader.refresh() == 7
            assert await reader.get_recent_messages(limit=100) == await writer.get_recent_messages(
                limit=100
            )


async def test_reader_of_missing_directory_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConnectionError, match="no such store directory"):
        await EventStore(tmp_path / "nope", read_only=True).connect()
    assert not (tmp_path / "nope").exists()


async def test_following_reader_converges_across_rolls(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024) as writer:
        await fill(writer, 3)
        async with EventStore(d, read_only=True, follow=0.02) as reader:
            for round_ in range(5):
                await fill(writer, 30, prefix=f"r{round_}-")
                await writer.update_channel_stats(max_users=round_ + 1)
                await writer.save_user_stats(f"user{round_}", chat_lines=round_)
                await asyncio.sleep(0.05)
            for _ in range(100):
                if reader.position == writer.position:
                    break
                await asyncio.sleep(0.02)
            assert reader.projections.state() == writer.projections.state()
            assert await reader.get_recent_messages(limit=500) == await writer.get_recent_messages(
                limit=500
            )


@pytest.mark.parametrize("first_cancelled", [False, True])
async def test_a_refresh_reads_what_was_on_disk_when_it_was_called(
    tmp_path: Path, first_cancelled: bool
) -> None:
    """A refresh() made while another's look was under way used to share that
    look, which may have measured the files before the writer's last write:
    it returned with the reader behind the disk (the follow task looking
    while the caller flushed a "none" writer and refreshed).  Likewise when
    the refresh that began the look was cancelled and its look went on."""
    d = tmp_path / "s"
    async with EventStore(d) as writer:
        await writer.save_message("a", "one")
        async with EventStore(d, read_only=True) as reader:
            log = reader.log
            real = log._refresh_files  # type: ignore[attr-defined]
            measured, release = threading.Event(), threading.Event()

            def first_look_files() -> None:  # measures the files, then waits
                log._refresh_files = real  # type: ignore[attr-defined]
                real()
                measured.set()
                release.wait(5)

            log._refresh_files = first_look_files  # type: ignore[attr-defined]
            first = asyncio.ensure_future(reader.refresh())
            assert await asyncio.to_thread(measured.wait, 5)
            if first_cancelled:
                first.cancel()
            await writer.save_message("a", "two")  # "fsync": on disk from here on
            second = asyncio.ensure_future(reader.refresh())
            await asyncio.sleep(0.01)  # under way beside the first look
            release.set()
            await asyncio.gather(first, second, return_exceptions=True)
            assert not second.cancelled() and second.exception() is None
            assert reader.position == writer.position == 2
            assert [m["message"] for m in await reader.get_recent_messages()] == ["two", "one"]


async def test_a_reader_refuses_frames_taken_back_under_it(tmp_path: Path) -> None:
    """A writer whose write fails truncates the round's frames, which a reader
    may have read already; new frames of the same size then take their place.
    Reading on would keep events the log no longer holds."""
    d = tmp_path / "s"
    async with EventStore(d, durability="flush") as writer:
        await fill(writer, 10)  # one frame each
    seg = segment_files(d)[0]
    data = seg.read_bytes()
    offsets = [HEADER_SIZE]
    while offsets[-1] < len(data):
        offsets.append(
            offsets[-1] + FRAME_HEADER_SIZE + struct.unpack_from("<I", data, offsets[-1])[0]
        )
    reader = EventStore(d, read_only=True, snapshot_every=None)
    await reader.connect()
    try:
        assert reader.position == 10
        with open(seg, "r+b") as f:
            f.truncate(offsets[5])  # positions 6..10 taken back
        async with EventStore(d, durability="flush", snapshot_every=None) as writer:
            assert writer.position == 5
            await fill(writer, 8, prefix="x")  # 6..13, frames of the same sizes
        with pytest.raises(IntegrityError, match=r"offset \d+, already read, has changed"):
            await reader.refresh()
    finally:
        await reader.close()
    async with EventStore(d, read_only=True) as again:  # opened anew, it reads the log as it is
        assert [e.message for _, e in [x async for x in again.read()]][5:] == [
            f"x{i}" for i in range(8)
        ]


async def test_following_stops_once_with_an_error_when_frames_are_taken_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "s"
    async with EventStore(d, durability="flush") as writer:
        await fill(writer, 10)
    seg = segment_files(d)[0]
    first_frame = FRAME_HEADER_SIZE + struct.unpack_from("<I", seg.read_bytes(), HEADER_SIZE)[0]
    caplog.set_level(logging.WARNING)
    async with EventStore(d, read_only=True, follow=0.01, snapshot_every=None) as reader:
        with open(seg, "r+b") as f:
            f.truncate(HEADER_SIZE + first_frame)  # all but the first event taken back
        async with EventStore(d, durability="flush", snapshot_every=None) as writer:
            await fill(writer, 12, prefix="y")
        await asyncio.sleep(0.2)  # about 20 intervals
        assert reader.position == 10  # what it had read; the rest is refused
    stops = [r for r in caplog.records if "follow stopped" in r.getMessage()]
    assert len(stops) == 1 and "changed or is gone" in stops[0].getMessage()
    assert not [r for r in caplog.records if "refresh failed" in r.getMessage()]


async def test_a_reader_goes_on_across_the_writer_cutting_its_zeros(tmp_path: Path) -> None:
    d = tmp_path / "s"
    writer = EventStore(d)  # "fsync": zeros after the last frame while open
    await writer.connect()
    await fill(writer, 5)
    async with EventStore(d, read_only=True) as reader:
        assert reader.position == 5
        await writer.close()  # cuts the zeros
        async with EventStore(d) as again:
            await fill(again, 3, prefix="later")
        assert await reader.refresh() == 3


# -- bad conditions --------------------------------------------------------------------


class _DiskFull:
    """Stands in for os.pwrite: writes part of a buffer, then reports ENOSPC."""

    def __init__(self, after_bytes: int) -> None:
        self.budget = after_bytes
        self.real = os.pwrite

    def __call__(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(len(data), self.budget)
        self.budget -= n
        return self.real(fd, bytes(data[:n]), offset)


@pytest.mark.parametrize("durability", ["fsync", "flush"])
async def test_disk_full_fails_the_writes_and_loses_nothing_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    import eventstore.segmentlog as segmentlog

    d = tmp_path / "s"
    store = EventStore(d, durability=durability, segment_size=2048)  # type: ignore[arg-type]
    await store.connect()
    await fill(store, 30)
    acknowledged = 30
    full = _DiskFull(after_bytes=700)
    monkeypatch.setattr(segmentlog.os, "pwrite", full)
    failures = 0
    for i in range(100):
        try:
            await store.save_message("late", f"l{i}", timestamp=5000 + i)
            acknowledged += 1
        except StorageError as err:
            failures += 1
            assert "No space left" in str(err) or "stopped" in str(err)
    assert failures > 0
    # The store refuses further work instead of pretending.
    with pytest.raises(ConnectionError):
        await store.get_recent_messages()
    await store.close()
    monkeypatch.setattr(segmentlog.os, "pwrite", full.real)
    events = await all_events(d)
    assert len(events) == acknowledged
    assert [e.message for e in events[30:]] == [f"l{i}" for i in range(acknowledged - 30)]
    # And the recovered store is writable again.
    async with EventStore(d, segment_size=2048) as store:
        await store.save_message("back", "again")
        assert (await store.get_recent_messages(limit=1))[0]["message"] == "again"
    assert find_damage(str(d)) is None


@pytest.mark.parametrize("durability", ["none", "flush", "fsync"])
async def test_an_event_that_cannot_be_encoded_fails_its_round_not_the_writer(
    tmp_path: Path, durability: str
) -> None:
    """The store checks events before they reach the log; a direct caller of
    submit() may not.  Such an event fails its round like a failed write
    (every caller of the round gets StorageError, none is left waiting),
    close() releases the lock, and the log opens again with what was durable."""
    d = tmp_path / "s"
    store = EventStore(d, durability=durability, snapshot_every=None)  # type: ignore[arg-type]
    await store.connect()
    await store.save_message("a", "before", timestamp=1)
    await store.log.flush()
    good = asyncio.create_task(store.save_message("a", "same round", timestamp=2))
    _first, bad = store.log.submit([MessageSaved(2**64, "a", "too big for msgpack")])
    results = await asyncio.wait_for(
        asyncio.gather(good, bad, store.log.flush(), return_exceptions=True), timeout=5
    )
    if durability == "none":
        # Acknowledged at once, as "none" promises; the failure stops the store.
        assert results[0] is None
        with pytest.raises(StorageError, match="cannot encode an event"):
            await store.save_message("a", "after", timestamp=3)
        with pytest.raises(ConnectionError, match="stopped after a failed write"):
            await store.save_message("a", "after", timestamp=3)
        # Nobody waited for them: close() says so.
        with pytest.raises(StorageError, match="2 accepted events were not written"):
            await store.close()
    else:
        assert all(isinstance(r, StorageError) for r in results[:2]), results
        assert "cannot encode an event" in str(results[1])
        await store.close()
    events = await all_events(d)
    assert [e.message for e in events] == ["before"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("durability", ["none", "flush", "fsync"])
async def test_close_raises_when_it_cannot_make_the_last_writes_durable(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    durability: str,
) -> None:
    """In "flush" and "none" mode the fsync of close() is the only one: when
    it fails, close() raises (as file.close() does when its flush fails),
    after releasing everything.  In "fsync" mode every write was synced
    already: only cutting the zeros after the last frame failed, a warning."""
    import eventstore.segmentlog as segmentlog

    d = tmp_path / "s"
    store = EventStore(d, durability=durability, snapshot_every=None)  # type: ignore[arg-type]
    await store.connect()
    await fill(store, 10)
    await store.log.flush()

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(segmentlog.os, "fdatasync", eio)
    if durability == "fsync":
        await store.close()
        assert "cannot cut the zeros after the last frame: Input/output error" in caplog.text
    else:
        with pytest.raises(StorageError, match="cannot make the last writes durable: Input/out"):
            await store.close()
    monkeypatch.undo()
    assert not store.is_connected
    async with EventStore(d, snapshot_every=None) as again:  # the lock was released
        assert again.position == 10


@pytest.mark.parametrize("durability", ["flush", "none"])
async def test_a_failed_fsync_is_not_retried_into_a_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """fsyncgate: in "flush" and "none" mode the fdatasync that seals the
    active segment before a roll (compact, forget_user) is the first to cover
    the writes acknowledged so far.  After it fails (EIO) the kernel may have
    dropped those pages, and a later fdatasync that succeeds proves nothing.
    The log must stop, and close() must not report the writes durable."""
    import eventstore.segmentlog as segmentlog

    d = tmp_path / "s"
    store = EventStore(d, durability=durability, snapshot_every=None)  # type: ignore[arg-type]
    await store.connect()
    await fill(store, 10)
    await store.log.flush()
    real = os.fdatasync
    calls: list[int] = []

    def eio_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(segmentlog.os, "fdatasync", eio_once)
    with pytest.raises(StorageError, match="fdatasync failed"):
        await store.compact()  # rolls first: seals, and its fdatasync fails
    with pytest.raises(StorageError, match="fdatasync failed"):
        await store.save_message("a", "after", timestamp=5000)
        await store.log.flush()
    with pytest.raises(StorageError, match="cannot make the last writes durable: an fdatasync"):
        await store.close()
    assert len(calls) == 1  # never tried again
    monkeypatch.undo()
    async with EventStore(d, snapshot_every=None) as again:  # the lock was released
        assert again.position == 10


@pytest.mark.parametrize("durability", ["flush", "none"])
async def test_close_after_a_failed_write_still_syncs_what_was_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """A write that fails (a full disk) stops the store; its close() still
    owes the writes acknowledged before it the fsync that "flush" and "none"
    leave to close() (README: close() always fsyncs)."""
    import eventstore.segmentlog as segmentlog

    d = tmp_path / "s"
    store = EventStore(d, durability=durability, snapshot_every=None)  # type: ignore[arg-type]
    await store.connect()
    await fill(store, 10)
    await store.log.flush()
    monkeypatch.setattr(segmentlog.os, "pwrite", _DiskFull(after_bytes=0))
    with pytest.raises(StorageError, match="No space left"):
        await store.save_message("a", "fails", timestamp=5000)
        await store.log.flush()
    monkeypatch.undo()
    real = os.fdatasync
    synced: list[str] = []

    def fdatasync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(segmentlog.os, "fdatasync", fdatasync)
    if durability == "none":
        with pytest.raises(StorageError, match="1 accepted events were not written"):
            await store.close()
    else:
        await store.close()
    assert synced == [str(segment_files(d)[-1])]
    monkeypatch.undo()
    assert [e.message for e in await all_events(d)] == [f"m{i}" for i in range(10)]  # type: ignore[attr-defined]


async def test_close_that_cannot_sync_after_none_mode_lost_writes_says_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "none" mode accepted an event it then could not write (a full disk),
    and close()'s fsync, which d526f79 made it try after a failed write,
    fails too: its error must still say the accepted events were lost (it
    replaced that message)."""
    import eventstore.segmentlog as segmentlog

    d = tmp_path / "s"
    store = EventStore(d, durability="none", snapshot_every=None)
    await store.connect()
    await fill(store, 10)
    await store.log.flush()
    monkeypatch.setattr(segmentlog.os, "pwrite", _DiskFull(after_bytes=0))
    await store.save_message("a", "lost", timestamp=5000)  # accepted at once
    with pytest.raises(StorageError, match="No space left"):
        await store.log.flush()

    def fdatasync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segmentlog.os, "fdatasync", fdatasync)
    with pytest.raises(StorageError, match="cannot make the last writes durable") as info:
        await store.close()
    assert "1 accepted events were not written" in str(info.value)
    monkeypatch.undo()


async def test_after_none_mode_failed_to_write_compact_and_snapshot_refuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "none" acknowledges at once, so the store hears of a failed write only
    at its next write.  compact() and write_snapshot() before that must not
    treat the stopped log as sound: flush() used to return with the accepted
    events unwritten, and compact() rolled and rewrote the segments of a
    log that had stopped, then failed on its snapshot with "position N is
    not in the log"."""
    import eventstore.segmentlog as segmentlog

    d = tmp_path / "s"
    store = EventStore(d, durability="none", snapshot_every=None)
    await store.connect()
    for i in range(20):
        await store.save_user_stats("a", chat_lines=1, last_seen=1000 + i)
    await store.log.flush()
    before = {p.name: p.read_bytes() for p in segment_files(d)}
    monkeypatch.setattr(segmentlog.os, "pwrite", _DiskFull(after_bytes=0))
    for i in range(5):
        await store.save_message("a", f"late {i}", timestamp=2000 + i)
    with pytest.raises(StorageError, match="No space left"):
        await store.log.flush()  # waits for the writer's round, which fails
    monkeypatch.undo()
    with pytest.raises(ConnectionError, match="the log stopped after a failed write"):
        await store.log.flush()  # the five will never be written
    with pytest.raises(ConnectionError, match="the log stopped after a failed write"):
        await store.compact()
    with pytest.raises(ConnectionError, match="the log stopped after a failed write"):
        await store.write_snapshot()
    assert {p.name: p.read_bytes() for p in segment_files(d)} == before
    with pytest.raises(StorageError, match="5 accepted events were not written"):
        await store.close()
    async with EventStore(d, snapshot_every=None) as again:
        assert again.position == 20


async def test_close_releases_the_lock_when_closing_the_segment_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close(2) may report a write-back error (NFS does).  After the fsync
    succeeded, close() must still release every file and the lock: an
    OSError there left the lock held until the process ended, and every
    later connect() was refused as another writer."""
    import eventstore.segmentlog as segmentlog

    d = tmp_path / "s"
    store = EventStore(d, durability="flush", snapshot_every=None)
    await store.connect()
    await fill(store, 3)
    wfd = store.log._wfd  # type: ignore[attr-defined]
    real_close = os.close

    def close(fd: int) -> None:
        real_close(fd)
        if fd == wfd:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(segmentlog.os, "close", close)
    await store.close()
    monkeypatch.undo()
    async with EventStore(d, snapshot_every=None) as again:
        assert again.position == 3


async def test_close_raises_when_none_mode_lost_accepted_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "none" acknowledges at once; if the writer then fails, nobody has heard
    of the events it could not write until close() says how many."""
    import eventstore.segmentlog as segmentlog

    d = tmp_path / "s"
    store = EventStore(d, durability="none", snapshot_every=None)
    await store.connect()
    await store.save_message("a", "early", timestamp=1)
    await store.log.flush()
    for i in range(5):
        await store.save_message("a", f"late {i}", timestamp=10 + i)
    monkeypatch.setattr(segmentlog.os, "pwrite", _DiskFull(after_bytes=0))
    with pytest.raises(StorageError, match=r"5 accepted events were not written: .*No space left"):
        await store.close()
    monkeypatch.undo()
    assert [e.message for e in await all_events(d)] == ["early"]  # type: ignore[attr-defined]


async def test_a_roll_that_fails_after_its_rename_leaves_no_segment_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory fsync of a roll fails after the new segment got its name:
    the round fails, and the new (empty) segment goes too.  Left behind, it
    would be named after positions the round never wrote, and the next open
    would skip to them, leaving a gap of missing positions."""
    import eventstore.segmentlog as segmentlog

    d = tmp_path / "s"
    store = EventStore(d, segment_size=4096, snapshot_every=None)
    await store.connect()
    await fill(store, 5)

    def eio(path: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(segmentlog, "fsync_dir", eio)
    with pytest.raises(StorageError):
        # 150 events: frames of 64, the third one starts a new segment.
        await store.append([MessageSaved(100 + i, "b", "x" * 20) for i in range(150)])
    monkeypatch.undo()
    await store.close()
    assert [p.name for p in segment_files(d)] == ["00000000000000000001.seg"]
    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        assert store.position == 5
        await store.save_message("c", "after", timestamp=999)
        assert store.position == 6
    assert [e.message for e in await all_events(d)] == [f"m{i}" for i in range(5)] + ["after"]  # type: ignore[attr-defined]
    assert find_damage(str(d)) is None


async def test_an_empty_last_segment_that_skips_positions_is_removed_on_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Should one be left anyway (its clean-up failed too), the next writer
    removes it: it holds no event, and writing into it would leave a gap."""
    from eventstore.segment import pack_header

    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        await fill(store, 5)
        store_id = store.log.store_id  # type: ignore[attr-defined]
    orphan = d / "00000000000000000134.seg"
    orphan.write_bytes(pack_header(134, store_id))
    with caplog.at_level(logging.WARNING, logger="eventstore"):
        async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
            assert store.position == 5
            await store.save_message("c", "after", timestamp=999)
            assert store.position == 6
    assert "removed an empty segment that does not follow on" in caplog.text
    assert not orphan.exists()
    assert len(await all_events(d)) == 6
    assert find_damage(str(d)) is None
    # An empty last segment that does follow on (a close right after a roll) stays.
    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        await store.log.roll()  # type: ignore[attr-defined]
    files = segment_files(d)
    assert len(files) == 2 and files[-1].stat().st_size == HEADER_SIZE
    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        assert store.position == 6
    assert segment_files(d) == files


async def test_sparse_frame_index_finds_every_event(tmp_path: Path) -> None:
    """One frame per event (one awaiting writer): the index keeps about one
    entry per 4 KiB, and every event is still found by position."""
    import random

    from eventstore.segmentlog import SegmentLog

    d = tmp_path / "s"
    n = 3000
    async with EventStore(d, durability="flush", segment_size=64 * 1024) as store:
        for i in range(n):
            await store.log_user_action(f"user{i % 13}", "join", details=f"d{i}", timestamp=i)
    for snapshot_used in (True, False):
        if not snapshot_used:
            for f in d.glob("snapshot-*"):
                f.unlink()
        async with EventStore(d, segment_size=64 * 1024, snapshot_every=None) as store:
            log = store.log
            assert isinstance(log, SegmentLog)
            frames = n  # one event per frame
            entries = sum(len(seg.frame_pos) for seg in log.segments if seg.indexed)
            assert entries < frames / 20
            rng = random.Random(1)
            positions = rng.sample(range(1, n + 1), 300)
            events = await log.fetch(positions)
            assert [ev.details for ev in events] == [f"d{p - 1}" for p in positions]  # type: ignore[union-attr]
            rows = await store.get_user_actions(username="user5", limit=1000)
            assert [r["details"] for r in rows] == [
                f"d{i}" for i in reversed(range(n)) if i % 13 == 5
            ]


async def _store_of_sealed_segments(tmp_path: Path, n: int) -> Path:
    """A store of ``n`` messages "m0".. in several segments, with a snapshot at the end."""
    d = tmp_path / "s"
    async with EventStore(d, durability="none", segment_size=16 * 1024) as store:
        for i in range(n):
            # Some messages far longer than a frame index stride (4 KiB).
            text = f"m{i}" + ("" if i % 500 else " " + "x" * 9000)
            await store.save_message(f"user{i % 5}", text, timestamp=1000 + i)
    return d


def _walks_in_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the thread of every walk of a segment's frames from now on."""
    import threading

    from eventstore import segmentlog

    walks: list[str] = []
    real = segmentlog._index_frames

    def spy(seg: segmentlog.Segment, *args: object, **kwargs: object) -> object:
        walks.append(threading.current_thread().name)
        return real(seg, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(segmentlog, "_index_frames", spy)
    return walks


@pytest.mark.parametrize("chunk", [4 * 1024 * 1024, 3000, 64])
async def test_old_segments_are_indexed_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """A sealed segment nobody read since open is indexed on its first read:
    in the log's thread, not on the loop (a 64 MiB segment takes ~55 ms),
    a chunk per call (writes queue behind one chunk), and once, whatever the
    number of reads that want it meanwhile.  Frames cut by a chunk's end or
    longer than a chunk are indexed as a walk of the whole segment does."""
    import threading

    from eventstore import segmentlog

    n = 12_000
    d = await _store_of_sealed_segments(tmp_path, n)
    monkeypatch.setattr(segmentlog, "INDEX_CHUNK", chunk)
    log = segmentlog.SegmentLog(str(d), read_only=True)
    await log.open()
    try:
        sealed = [seg for seg in log.segments if not seg.indexed]
        assert len(sealed) >= 4
        whole = [segmentlog._build_index(seg) for seg in sealed]
        walks = _walks_in_threads(monkeypatch)
        positions = [1, 2, sealed[1].first, sealed[1].first + 1, sealed[2].first + 3, n - 5]
        answers = await asyncio.gather(*(log.fetch(positions) for _ in range(4)))
        for events in answers:
            assert [ev.message.split()[0] for ev in events] == [f"m{p - 1}" for p in positions]  # type: ignore[union-attr]
        assert walks and threading.current_thread().name not in walks
        asked = [s for s in sealed if any(s.first <= p < s.next_position for p in positions)]
        assert len(asked) == 3 and not any(s.indexed for s in sealed if s not in asked)
        if chunk >= 16 * 1024:  # a segment is one call: one walk each, for all four reads
            assert len(walks) == 3
        else:
            assert len(walks) > 3
        for seg, built in zip(sealed, whole, strict=True):
            if seg.indexed:
                assert built is not None
                assert (seg.frame_pos, seg.frame_off, seg.end) == (
                    built.frame_pos,
                    built.frame_off,
                    built.end,
                )
        # Every event of the store is still found from the indexes built there.
        events = await log.fetch(range(1, n + 1))
        assert [ev.message.split()[0] for ev in events] == [f"m{i}" for i in range(n)]  # type: ignore[union-attr]
    finally:
        await log.close()


async def test_closing_during_a_walk_ends_its_reads_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() while old segments are being indexed (for a read, and in the
    background): the walks stop, the read says the log was closed, and no
    task is left failing with nobody to hear it."""
    import time

    from eventstore import segmentlog

    d = await _store_of_sealed_segments(tmp_path, 12_000)
    monkeypatch.setattr(segmentlog, "INDEX_CHUNK", 64)  # many calls per walk
    real = segmentlog._index_frames

    def slow(*args: object) -> object:
        time.sleep(0.002)  # in the log's thread
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(segmentlog, "_index_frames", slow)
    unheard: list[object] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unheard.append(context))
    store = EventStore(d, snapshot_every=None)
    await store.connect()
    log = store.log
    assert isinstance(log, segmentlog.SegmentLog)
    first = log.segments[0]
    assert not first.indexed
    read = asyncio.ensure_future(log.fetch([first.first]))
    await asyncio.sleep(0.01)
    assert not read.done()
    await store.close()
    with pytest.raises(ConnectionError, match="closed during a read"):
        await read
    import gc

    gc.collect()
    await asyncio.sleep(0.01)
    assert unheard == []
    loop.set_exception_handler(None)


async def test_a_walk_leaves_no_reference_cycle_holding_what_it_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each chunk of a walk ends in a cut frame.  Its FrameError, kept with
    the walk's result, held a traceback, and so the frames that held the
    chunk: a reference cycle per chunk (64 MiB per 64 MiB segment walked),
    freed only when the garbage collector ran, which events (not tracked)
    rarely make it do.  RssAnon after connect at 10M events went from 186
    to 317 MB once old segments were indexed at connect."""
    import gc

    from eventstore import segmentlog
    from eventstore.framing import FrameWalker

    d = await _store_of_sealed_segments(tmp_path, 12_000)
    monkeypatch.setattr(segmentlog, "INDEX_CHUNK", 2048)
    log = segmentlog.SegmentLog(str(d), read_only=True)
    await log.open()
    gc.collect()
    gc.disable()
    try:
        sealed = [seg for seg in log.segments if not seg.indexed]
        for seg in sealed:
            await log.fetch([seg.first])
        assert all(seg.indexed for seg in sealed)
        # The thread's last call has returned once a later one has run.
        assert log._thread is not None  # type: ignore[attr-defined]
        await log._thread.call(int)  # type: ignore[attr-defined]
        left = [o for o in gc.get_objects() if isinstance(o, FrameWalker)]
        assert left == []
    finally:
        gc.enable()
        await log.close()


async def test_the_background_walk_steps_aside_for_a_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after connect a read of an old segment has the thread to itself:
    the background walk of another segment waits between its chunks."""
    from eventstore import segmentlog

    d = await _store_of_sealed_segments(tmp_path, 12_000)
    monkeypatch.setattr(segmentlog, "INDEX_CHUNK", 1024)
    walked: list[int] = []  # the segment of every chunk walked, in order
    real = segmentlog._index_frames

    def spy(seg: segmentlog.Segment, *args: object, **kwargs: object) -> object:
        walked.append(seg.first)
        return real(seg, *args, **kwargs)  # type: ignore[arg-type]

    async with EventStore(d, snapshot_every=None) as store:
        monkeypatch.setattr(segmentlog, "_index_frames", spy)
        log = store.log
        assert isinstance(log, segmentlog.SegmentLog)
        oldest = log.segments[0]
        while not walked:  # the background walk (newest first) has begun
            await asyncio.sleep(0.001)
        assert walked[0] != oldest.first
        await log.fetch([oldest.first])
        mine = [i for i, first in enumerate(walked) if first == oldest.first]
        assert len(mine) > 3
        assert mine == list(range(mine[0], mine[-1] + 1))  # nothing else in between


async def test_a_walk_that_meets_zeros_in_a_sealed_segment_reports_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More zeros than a walk's chunk, where a frame should start: the walk
    reports damage instead of reading the same chunk for ever."""
    from eventstore import segmentlog

    d = await _store_of_sealed_segments(tmp_path, 12_000)
    log = segmentlog.SegmentLog(str(d), read_only=True)
    await log.open()
    second = log.segments[1]
    path, first = Path(second.path), second.first
    await log.close()
    data = path.read_bytes()
    offset = _frame_offsets(data)[3]
    path.write_bytes(data[:offset] + bytes(4096) + data[offset:])
    monkeypatch.setattr(segmentlog, "INDEX_CHUNK", 1024)
    log = segmentlog.SegmentLog(str(d), read_only=True)
    await log.open()
    try:
        with pytest.raises(IntegrityError, match=rf"{path.name}: zero bytes instead of a frame"):
            await asyncio.wait_for(log.fetch([first]), timeout=10)
    finally:
        await log.close()


async def test_a_read_error_in_the_background_walk_is_logged_and_close_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from eventstore import segmentlog

    d = await _store_of_sealed_segments(tmp_path, 12_000)

    def eio(*args: object) -> object:
        raise OSError(errno.EIO, "Input/output error")

    store = EventStore(d, snapshot_every=None)
    await store.connect()
    monkeypatch.setattr(segmentlog, "_index_frames", eio)  # before the first walk starts
    log = store.log
    assert isinstance(log, segmentlog.SegmentLog)
    first = log.segments[0]
    with pytest.raises(StorageError, match=r"cannot read at offset \d+: Input/output error"):
        await log.fetch([first.first])
    for _ in range(100):
        if "cannot read at offset" in caplog.text:
            break
        await asyncio.sleep(0.01)
    assert "reads of it will fail" in caplog.text
    await store.close()
    monkeypatch.undo()
    async with EventStore(d, snapshot_every=None) as again:  # the lock was released
        assert (await again.log.fetch([first.first]))[0].message.startswith("m0")  # type: ignore[union-attr]


async def test_a_read_paused_across_close_and_open_does_not_go_on(tmp_path: Path) -> None:
    """Its descriptor numbers may name other files after the new open."""
    d = await _store_of_sealed_segments(tmp_path, 12_000)
    store = EventStore(d, snapshot_every=None)
    await store.connect()
    reading = store.read()
    await anext(reading)
    await store.close()
    await store.connect()
    with pytest.raises(ConnectionError, match="closed during a read"):
        async for _ in reading:
            pass
    log = store.log
    if log._indexer is not None:  # type: ignore[attr-defined]
        await log._indexer  # type: ignore[attr-defined]  # its walks count as reads
    assert log._readers == 0  # type: ignore[attr-defined]
    assert [pos async for pos, _ in store.read(11_990)] == list(range(11_990, 12_001))
    await store.close()


async def test_a_cancelled_close_still_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling close() half-way (here: while it waits for the log's thread,
    busy with a walk) must not leave the writer, the thread and the lock
    behind; a second close() waits for the same work."""
    import threading

    from eventstore import segmentlog

    d = await _store_of_sealed_segments(tmp_path, 12_000)
    release = threading.Event()
    walking = threading.Event()
    real = segmentlog._index_frames

    def held(*args: object) -> object:
        walking.set()
        release.wait(10)  # in the log's thread, until the test lets go
        return real(*args)  # type: ignore[arg-type]

    store = EventStore(d, snapshot_every=None)
    await store.connect()
    monkeypatch.setattr(segmentlog, "_index_frames", held)
    while not walking.is_set():  # the background walk holds the thread
        await asyncio.sleep(0.001)
    # A write's round waits behind the walk too, and close() for the writer.
    write = asyncio.ensure_future(store.save_message("late", "words", timestamp=1))
    await asyncio.sleep(0.01)
    closing = asyncio.ensure_future(store.log.close())
    await asyncio.sleep(0.01)
    assert not closing.done()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    release.set()
    await store.log.close()  # waits for the same work to finish
    await write  # written and synced: close() lets a round in flight finish
    await store.close()
    monkeypatch.undo()
    async with EventStore(d, snapshot_every=None) as again:  # the lock was released
        assert again.position == 12_001


def _tasks_left() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()}


async def test_connect_after_a_close_cancelled_in_the_log_closes_again(tmp_path: Path) -> None:
    """A close() cancelled while the log closes (that work goes on in a task of
    its own), then connect() at once: the open waits for that close, and the
    next close() closes this open, instead of finding the old, finished close
    and returning with the writer, its files and the lock still held."""
    d = tmp_path / "s"
    store = EventStore(d, snapshot_every=None)
    await store.connect()
    await store.save_message("alice", "hi", timestamp=1)
    closing = asyncio.ensure_future(store.close())
    while store.is_connected:  # past the snapshot on close, into the log's close
        await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await store.connect()
    await store.save_message("bob", "again", timestamp=2)
    await store.close()
    assert not _tasks_left()
    async with EventStore(d) as again:  # the lock was released
        assert [m["message"] for m in await again.get_recent_messages()] == ["again", "hi"]


async def test_a_close_cancelled_while_it_waits_for_a_periodic_snapshot(tmp_path: Path) -> None:
    """close() waits for a periodic snapshot in flight; cancelled there, it must
    not cancel the snapshot's task with it, or the next close() raises that
    CancelledError (nobody cancelled it) and leaves the store open and locked."""
    d = tmp_path / "s"
    store = EventStore(d, snapshot_every=1)
    await store.connect()
    await store.save_message("alice", "hi", timestamp=1)  # starts the snapshot task
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0)  # close() now waits for the snapshot
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await store.close()
    assert not _tasks_left()
    async with EventStore(d) as again:  # the lock was released
        assert again.position == 1


async def test_connect_during_a_close_waits_for_it(tmp_path: Path) -> None:
    """A following read-only store: connect() while close() waits for the
    follow task to end must not be undone by the rest of that close(), which
    closed the log under the new connection (reads failing with "no event at
    position 1", refresh() with "the log is not open") and dropped its new
    follow task, left running after every close()."""
    d = tmp_path / "s"
    async with EventStore(d) as first:
        await first.save_message("alice", "hi", timestamp=1)
    writer = EventStore(d)
    await writer.connect()
    follower = EventStore(d, read_only=True, follow=60)
    await follower.connect()
    closing = asyncio.ensure_future(follower.close())
    await asyncio.sleep(0)  # close() now waits for the follow task to end
    await follower.connect()
    await closing
    assert follower.is_connected
    await writer.save_message("bob", "new", timestamp=2)
    assert await follower.refresh() == 1
    assert [m["message"] for m in await follower.get_recent_messages()] == ["new", "hi"]
    await follower.close()
    await writer.close()
    assert not _tasks_left()


async def test_a_log_opened_while_its_close_starts_is_open_after_it(tmp_path: Path) -> None:
    """close() runs its work in a task, which marks the log closed only once
    it has started: an open() in between waits for that close instead of
    finding the log still open and returning."""
    store = EventStore(tmp_path / "s", snapshot_every=None)
    await store.connect()
    await store.save_message("alice", "hi", timestamp=1)
    log = store.log
    closing = asyncio.ensure_future(log.close())
    await asyncio.sleep(0)  # close() has made its task, which has not run yet
    await log.open()
    await closing
    assert log._open  # type: ignore[attr-defined]
    await log.close()
    await store.close()
    assert not _tasks_left()


@pytest.mark.parametrize("durability", ["none", "flush"])
async def test_a_write_accepted_during_a_roll_is_written_by_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """A write submitted while the writer rolls in its thread, then close():
    the writer went back to find the log closing and returned with the write
    still queued. "none" mode had acknowledged it, and it was lost; "flush"
    mode failed it with "the log was closed before this write"."""
    import threading

    d = tmp_path / "s"
    store = EventStore(d, durability=durability, snapshot_every=None)  # type: ignore[arg-type]
    await store.connect()
    await store.save_message("alice", "first", timestamp=1)
    real = SegmentLog._seal_and_roll
    entered, release = threading.Event(), threading.Event()

    def held(self: SegmentLog, first: int) -> None:
        entered.set()
        release.wait(10)  # in the log's thread, until the test lets go
        real(self, first)

    monkeypatch.setattr(SegmentLog, "_seal_and_roll", held)
    rolling = asyncio.ensure_future(store.log.roll())
    while not entered.is_set():
        await asyncio.sleep(0.001)
    write = asyncio.ensure_future(store.save_message("bob", "late", timestamp=2))
    await asyncio.sleep(0)  # submitted ("none": acknowledged)
    closing = asyncio.ensure_future(store.log.close())
    await asyncio.sleep(0.01)  # the log's close has begun, and waits for the writer
    release.set()
    await rolling
    await closing
    await write
    await store.close()
    monkeypatch.undo()
    async with EventStore(d) as again:
        assert [m["message"] for m in await again.get_recent_messages()] == ["late", "first"]


async def test_a_store_indexes_old_segments_in_the_background_after_connect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After a start from a snapshot, the sealed segments are indexed at once,
    in the log's thread, so that later first reads of old history find them
    ready; damage found there is logged, and reads of that segment fail."""
    import threading

    from eventstore.segmentlog import SegmentLog

    n = 12_000
    d = await _store_of_sealed_segments(tmp_path, n)
    walks = _walks_in_threads(monkeypatch)

    async with EventStore(d, snapshot_every=None) as store:
        assert all(seg.indexed for seg in await _walks_done(store))
        assert walks and threading.current_thread().name not in walks
        assert len(await store.get_recent_messages(limit=n)) == n
        log = store.log
        assert isinstance(log, SegmentLog)
        second = Path(log.segments[1].path)
        second_first = log.segments[1].first
    data = bytearray(second.read_bytes())
    data[HEADER_SIZE + FRAME_HEADER_SIZE + 2] ^= 0x40
    second.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="eventstore"):
        async with EventStore(d, snapshot_every=None) as store:
            indexed = [seg.indexed for seg in await _walks_done(store)]
            assert indexed.count(False) == 1 and not indexed[1]
            for _ in range(2):
                with pytest.raises(
                    IntegrityError, match=rf"{second.name}: .* at offset {HEADER_SIZE}"
                ):
                    await store.log.fetch([second_first + 1])
            assert (await store.log.fetch([1]))[0].message == "m0 " + "x" * 9000  # type: ignore[union-attr]
    assert f"{second.name}: frame checksum mismatch at offset {HEADER_SIZE}" in caplog.text


async def _walks_done(store: EventStore) -> list[Segment]:
    """The log's segments once the background walk after connect has indexed
    them all, or after 5 s (one it cannot index stays unindexed)."""
    log = store.log
    assert isinstance(log, SegmentLog)
    for _ in range(500):
        if all(seg.indexed for seg in log.segments):
            break
        await asyncio.sleep(0.01)
    return log.segments


async def _walked(store: EventStore) -> list[Segment]:
    """The log's segments, once the background walk after connect has indexed them all."""
    segments = await _walks_done(store)
    assert all(seg.indexed for seg in segments)
    return segments


async def test_a_sealed_segment_cut_short_under_a_snapshot_is_logged_and_read_as_damage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """connect() from a snapshot reads no old segment; the background walk
    finds the cut, logs it, and a read of what it lost is an IntegrityError
    naming the file, not "no event"."""
    d = await _store_of_sealed_segments(tmp_path, 12_000)
    victim, after = segment_files(d)[1:3]
    first, first_after = (int(p.name.removesuffix(".seg")) for p in (victim, after))
    data = victim.read_bytes()
    assert not data.endswith(bytes(16))  # sealed: ends with its last frame
    victim.write_bytes(data[:-16])  # into the last frame
    cut_at = _frame_offsets(data)[-1]
    cut_from = struct.unpack_from("<Q", data, cut_at + 8)[0]  # the first event the cut took
    with caplog.at_level(logging.WARNING, logger="eventstore"):
        async with EventStore(d, snapshot_every=None) as store:
            await _walked(store)
            warned = [r.getMessage() for r in caplog.records if victim.name in r.getMessage()]
            assert len(warned) == 1
            assert "cut short" in warned[0] and f"offset {cut_at}" in warned[0]
            assert f"events {cut_from}..{first_after - 1} are missing" in warned[0]
            assert "eventstore verify" in warned[0]
            for pos in (cut_from, first_after - 1):
                with pytest.raises(
                    IntegrityError, match=rf"{victim.name}: cut short.*eventstore verify"
                ):
                    await store.log.fetch([pos])
            # What the cut left is read as before, and so is the next segment.
            got = await store.log.fetch([first, cut_from - 1, first_after])
            assert [ev.message.split()[0] for ev in got] == [  # type: ignore[attr-defined]
                f"m{first - 1}",
                f"m{cut_from - 2}",
                f"m{first_after - 1}",
            ]
            # A read across the cut stops there, as a replay from the start does.
            with pytest.raises(IntegrityError, match=rf"{victim.name}: cut short"):
                async for _ in store.read(first):
                    pass
    with pytest.raises(IntegrityError, match=victim.name):
        await all_events(d, snapshot_every=None)


async def test_segments_that_overlap_are_damage_even_after_a_compacted_one(
    tmp_path: Path,
) -> None:
    """Compaction allows gaps after a compacted segment, never overlaps: a
    segment starting inside the range a compacted one holds (what a second
    compaction over an unfinished switch could leave) must not be replayed
    as positions going back."""
    from eventstore.segment import encode_frames, pack_header, segment_name, unpack_header

    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024) as store:
        for i in range(60):
            await store.save_message("u", f"m{i} " + "x" * 40, timestamp=1000 + i)
        await store.compact()
    compacted = segment_files(d)[0]
    header = unpack_header(compacted.read_bytes()[:HEADER_SIZE], str(compacted))
    assert header.flags == 3  # compacted, with holes
    frames = encode_frames(20, [MessageSaved(2000 + i, "dup", f"dup{i}") for i in range(5)])
    stray = d / segment_name(20)
    stray.write_bytes(pack_header(20, header.store_id) + b"".join(f[2] for f in frames))
    # The snapshot at 60 no longer matches the log (position 60 now reads
    # from the stray segment), so every open replays, and refuses.
    for read_only in (True, False):
        with pytest.raises(IntegrityError, match=rf"{stray.name}: holds position 20, but an"):
            await EventStore(d, read_only=read_only).connect()


async def test_a_sealed_segment_deleted_under_a_snapshot_is_logged_and_read_as_damage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A whole sealed segment gone from the middle of a log that was never
    compacted: the walk of the one before finds that its frames end short of
    the next segment's first position."""
    d = await _store_of_sealed_segments(tmp_path, 12_000)
    before, gone, after = segment_files(d)[1:4]
    lost = int(gone.name.removesuffix(".seg")), int(after.name.removesuffix(".seg")) - 1
    gone.unlink()
    with caplog.at_level(logging.WARNING, logger="eventstore"):
        async with EventStore(d, snapshot_every=None) as store:
            await _walked(store)
            warned = [r.getMessage() for r in caplog.records if "missing" in r.getMessage()]
            assert len(warned) == 1
            assert f"{before.name}: its frames end at position {lost[0] - 1}" in warned[0]
            assert f"next segment, {after.name}, starts at {lost[1] + 1}" in warned[0]
            assert f"events {lost[0]}..{lost[1]} are missing" in warned[0]
            for pos in lost:
                with pytest.raises(
                    IntegrityError, match=rf"position {pos}: .*{before.name}.*eventstore verify"
                ):
                    await store.log.fetch([pos])
            got = await store.log.fetch([lost[0] - 1, lost[1] + 1])
            assert [ev.message.split()[0] for ev in got] == [  # type: ignore[attr-defined]
                f"m{lost[0] - 2}",
                f"m{lost[1]}",
            ]
            # A read of the hole alone, which reads no frame, is refused too.
            with pytest.raises(IntegrityError, match=rf"events {lost[0]}..{lost[1]} are missing"):
                async for _ in store.read(lost[0] + 1, lost[0] + 2):
                    pass
    with pytest.raises(IntegrityError, match=rf"{before.name}: .* are missing"):
        await all_events(d, snapshot_every=None)


async def test_gaps_compaction_left_between_segments_are_not_damage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a compacted segment the next one may start later than its last
    event (flag bit 0): the background walk must not call that missing, and
    a read of a position compaction dropped is no IntegrityError."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=2048) as store:
        for i in range(400):  # kept actions between messages compaction drops
            await store.log_user_action(f"user{i % 3}", "join", timestamp=1000 + i)
            await store.save_message(f"user{i % 3}", f"m{i} " + "x" * 40, timestamp=1000 + i)
        await store.clear_old_messages(1)
        await store.compact()
        await fill(store, 300, prefix="after")
    with caplog.at_level(logging.WARNING, logger="eventstore"):
        async with EventStore(d, segment_size=2048, snapshot_every=None) as store:
            segs = await _walked(store)
            gaps = [(s, a) for s, a in itertools.pairwise(segs) if s.next_position < a.first]
            assert gaps  # the test shows what it claims
            assert all(s.gaps_allowed for s, _ in gaps)
            assert len(await store.get_user_actions(limit=10**6)) == 400
            with pytest.raises(QueryError, match="no event at position"):
                await store.log.fetch([gaps[0][0].next_position])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("durability", ["none", "flush", "fsync"])
async def test_reading_beside_a_busy_writer_misses_nothing(tmp_path: Path, durability: str) -> None:
    d = tmp_path / "s"
    async with EventStore(d, durability=durability, segment_size=4096) as store:  # type: ignore[arg-type]
        done = asyncio.Event()

        async def writer() -> None:
            for i in range(3000):
                await store.save_message("w", f"m{i}", timestamp=i)
                if i % 3 == 0:
                    await asyncio.sleep(0)
            done.set()

        task = asyncio.create_task(writer())
        reads = 0
        while not done.is_set():
            at_start = store.position
            got = [p async for p, _ in store.read()]
            assert got == list(range(1, len(got) + 1))
            assert len(got) >= at_start
            reads += 1
            await asyncio.sleep(0)  # a read of memory only never yields by itself
        await task
        assert reads >= 2  # the reads really did overlap the writes


async def test_none_mode_rolls_segments_for_a_caller_that_never_yields(tmp_path: Path) -> None:
    """Bulk appends in "none" mode (an import) must not pile up: the round
    that starts a new segment makes the caller wait for the writer once."""
    from eventstore.segmentlog import SegmentLog

    d = tmp_path / "s"
    async with EventStore(d, durability="none", segment_size=16 * 1024) as store:
        log = store.log
        assert isinstance(log, SegmentLog)
        for b in range(100):
            await store.append(
                [MessageSaved(b * 500 + i, "u", f"bulk {b}/{i}") for i in range(500)]
            )
        # Rolled as it went, and nothing close to the whole history queued.
        assert len(log.segments) > 20
        assert sum(len(events) for _, events in log._unwritten) < 10_000
    assert len(await all_events(d)) == 50_000


async def test_a_full_disk_with_no_room_for_the_pid_does_not_keep_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LOCK holds the writer's pid, which only serves messages.  On a full
    disk there is no room for it: connect() raised a bare OSError and kept
    LOCK's descriptor, and with it the flock, so a connect() after space was
    freed was refused as another writer, for as long as the process lived."""
    import eventstore.lockfile as lockfile

    d = tmp_path / "s"
    async with EventStore(d, snapshot_every=None) as store:
        await fill(store, 5)

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lockfile.os, "pwrite", full)
    store = EventStore(d, snapshot_every=None)
    await store.connect()  # reads work on a full disk
    assert len(await store.get_recent_messages()) == 5
    await store.close()
    monkeypatch.undo()
    async with EventStore(d, snapshot_every=None) as again:  # the lock was released
        await again.save_message("a", "after", timestamp=9)
        assert again.position == 6


def test_a_writer_is_not_refused_by_a_reader_probing_the_lock(tmp_path: Path) -> None:
    """lock_holder() takes the lock shared for an instant (every read-only open
    does, to learn whether a writer is at work); a writer starting in that
    instant must not be told another writer holds the store."""
    import threading

    from eventstore.lockfile import WriterLock, lock_holder

    d = str(tmp_path)
    (tmp_path / "LOCK").touch()
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            lock_holder(d)

    prober = threading.Thread(target=probe)
    prober.start()
    refused = 0
    try:
        for _ in range(2000):
            lock = WriterLock(d)
            try:
                lock.acquire()
            except ConnectionError:
                refused += 1
            else:
                lock.release()
    finally:
        stop.set()
        prober.join()
    assert refused == 0
    held = WriterLock(d)
    held.acquire()
    try:
        with pytest.raises(ConnectionError, match="already open for writing"):
            WriterLock(d).acquire()
    finally:
        held.release()


# -- connect() called twice at once, cancelled, or raced by close() ---------------------------


@pytest.mark.parametrize("durability", ["fsync", "flush"])
async def test_a_bug_in_the_writer_fails_the_round_it_was_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """Not only StorageError: any error of the writer task reaches the callers
    whose events it had taken, instead of leaving them waiting for ever."""
    from eventstore.segmentlog import SegmentLog

    def broken(self: SegmentLog, batches: object) -> None:
        raise RuntimeError("a bug")

    async with EventStore(tmp_path / "s", durability=durability) as store:  # type: ignore[arg-type]
        await store.save_message("ada", "before")
        monkeypatch.setattr(SegmentLog, "_encode", broken)
        with pytest.raises(StorageError, match="the writer stopped: RuntimeError"):
            await asyncio.wait_for(store.save_message("ada", "lost"), 10)
        with pytest.raises(ConnectionError, match="stopped after a failed write"):
            await store.save_message("ada", "refused")


async def test_close_after_the_writer_was_cancelled_still_releases_the_store(
    tmp_path: Path,
) -> None:
    d = tmp_path / "s"
    store = EventStore(d)
    await store.connect()
    await store.save_message("ada", "kept")
    writer = store.log._writer  # type: ignore[attr-defined]
    writer.cancel()  # as a shutdown cancelling every task would
    await asyncio.wait({writer})
    await store.close()  # no CancelledError, and the files and lock released
    assert not store.is_connected and not _lock_is_held(d)
    async with EventStore(d) as again:
        assert [m["message"] for m in await again.get_recent_messages()] == ["kept"]


def _lock_is_held(d: Path) -> bool:
    from eventstore.lockfile import WriterLock

    lock = WriterLock(str(d))
    try:
        lock.acquire()
    except ConnectionError:
        return True
    lock.release()
    return False


@pytest.mark.parametrize("durability", ["fsync", "flush", "none"])
async def test_two_connects_at_once_share_one_opening(tmp_path: Path, durability: str) -> None:
    d = tmp_path / "s"
    async with EventStore(d) as first:
        await first.save_message("ada", "before")
    store = EventStore(d, durability=durability)  # type: ignore[arg-type]
    await asyncio.gather(store.connect(), store.connect())
    try:
        assert store.is_connected and _lock_is_held(d)
        await asyncio.wait_for(store.save_message("ada", "after"), 10)
    finally:
        await store.close()
    assert not _lock_is_held(d)
    async with EventStore(d) as again:
        got = [m["message"] for m in await again.get_recent_messages()]
    assert got == ["after", "before"]


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8])
async def test_a_cancelled_connect_leaves_the_store_closed_and_unlocked(
    tmp_path: Path, steps: int
) -> None:
    """A timeout around connect(): the opening runs to its end, then the last
    caller closes it again, so a retry (this store or a new one) can open."""
    d = tmp_path / "s"
    async with EventStore(d) as first:
        for i in range(500):
            await first.save_message("ada", f"line {i}")
    store = EventStore(d, snapshot_every=None)
    task = asyncio.ensure_future(store.connect())
    for _ in range(steps):  # started, not finished: cancelled at several points
        await asyncio.sleep(0)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        assert not store.is_connected and not _lock_is_held(d)
        async with EventStore(d) as retry:
            assert retry.position == 500
    else:
        # Eight steps can be enough for the opening to finish on a quick
        # machine: the cancel then comes too late and the store is open.
        assert steps > 3, "connect() finished within three loop steps"
        assert store.is_connected and _lock_is_held(d)
        await store.close()
    await store.connect()
    try:
        assert store.is_connected and store.position == 500 and _lock_is_held(d)
        await asyncio.wait_for(store.save_message("ada", "after"), 10)
    finally:
        await store.close()
    assert not _lock_is_held(d)
    async with EventStore(d) as again:
        assert again.position == 501


async def test_a_connect_cancelled_beside_another_leaves_the_other_connected(
    tmp_path: Path,
) -> None:
    d = tmp_path / "s"
    async with EventStore(d) as first:
        await first.save_message("ada", "hi")
    store = EventStore(d)
    gives_up = asyncio.ensure_future(store.connect())
    waits = asyncio.ensure_future(store.connect())
    await asyncio.sleep(0)
    gives_up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gives_up
    await waits
    try:
        assert store.is_connected and _lock_is_held(d)
        await store.save_message("ada", "after")
    finally:
        await store.close()


async def test_a_connect_that_joins_while_the_last_cancelled_one_waits_is_kept(
    tmp_path: Path,
) -> None:
    """The one caller cancelled waits for the opening before closing it; a
    caller that joined meanwhile must get a connected store, not a closed one."""
    d = tmp_path / "s"
    async with EventStore(d) as first:
        await first.save_message("ada", "hi")
    store = EventStore(d)
    gives_up = asyncio.ensure_future(store.connect())
    await asyncio.sleep(0)
    gives_up.cancel()
    await asyncio.sleep(0)  # it now waits for the opening to end
    joins = asyncio.ensure_future(store.connect())
    results = await asyncio.gather(gives_up, joins, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError) and results[1] is None
    try:
        assert store.is_connected
        assert [m["message"] for m in await store.get_recent_messages()] == ["hi"]
    finally:
        await store.close()


async def test_close_during_connect_leaves_the_store_closed_and_unlocked(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d) as first:
        await first.save_message("ada", "hi")
    store = EventStore(d)
    opening = asyncio.ensure_future(store.connect())
    await asyncio.sleep(0)
    await store.close()  # waits for the opening, then closes what it opened
    assert opening.done()
    await opening
    assert not store.is_connected and not _lock_is_held(d)


async def test_a_follower_waits_for_a_segment_a_listing_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing taken while the writer rolls can show a new segment without
    the one before it; the follower looks again instead of calling it damage."""
    from eventstore import segmentlog

    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024) as store:
        await store.save_message("ada", "first", timestamp=1)
        async with EventStore(d, read_only=True) as follower:
            for i in range(60):
                await store.save_message("ada", f"line {i} " + "x" * 40, timestamp=2 + i)
            await store.log.flush()
            real = segmentlog.list_segments
            missed = {"n": 0}

            def listing(directory: str) -> tuple[list[tuple[int, str]], list[str]]:
                names, stray = real(directory)
                if missed["n"] < 3 and len(names) > 2:
                    missed["n"] += 1
                    names = names[:-2] + names[-1:]  # the next-to-last not shown yet
                return names, stray

            monkeypatch.setattr(segmentlog, "list_segments", listing)
            await follower.refresh()  # no IntegrityError: it waits
            monkeypatch.undo()
            await follower.refresh()
            assert await follower.get_recent_messages(limit=100) == (
                await store.get_recent_messages(limit=100)
            )


def test_a_reader_opening_during_a_switch_is_told_to_try_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eventstore import segmentlog

    d = tmp_path / "s"

    async def write() -> None:
        async with EventStore(d) as store:
            await store.save_message("ada", "hi")

    asyncio.run(write())
    real = segmentlog.list_segments

    def listing(directory: str) -> tuple[list[tuple[int, str]], list[str]]:
        names, stray = real(directory)
        # Listed, then removed by a switch before it is opened.
        return [(0, "00000000000000000000.seg"), *names], stray

    monkeypatch.setattr(segmentlog, "list_segments", listing)
    with pytest.raises(ConnectionError, match="try again in a moment"):
        asyncio.run(EventStore(d, read_only=True).connect())


# -- bad construction arguments and paths -----------------------------------------------------
@pytest.mark.parametrize("path", [None, b"data", 5])
def test_a_path_of_the_wrong_type_is_refused_by_name(path: object) -> None:
    from eventstore import ValidationError

    with pytest.raises(ValidationError, match=r"path must be a directory \(str or os.PathLike\)"):
        EventStore(path)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"durability": "sometimes"}, "durability must be one of"),
        ({"read_only": "yes"}, "read_only must be True or False, got 'yes'"),
        ({"segment_size": 10}, "segment_size must be an int of at least 1024 bytes, got 10"),
        ({"segment_size": 4096.0}, "segment_size must be an int"),
        ({"follow": 0}, "follow must be a positive number of seconds, got 0"),
        ({"follow": float("nan")}, "follow must be a positive number of seconds, got nan"),
        ({"follow": "1"}, "follow must be a positive number of seconds, got '1'"),
        ({"follow": 1.0}, "follow is for read-only stores"),
        ({"snapshot_every": 0}, "snapshot_every must be a positive int or None, got 0"),
    ],
)
def test_bad_store_arguments_are_refused_by_name(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    from eventstore import ValidationError

    with pytest.raises(ValidationError, match=re.escape(message)):
        EventStore(tmp_path / "s", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "s").exists()
    EventStore(tmp_path / "s", read_only=True, follow=0.5)  # a reader may follow


@pytest.mark.parametrize("read_only", [False, True])
async def test_a_file_where_the_store_directory_belongs_is_named_as_such(
    tmp_path: Path, read_only: bool
) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a store")
    with pytest.raises(ConnectionError, match=r"notes\.txt: is a file, not a store directory"):
        await EventStore(path, read_only=read_only).connect()
    assert path.read_text() == "not a store"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("a",), "from_position must be an int, got str 'a'"),
        ((-1,), "from_position must be >= 0, got -1"),
        ((1, "b"), "to_position must be an int, got str 'b'"),
    ],
)
async def test_read_checks_its_positions(
    tmp_path: Path, args: tuple[object, ...], message: str
) -> None:
    from eventstore import ValidationError

    async with EventStore(tmp_path / "s") as store:
        await fill(store, 3)
        with pytest.raises(ValidationError, match=re.escape(message)):
            async for _ in store.read(*args):  # type: ignore[arg-type]
                pass
        assert [pos async for pos, _ in store.read(2)] == [2, 3]


async def test_a_none_mode_store_whose_background_write_failed_is_not_connected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In "none" mode the write that fails has returned long before: the
    store must not go on saying it is connected until the next write."""
    import eventstore.segmentlog as segmentlog

    d = tmp_path / "s"
    store = EventStore(d, durability="none", snapshot_every=None)
    await store.connect()
    await fill(store, 5)
    await store.log.flush()

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segmentlog.os, "pwrite", full)
    await store.save_message("amy", "lost", timestamp=99)  # accepted, written later
    assert store.is_connected
    for _ in range(100):  # the writer task's turn
        await asyncio.sleep(0.01)
        if store.log.stopped is not None:
            break
    monkeypatch.undo()
    assert not store.is_connected
    with pytest.raises(StorageError):
        await store.close()
    async with EventStore(d, snapshot_every=None) as again:
        assert again.position == 5


async def test_none_mode_writes_within_100_ms_while_the_loop_runs(tmp_path: Path) -> None:
    """The README's window for "none": accepted writes reach the file (the
    page cache) within about 100 ms, whether the caller lets the writer task
    run or never yields at all."""
    from eventstore.segmentlog import NONE_FLUSH_EVENTS, NONE_FLUSH_INTERVAL

    d = tmp_path / "s"
    async with EventStore(d, durability="none", snapshot_every=None) as store:

        def written() -> int:
            return sum(p.stat().st_size for p in segment_files(d))

        empty = written()
        # A caller that yields: the writer task writes at its next turn.
        await store.save_message("amy", "one", timestamp=1)
        await asyncio.sleep(NONE_FLUSH_INTERVAL * 1.5)
        after_yield = written()
        assert after_yield > empty
        # A caller that never yields (no await suspends in "none" mode), with
        # fewer writes than would fill a round on their own: after the
        # interval, one of its own calls writes them.
        began = time.monotonic()
        calls = 0
        while time.monotonic() - began < NONE_FLUSH_INTERVAL * 3:
            await store.save_message("amy", "x", timestamp=2)
            calls += 1
            if calls % 64 == 0:
                time.sleep(0.01)  # a slow caller: few calls per interval
        assert calls < NONE_FLUSH_EVENTS
        assert written() > after_yield


async def test_a_new_segment_is_durable_before_it_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A roll creates the next segment as the README says: its header
    written to a temporary file and fsynced, renamed, and the rename made
    durable with a directory fsync, before any event goes into it."""
    import eventstore.segmentlog as segmentlog

    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        await fill(store, 5)
        calls: list[str] = []
        real_fsync, real_rename, real_fsync_dir = os.fsync, os.rename, segmentlog.fsync_dir
        real_pwrite = os.pwrite

        def fsync(fd: int) -> None:
            calls.append("fsync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def rename(src: str, dst: str) -> None:
            calls.append(f"rename {os.path.basename(src)} {os.path.basename(dst)}")
            real_rename(src, dst)

        def fsync_dir(path: str) -> None:
            calls.append("fsync_dir")
            real_fsync_dir(path)

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            calls.append("pwrite " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(segmentlog.os, "fsync", fsync)
        monkeypatch.setattr(segmentlog.os, "rename", rename)
        monkeypatch.setattr(segmentlog.os, "pwrite", pwrite)
        monkeypatch.setattr(segmentlog, "fsync_dir", fsync_dir)
        while len(segment_files(d)) < 2:
            await store.save_message("amy", "x" * 200, timestamp=7)
        await store.log.flush()
        monkeypatch.undo()
    new = segment_files(d)[1].name
    made = calls.index(f"fsync {new}.tmp")
    assert calls[made : made + 3] == [f"fsync {new}.tmp", f"rename {new}.tmp {new}", "fsync_dir"]
    assert f"pwrite {new}" not in calls[:made]
    assert f"pwrite {new}" in calls[made + 3 :]


async def test_a_directory_named_like_a_segment_is_named_in_the_error(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d) as store:
        await store.save_message("bob", "hi", timestamp=1)
    odd = d / "00000000000000000500.seg"
    odd.mkdir()
    for read_only in (False, True):
        with pytest.raises(IntegrityError, match=f"{odd}: named like a segment, but not a regular"):
            await EventStore(d, read_only=read_only).connect()
    odd.rmdir()
    assert len(await all_events(d)) == 1


async def test_a_lost_first_segment_is_refused(tmp_path: Path) -> None:
    """Only compaction's segments may start after a gap: a plain first
    segment that does not start at 1 means a file is missing."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024, snapshot_every=None) as store:
        await fill(store, 100)
    (d / "tail.index").unlink(missing_ok=True)
    first, second = segment_files(d)[:2]
    first.unlink()
    for read_only in (False, True):
        with pytest.raises(IntegrityError, match=f"{second}: the first segment starts at"):
            await EventStore(d, read_only=read_only).connect()


async def test_an_os_error_at_open_is_the_stores_error_naming_the_file(tmp_path: Path) -> None:
    """Every error the store raises is a StorageError: a bot that catches
    those must not be stopped by a bare OSError from a file it cannot open."""
    d = tmp_path / "s"
    async with EventStore(d) as store:
        await store.save_message("amy", "hi", timestamp=1)
    (d / "LOCK").unlink()
    (d / "LOCK").mkdir()  # the writer's lock cannot be opened
    with pytest.raises(ConnectionError, match=re.escape(f"{d / 'LOCK'}: Is a directory")):
        await EventStore(d).connect()
    (d / "LOCK").rmdir()
    async with EventStore(d) as store:  # and nothing was left held
        assert store.position == 1


async def test_a_segment_that_cannot_be_made_is_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not as a write to the old segment, at an offset where nothing failed."""
    real = SegmentLog._create_segment

    def no_room(self: SegmentLog, first: int, *args: object, **kwargs: object) -> Segment:
        if first > 1:
            path = os.path.join(self.directory, f"{first:020d}.seg.tmp")
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(self, first, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SegmentLog, "_create_segment", no_room)
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096, durability="fsync") as store:
        with pytest.raises(StorageError, match=r"\.seg\.tmp: cannot start a new segment: "):
            for i in range(500):
                await store.save_message("amy", f"line {i} " * 4, timestamp=i)
        written = store.position - 1  # the failed write was taken back
    monkeypatch.undo()
    async with EventStore(d) as store:
        assert store.position == written > 0
