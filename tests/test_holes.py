"""Compacted frames with holes: nil in place of the events compaction dropped.

Compaction keeps events that are rarely neighbours (a busy channel's chat
lines alternate with the statistics updates it folds away).  It writes them
up to FRAME_EVENTS positions a frame, nil at the positions without an event,
in segments flagged FLAG_HOLES (docs/format.md).  These tests pin down that
reads see exactly the kept events at their positions, that a hole reads as
"no event there", and that frames breaking the rules are refused as damage.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storeutil import copy_store, segment_files

from eventstore import EventStore, IntegrityError, QueryError
from eventstore import segment as segment_mod
from eventstore.codec import decode_batch, encode_batch
from eventstore.events import MessageSaved
from eventstore.recovery import find_damage
from eventstore.segment import FLAG_HOLES, FRAME_EVENTS, FRAME_HEADER_SIZE, HEADER_SIZE
from eventstore.segmentlog import SegmentLog
from eventstore.verify import verify


async def _chat(d: Path, lines: int = 300) -> None:
    """Chat lines (a statistics update, then the message), compacted."""
    async with EventStore(d, durability="flush") as store:
        for i in range(lines):
            await store.save_user_stats(f"u{i % 4}", chat_lines=1, last_seen=i)
            await store.save_message(f"u{i % 4}", f"line {i}", timestamp=i)
        await store.compact()


def _frames(path: Path) -> list[tuple[int, int, int, bytes]]:
    """(offset, first position, count, payload) of every frame of a segment."""
    data = path.read_bytes()
    out = []
    offset = HEADER_SIZE
    while offset < len(data):
        length, _crc, first, count = struct.unpack_from("<IIQI", data, offset)
        start = offset + FRAME_HEADER_SIZE
        out.append((offset, first, count, data[start : start + length]))
        offset = start + length
    return out


def _compacted(d: Path) -> Path:
    (seg,) = [
        p for p in segment_files(d) if int.from_bytes(p.read_bytes()[10:12], "little") & FLAG_HOLES
    ]
    return seg


async def test_compaction_writes_frames_of_many_positions_with_holes(tmp_path: Path) -> None:
    d = tmp_path / "s"
    await _chat(d)
    frames = _frames(_compacted(d))
    entries = [ev for _, _, _, payload in frames for ev in decode_batch(payload, holes=True)]
    kept = [ev for ev in entries if ev is not None]
    # 300 messages at the even positions 2..600, and each user's last
    # statistics update (593, 595, 597, 599).  Every other position from 2
    # to 600 is a hole in a frame, or the one-position gap between two.
    assert len(kept) == 304
    assert entries.count(None) + len(frames) - 1 == 599 - 304
    assert len(frames) < 15
    for _, _, count, payload in frames:
        batch = decode_batch(payload, holes=True)
        assert len(batch) == count <= FRAME_EVENTS
        assert batch[0] is not None and batch[-1] is not None
    async with EventStore(d, read_only=True) as store:
        messages = await store.get_recent_messages(limit=1000)
        assert [m["message"] for m in messages] == [f"line {i}" for i in reversed(range(300))]
        assert [m["id"] for m in messages] == list(range(600, 0, -2))


async def test_a_hole_reads_as_no_event(tmp_path: Path) -> None:
    d = tmp_path / "s"
    await _chat(d, lines=100)
    log = SegmentLog(str(d), read_only=True)
    await log.open()
    try:
        # Odd positions held statistics updates, dropped but for the last
        # of each user; even ones the messages.  Position 1 lies before the
        # first frame, 3 and 101 are holes inside frames.
        (two, four) = await log.fetch([2, 4])
        assert isinstance(two, MessageSaved) and two.message == "line 0"
        assert isinstance(four, MessageSaved) and four.message == "line 1"
        for hole in (1, 3, 101):
            with pytest.raises(QueryError, match=f"no event at position {hole}"):
                await log.fetch([hole])
        runs = [run async for run in log.read_runs(1, 10)]
        evens = await log.fetch([2, 4, 6, 8, 10])
        assert runs == [(p, [ev]) for p, ev in zip(range(2, 11, 2), evens, strict=True)]
    finally:
        await log.close()


def _rewrite(path: Path, offset: int, payload: bytes, count: int) -> None:
    """Put ``payload`` (same length) in the frame at ``offset``, checksum fixed."""
    data = bytearray(path.read_bytes())
    length = struct.unpack_from("<I", data, offset)[0]
    assert len(payload) == length
    struct.pack_into("<I", data, offset + 16, count)
    data[offset + FRAME_HEADER_SIZE : offset + FRAME_HEADER_SIZE + length] = payload
    crc = zlib.crc32(bytes(data[offset + 8 : offset + FRAME_HEADER_SIZE + length]))
    struct.pack_into("<I", data, offset + 4, crc)
    path.write_bytes(bytes(data))


def _put_nil(seg: Path, offset: int, payload: bytes, count: int, i: int, holes: bool) -> None:
    """Nil for element ``i`` of the frame at ``offset``, checksum fixed.

    Another message of the frame grows by the bytes the nil frees, so that
    the frame keeps its length.
    """
    events = decode_batch(payload, holes=holes)
    assert isinstance(events[i], MessageSaved)
    others = [j for j, ev in enumerate(events) if isinstance(ev, MessageSaved) and j != i]
    j = others[len(others) // 2]
    target = events[j]
    changed = list(events)
    changed[i] = None
    freed = len(encode_batch([events[i]])) - len(encode_batch([None]))
    changed[j] = MessageSaved(target.timestamp, target.username, target.message + "x" * freed)
    new = encode_batch(changed)
    assert len(new) == len(payload)
    _rewrite(seg, offset, new, count)


@pytest.mark.parametrize("where", ["first", "last"])
async def test_a_frame_beginning_or_ending_with_a_hole_is_damage(
    tmp_path: Path, where: str
) -> None:
    """Its first or last position would hold no event: no writer makes one."""
    d = tmp_path / "s"
    await _chat(d, lines=40)
    for snap in d.glob("*.snap"):
        snap.unlink()  # so that opening replays the compacted frames
    seg = _compacted(d)
    offset, first, count, payload = _frames(seg)[0]
    i = 0 if where == "first" else count - 1
    _put_nil(seg, offset, payload, count, i, holes=True)
    with pytest.raises(IntegrityError, match="begins or ends with a hole"):
        async with EventStore(d, read_only=True):
            pass
    damage = find_damage(str(d))
    assert damage is not None and damage.offset == offset and "hole" in damage.reason
    report = await asyncio.to_thread(verify, str(d))
    assert any("begins or ends with a hole" in p.message for p in report.problems)
    # A read of a row from the frame says the same, rather than "no event
    # there" (the frame's first and last positions are in it).
    log = SegmentLog(str(d), read_only=True)
    await log.open()
    try:
        for position in (first, first + count - 1):
            with pytest.raises(IntegrityError, match=f"offset {offset} begins or ends with a hole"):
                await log.fetch([position])
    finally:
        await log.close()


async def test_nil_in_a_segment_without_holes_is_damage(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, durability="flush", snapshot_every=None) as store:
        await store.append([MessageSaved(i, "u", f"m{i}") for i in range(5)])
    (seg,) = segment_files(d)
    offset, _first, count, payload = _frames(seg)[0]
    _put_nil(seg, offset, payload, count, 2, holes=False)
    with pytest.raises(IntegrityError, match="undecodable event batch"):
        async with EventStore(d, read_only=True):
            pass


def test_a_frame_split_for_its_bytes_leaves_holes_out_at_the_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = [MessageSaved(i, "u", f"{i}" + "z" * 60) for i in range(8)]
    run = [big[0], None, big[1], None, None, big[2], None, big[3], None, None, None, big[4]]
    monkeypatch.setattr(segment_mod, "MAX_FRAME_PAYLOAD", 200)
    frames = segment_mod.encode_frames(10, run)
    assert len(frames) > 1
    seen = []
    for first, count, data in frames:
        batch = decode_batch(data[FRAME_HEADER_SIZE:], holes=True)
        assert len(batch) == count
        assert batch[0] is not None and batch[-1] is not None
        seen += [(p, ev) for p, ev in enumerate(batch, first) if ev is not None]
    assert seen == [(p, ev) for p, ev in enumerate(run, 10) if ev is not None]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["stats", "message", "action"]), st.integers(0, 5)),
        min_size=1,
        max_size=300,
    ),
    segment_size=st.sampled_from([1024, 2048, 64 * 1024]),
    forget=st.booleans(),
)
def test_every_position_reads_the_same_by_every_path(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[str, int]],
    segment_size: int,
    forget: bool,
) -> None:
    """After a compaction, fetch, read_runs and read_groups agree on every position."""
    d = tmp_path_factory.mktemp("holes") / "s"

    async def run() -> None:
        async with EventStore(d, durability="flush", segment_size=segment_size) as store:
            for t, (kind, user) in enumerate(ops):
                name = f"u{user}"
                if kind == "stats":
                    await store.save_user_stats(name, chat_lines=1, last_seen=t)
                elif kind == "message":
                    await store.save_message(name, f"m{t}", timestamp=t)
                else:
                    await store.log_user_action(name, "join", timestamp=t)
            if forget:
                await store.forget_user("u0")  # compacts too
            else:
                await store.compact()
            head = store.log.head
        log = SegmentLog(str(d), read_only=True)
        await log.open()
        try:
            runs = {p: ev async for p, ev in log.read()}
            grouped = {
                p: ev
                async for group in log.read_groups(1)
                for first, events in group
                for p, ev in enumerate(events, first)
                if ev is not None
            }
            assert grouped == runs
            for p in range(1, head + 1):
                if p in runs:
                    assert await log.fetch([p]) == [runs[p]]
                else:
                    with pytest.raises(QueryError):
                        await log.fetch([p])
        finally:
            await log.close()
        assert find_damage(str(d)) is None

    asyncio.run(run())


async def test_a_flipped_byte_in_a_frame_with_holes_is_found(tmp_path: Path) -> None:
    """Any byte of a compacted frame changed: open refuses it at the frame, find_damage too."""
    d = tmp_path / "s"
    await _chat(d, lines=60)
    for snap in d.glob("*.snap"):
        snap.unlink()  # so that opening replays the compacted frames
    seg = _compacted(d)
    offset, _first, _count, payload = _frames(seg)[1]  # a frame after the first
    assert b"\xc0" in payload
    end = offset + FRAME_HEADER_SIZE + len(payload)
    for n, byte in enumerate([*range(offset, offset + 60), *range(end - 10, end)]):
        work = tmp_path / f"flip{n}"
        copy_store(d, work)
        target = work / seg.name
        data = bytearray(target.read_bytes())
        data[byte] ^= 0x40
        target.write_bytes(bytes(data))
        with pytest.raises(IntegrityError) as info:
            async with EventStore(work, read_only=True):
                pass
        assert seg.name in str(info.value) and f"offset {offset}" in str(info.value), byte
        damage = find_damage(str(work))
        assert damage is not None and damage.offset == offset, byte


def test_frames_cut_by_count_leave_holes_out_too() -> None:
    events = [MessageSaved(i, "u", "x") for i in range(3)]
    run = [events[0], *[None] * (FRAME_EVENTS - 1), None, events[1], None, None, events[2]]
    frames = segment_mod.encode_frames(5, run)
    decoded = [
        (first, decode_batch(data[FRAME_HEADER_SIZE:], holes=True)) for first, _, data in frames
    ]
    assert decoded == [(5, [events[0]]), (5 + FRAME_EVENTS + 1, [events[1], None, None, events[2]])]


async def test_the_fetch_cache_counts_what_its_split_events_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compacted frame holds up to 64 positions, most of them holes of a
    byte each, and each split into an object of its own: counted by their
    bytes alone, the cache held many times its cap (209 MiB under 8 MiB)."""
    from eventstore import segmentlog

    cap = 512 * 1024
    monkeypatch.setattr(segmentlog, "CACHE_BYTES", cap)
    async with EventStore(tmp_path / "s", durability="none") as store:
        for i in range(30_000):
            # Statistics updates that compaction folds away, a line now and then.
            await store.save_user_stats(f"u{i % 7}", chat_lines=1, last_seen=1_000 + i)
            if i % 25 == 0:
                await store.save_message(f"u{i % 7}", f"line {i}", timestamp=1_000 + i)
        await store.compact()
        lines = await store.get_recent_messages(limit=10**6)  # fetched from the log
        assert len(lines) == 1_200
        log = store.log
        assert isinstance(log, SegmentLog)
        windows = list(log._cache.values())
        split = sum(len(raws) for window, _ in windows for _, raws in window)
        assert len(windows) > 1 and split > 10 * len(lines) // len(windows)
        # What the split events cost alone stays under the cap, one window aside.
        assert segmentlog.RAW_BYTES * split <= cap + max(cost for _, cost in windows)
