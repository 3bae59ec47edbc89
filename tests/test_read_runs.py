"""Replay's reading of frames: runs over any range, and bad payloads named by offset.

Replay decodes many frames in one call (segmentlog.RUN_EVENTS events at a
time); these tests pin down that it still yields exactly the events asked
for, and that a frame whose checksum matches but whose payload is bad is
still reported at its own offset.
"""

from __future__ import annotations

import asyncio
import random
import struct
import zlib
from itertools import pairwise
from pathlib import Path

import pytest
from storeutil import frames_end, segment_files

import eventstore.segmentlog as segmentlog_mod
from eventstore import EventStore, IntegrityError
from eventstore.codec import decode_frames, encode_batch
from eventstore.events import MessageSaved, UserCountLogged
from eventstore.segment import FRAME_HEADER_SIZE, HEADER_SIZE
from eventstore.segmentlog import RUN_EVENTS, SegmentLog
from projections import Projections


async def _mixed_store(d: Path) -> list[object]:
    """One-event frames (awaited writes) and full frames (bulk appends), several segments."""
    async with EventStore(d, durability="flush", segment_size=8192) as store:
        for i in range(300):
            await store.save_message(f"u{i % 7}", f"m{i}", timestamp=i)
        await store.append([UserCountLogged(1000 + i, i, i + 1) for i in range(700)])
        for i in range(300):
            await store.save_message("late", f"l{i}", timestamp=2000 + i)
        return [ev async for _, ev in store.read()]


async def test_runs_cover_exactly_the_range_asked_for(tmp_path: Path) -> None:
    d = tmp_path / "s"
    events = await _mixed_store(d)
    assert len(events) == 1300 > 2 * RUN_EVENTS
    assert len(segment_files(d)) > 3
    log = SegmentLog(str(d), read_only=True)
    await log.open()
    try:
        rng = random.Random(7)
        ranges = [(1, 1300), (0, None), (1300, 1300), (1, 1), (255, 258), (299, 302)]
        ranges += [tuple(sorted(rng.sample(range(1, 1301), 2))) for _ in range(40)]
        for lo, hi in ranges:
            got = []
            async for first, run in log.read_runs(lo, hi):
                assert run, "no empty runs"
                got.extend(enumerate(run, first))
            top = 1300 if hi is None else hi
            want = list(enumerate(events, 1))[max(lo, 1) - 1 : top]
            assert got == want, (lo, hi)
    finally:
        await log.close()


async def _compacted_store(d: Path) -> list[tuple[int, object]]:
    """A compacted log whose kept events are rarely neighbours, as after a busy channel.

    Every message follows a statistics update of its user; compaction drops
    all but each user's last update, so most runs it leaves are one event.
    Then a tail that was not compacted.
    """
    async with EventStore(d, durability="flush", segment_size=16384) as store:
        for i in range(900):
            await store.save_user_stats(f"u{i % 5}", chat_lines=1, last_seen=i)
            await store.save_message(f"u{i % 5}", f"m{i}", timestamp=i)
        await store.compact()
        for i in range(100):
            await store.save_message("late", f"l{i}", timestamp=2000 + i)
        return [item async for item in store.read()]


async def test_groups_hold_the_runs_of_read_runs(tmp_path: Path) -> None:
    d = tmp_path / "s"
    events = await _compacted_store(d)
    assert 1000 < len(events) < 1100  # 900 messages, 5 statistics, 100 late
    log = SegmentLog(str(d), read_only=True)
    await log.open()
    try:
        for lo, hi in [(0, None), (1, 1900), (2, 2), (17, 1333), (1799, 1900), (1801, 2900)]:
            runs = [run async for run in log.read_runs(lo, hi)]
            groups = [group async for group in log.read_groups(lo, hi)]
            assert all(groups), "no empty groups"
            top = 2900 if hi is None else hi
            want = [(p, e) for p, e in events if lo <= p <= top]
            # read_runs: no holes, each run's events at consecutive positions.
            assert all(None not in run for _, run in runs)
            assert [(p, e) for first, run in runs for p, e in enumerate(run, first)] == want
            # read_groups: the same events at the same positions, holes aside.
            got = [
                (p, e)
                for group in groups
                for first, run in group
                for p, e in enumerate(run, first)
                if e is not None
            ]
            assert got == want, (lo, hi)
        # What the groups are for: the compacted frames come many positions to
        # a run (holes for the statistics updates dropped between the
        # messages), and many runs to a step.
        groups = [group async for group in log.read_groups(1, 1800)]
        runs = [run for group in groups for run in group]
        assert sum(run.count(None) for _, run in runs) > 800
        assert len(runs) < 60 and len(groups) < 10
    finally:
        await log.close()


async def test_a_range_ending_before_it_starts_is_empty(tmp_path: Path) -> None:
    """Regression: both ends in one frame, the cut at the end made a negative
    slice, and read(10, 8) returned positions 10 to 20."""
    d = tmp_path / "s"
    async with EventStore(d, durability="flush", snapshot_every=None) as store:
        await store.append([MessageSaved(i, "u", f"m{i}") for i in range(20)])  # one frame
        assert [p async for p, _ in store.read(10, 8)] == []
    log = SegmentLog(str(d), read_only=True)
    await log.open()
    try:
        for lo, hi in [(10, 8), (20, 19), (2, 1), (21, 20), (5, 0)]:
            assert [run async for run in log.read_runs(lo, hi)] == [], (lo, hi)
            assert [group async for group in log.read_groups(lo, hi)] == [], (lo, hi)
        assert [p async for p, _ in log.read(10, 10)] == [10]
    finally:
        await log.close()


async def test_a_read_left_early_lets_go_of_the_log(tmp_path: Path) -> None:
    d = tmp_path / "s"
    await _compacted_store(d)
    log = SegmentLog(str(d), read_only=True)
    await log.open()
    try:
        runs = log.read_runs(1)
        await anext(runs)
        assert log._readers == 1
        await runs.aclose()  # type: ignore[attr-defined]
        assert log._readers == 0  # the groups it read from were closed with it
    finally:
        await log.close()


async def test_apply_runs_folds_as_apply_run(tmp_path: Path) -> None:
    d = tmp_path / "s"
    await _compacted_store(d)
    one, grouped = Projections(), Projections()
    log = SegmentLog(str(d), read_only=True)
    await log.open()
    try:
        async for first, run in log.read_runs(1):
            one.apply_run(first, run)
        async for group in log.read_groups(1):
            grouped.apply_runs(group)
    finally:
        await log.close()
    assert grouped.position == one.position == 1900
    assert grouped.state() == one.state()
    assert len(grouped.messages) == 1000


def _frame_at(data: bytes, index: int) -> tuple[int, int]:
    """(offset, payload length) of the frame number ``index`` of a segment."""
    off = HEADER_SIZE
    for _ in range(index):
        off += FRAME_HEADER_SIZE + struct.unpack_from("<I", data, off)[0]
    return off, struct.unpack_from("<I", data, off)[0]


def _rewrite_frame(path: Path, off: int, payload: bytes, count: int | None = None) -> None:
    """Put ``payload`` in the frame at ``off``, with a checksum that matches."""
    data = bytearray(path.read_bytes())
    length, _crc, first, old_count = struct.unpack_from("<IIQI", data, off)
    assert len(payload) == length
    struct.pack_into("<QI", data, off + 8, first, old_count if count is None else count)
    data[off + FRAME_HEADER_SIZE : off + FRAME_HEADER_SIZE + length] = payload
    crc = zlib.crc32(bytes(data[off + 8 : off + FRAME_HEADER_SIZE + length]))
    struct.pack_into("<I", data, off + 4, crc)
    path.write_bytes(bytes(data))


async def _one_event_frames(d: Path, n: int = 40) -> Path:
    async with EventStore(d, durability="flush", snapshot_every=None) as store:
        for i in range(n):
            await store.save_message("u", f"m{i:02}", timestamp=i)
    for snap in d.glob("*.snap"):
        snap.unlink()  # so that opening replays every frame
    seg = segment_files(d)[0]
    assert frames_end(seg.read_bytes()) == seg.stat().st_size
    return seg


async def test_an_undecodable_payload_with_a_good_checksum_is_named(tmp_path: Path) -> None:
    seg = await _one_event_frames(tmp_path / "s")
    off, length = _frame_at(seg.read_bytes(), 17)
    payload = bytearray(
        seg.read_bytes()[off + FRAME_HEADER_SIZE : off + FRAME_HEADER_SIZE + length]
    )
    assert payload[:3] == b"\x91\x94\x08"  # [[8, ...]]: one MessageSaved
    payload[2] = 99  # a tag no event has
    _rewrite_frame(seg, off, bytes(payload))
    with pytest.raises(IntegrityError, match=f"undecodable event batch at .*offset {off}"):
        async with EventStore(tmp_path / "s", read_only=True):
            pass


async def test_a_count_that_disagrees_with_the_payload_is_named(tmp_path: Path) -> None:
    seg = await _one_event_frames(tmp_path / "s")
    data = seg.read_bytes()
    off, length = _frame_at(data, 39)  # the last frame: no later frame to disagree with
    payload = data[off + FRAME_HEADER_SIZE : off + FRAME_HEADER_SIZE + length]
    _rewrite_frame(seg, off, payload, count=2)
    with pytest.raises(
        IntegrityError, match=f"frame at offset {off} holds 1 events, its header says 2"
    ):
        async with EventStore(tmp_path / "s", read_only=True):
            pass


def test_decode_frames_joins_payloads_and_checks_their_counts() -> None:
    small = [MessageSaved(i, "u", "x") for i in range(3)]
    big = [MessageSaved(i, "u", "y") for i in range(20)]  # array 16 header
    payloads = [encode_batch(small), encode_batch(big), encode_batch(small[:1])]
    assert payloads[1][0] == 0xDC
    assert decode_frames(payloads, [3, 20, 1]) == small + big + small[:1]
    assert decode_frames(payloads, [3, 19, 1]) is None  # a count that does not match
    assert decode_frames([b"\x92\xc1", payloads[0]], [2, 3]) is None  # undecodable
    assert decode_frames([b"", payloads[0]], [0, 3]) is None


async def test_a_long_read_hands_the_event_loop_back_between_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The groups of one chunk were yielded without a pause: a consumer that
    folds them (compaction, a follower's rebuild) held the loop for the whole
    chunk, up to a million positions.  A read pauses once READ_SLICE has
    passed since its last pause; with 0, after every group."""
    d = tmp_path / "s"
    async with EventStore(d, durability="none", snapshot_every=None) as store:
        await store.append(
            [MessageSaved(i, "ann", f"line {i}") for i in range(1, 20 * RUN_EVENTS + 1)]
        )
    monkeypatch.setattr(segmentlog_mod, "READ_SLICE", 0.0)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    log = SegmentLog(str(d), read_only=True)
    await log.open()
    ticker = asyncio.ensure_future(tick())
    seen = []
    try:
        async for _group in log.read_groups(1):
            seen.append(ticks)
    finally:
        ticker.cancel()
        await log.close()
    assert len(seen) >= 20
    # The ticker ran between (nearly) every two groups, not once a chunk.
    assert sum(b > a for a, b in pairwise(seen)) >= len(seen) - 2
