"""recovery.cut_after: taking back the last events of a log (an unfinished import's)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from storeutil import all_events, copy_store, fill, frames_end, segment_files

from eventstore import ConnectionError, EventStore, IntegrityError, StorageError
from eventstore.events import MessageSaved
from eventstore.importmarker import (
    IMPORTING,
    IMPORTING_MORE,
    position_before,
    unfinished_import,
    write_marker,
)
from eventstore.recovery import cut_after, find_damage, repair, undo_import
from eventstore.segment import FRAME_HEADER_SIZE, HEADER_SIZE

pytestmark = pytest.mark.asyncio


def digest(directory: Path) -> dict[str, str]:
    """Every file's name and content hash (LOCK aside): "nothing changed"."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.name != "LOCK"
    }


def frame_starts(data: bytes) -> list[int]:
    """Offsets of a segment's frames, walked by their length fields."""
    starts = []
    off, end = HEADER_SIZE, frames_end(data)
    while off < end:
        starts.append(off)
        off += FRAME_HEADER_SIZE + int.from_bytes(data[off : off + 4], "little")
    return starts


async def make(directory: Path, n: int, **kwargs: object) -> list[object]:
    """A store of ``n`` one-event frames; returns its events."""
    async with EventStore(directory, durability="flush", **kwargs) as store:  # type: ignore[arg-type]
        await fill(store, n)
    return await all_events(directory)


async def test_a_cut_in_the_last_segment_leaves_the_events_before_it(tmp_path: Path) -> None:
    d = tmp_path / "s"
    events = await make(d, 50)
    report = cut_after(str(d), 30)
    assert report.position == 30 and report.bytes_cut > 0
    assert await all_events(d) == events[:30]
    assert find_damage(str(d)) is None
    async with EventStore(d) as store:
        assert store.position == 30
        await store.save_message("zed", "after the cut", timestamp=5000)
        assert store.position == 31
    assert (await all_events(d))[-1] == MessageSaved(5000, "zed", "after the cut")


async def test_a_cut_removes_later_segments_snapshots_past_it_and_the_tail_index(
    tmp_path: Path,
) -> None:
    d = tmp_path / "s"
    async with EventStore(d, durability="flush", segment_size=1024, snapshot_every=20) as store:
        await fill(store, 100)
    events = await all_events(d)
    segments = segment_files(d)
    assert len(segments) >= 4 and (d / "tail.index").exists()
    snaps = sorted(p.name for p in d.glob("snapshot-*.snap"))
    older, newer = (int(name[9:29]) for name in snaps)  # the two newest are kept
    assert 37 < older < newer
    # Past the older snapshot, before the newer: the older stays, and is used.
    cut_after(str(d), newer - 1)
    assert sorted(p.name for p in d.glob("snapshot-*.snap")) == snaps[:1]
    async with EventStore(d, read_only=True) as store:
        assert store.position == newer - 1 and store._snap_pos == older  # loaded, then replayed
    position = 37
    report = cut_after(str(d), position)
    assert segment_files(d) == [p for p in segments if int(p.name[:20]) <= position + 1]
    assert segment_files(d) != segments
    assert not (d / "tail.index").exists() and not list(d.glob("snapshot-*.snap"))
    assert str(segments[-1]) in report.removed
    assert await all_events(d) == events[:position]
    async with EventStore(d, segment_size=1024) as store:
        assert store.position == position


async def test_a_cut_at_a_segment_s_first_position_leaves_it_empty(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, durability="flush", segment_size=1024) as store:
        await fill(store, 60)
    events = await all_events(d)
    second = segment_files(d)[1]
    position = int(second.name[:20]) - 1
    cut_after(str(d), position)
    assert segment_files(d)[-1] == second and second.stat().st_size == HEADER_SIZE
    assert await all_events(d) == events[:position]
    assert find_damage(str(d)) is None


async def test_a_log_that_ends_at_or_before_the_position_is_left_as_it_is(
    tmp_path: Path,
) -> None:
    d = tmp_path / "s"
    await make(d, 20)
    before = digest(d)
    for position in (20, 21, 10**6):
        report = cut_after(str(d), position)
        assert (report.bytes_cut, report.removed) == (0, [])
        assert digest(d) == before


async def test_a_frame_holding_events_on_both_sides_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d) as store:
        await fill(store, 5)
        await store.append([MessageSaved(2000 + i, "bob", f"b{i}") for i in range(10)])
    before = digest(d)
    with pytest.raises(StorageError, match=r"holds positions 6\.\.15, so the log cannot be cut"):
        cut_after(str(d), 9)
    assert digest(d) == before
    cut_after(str(d), 5)  # between the frames: fine
    assert len(await all_events(d)) == 5


async def test_damage_before_the_cut_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "s"
    await make(d, 40)
    (seg,) = segment_files(d)
    data = bytearray(seg.read_bytes())
    data[HEADER_SIZE + 30] ^= 0x40  # inside the first frame
    seg.write_bytes(bytes(data))
    before = digest(d)
    with pytest.raises(IntegrityError, match="before position 31; nothing was cut"):
        cut_after(str(d), 30)
    assert digest(d) == before


async def test_a_torn_frame_after_the_cut_is_cut_with_the_rest(tmp_path: Path) -> None:
    """What a killed writer leaves: the last frame half written."""
    d = tmp_path / "s"
    events = await make(d, 40)
    (seg,) = segment_files(d)
    data = seg.read_bytes()
    end = frames_end(data)
    seg.write_bytes(data[: end - 7])  # the last frame (position 40) torn
    cut_after(str(d), 25)
    assert await all_events(d) == events[:25]
    assert find_damage(str(d)) is None
    # Torn right where the cut falls: nothing of the events after it is whole.
    d2 = tmp_path / "s2"
    events = await make(d2, 10)
    (seg,) = segment_files(d2)
    data = seg.read_bytes()
    last = frame_starts(data)[-1]  # position 10's frame
    seg.write_bytes(data[: last + 5])  # torn inside its header
    cut_after(str(d2), 9)
    assert await all_events(d2) == events[:9]
    assert find_damage(str(d2)) is None


async def test_a_cut_a_crash_interrupted_is_finished_by_the_next(tmp_path: Path) -> None:
    """Segments go last first: a crash leaves a prefix of the log, and the
    next call cuts the rest."""
    d = tmp_path / "s"
    async with EventStore(d, durability="flush", segment_size=1024) as store:
        await fill(store, 100)
    whole = copy_store(d, tmp_path / "whole")
    segments = segment_files(d)
    os.unlink(segments[-1])  # as if the crash came right after this removal
    cut_after(str(d), 30)
    cut_after(str(whole), 30)
    assert digest(d).keys() == digest(whole).keys()
    assert await all_events(d) == await all_events(whole)


async def test_a_cut_waits_for_no_writer(tmp_path: Path) -> None:
    d = tmp_path / "s"
    await make(d, 10)
    async with EventStore(d) as store:
        before = digest(d)
        with pytest.raises(StorageError, match="already open for writing"):
            cut_after(str(d), 5)
        assert digest(d) == before
        assert store.position == 10


async def test_a_position_must_be_a_whole_number(tmp_path: Path) -> None:
    d = tmp_path / "s"
    await make(d, 3)
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(ValueError, match="position must be an int >= 0"):
            cut_after(str(d), bad)  # type: ignore[arg-type]


async def test_the_import_markers(tmp_path: Path) -> None:
    d = tmp_path / "s"
    await make(d, 3)
    assert unfinished_import(str(d)) is None and position_before(str(d)) is None
    path = write_marker(str(d), 3)
    assert os.path.basename(path) == IMPORTING_MORE and position_before(str(d)) == 3
    assert "the events after position 3 are part of a file" in str(unfinished_import(str(d)))
    os.unlink(path)
    path = write_marker(str(d), None)
    assert os.path.basename(path) == IMPORTING and position_before(str(d)) is None
    assert "an import into it did not finish" in str(unfinished_import(str(d)))


async def test_a_marker_that_cannot_be_made_durable_is_not_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It would keep every writer out for an import that never began."""
    import eventstore.importmarker as importmarker

    def fails(fd: int) -> None:
        raise OSError(5, "Input/output error")

    d = tmp_path / "s"
    await make(d, 3)
    monkeypatch.setattr(importmarker.os, "fsync", fails)
    with pytest.raises(OSError):
        write_marker(str(d), 3)
    monkeypatch.undo()
    assert unfinished_import(str(d)) is None


async def follow(tmp_path: Path) -> tuple[Path, EventStore]:
    """A store of 100 one-event frames over several segments, and a follower of it."""
    d = tmp_path / "s"
    async with EventStore(d, durability="flush", segment_size=1024) as store:
        await fill(store, 100)
    follower = EventStore(d, read_only=True)
    await follower.connect()
    return d, follower


@pytest.mark.parametrize("where", ["an earlier segment", "the last segment"])
async def test_a_follower_open_across_a_cut_is_told_to_open_again(
    tmp_path: Path, where: str
) -> None:
    """Positions after the cut will hold other events: a follower that has
    read them must not go on as if the log had been compacted."""
    d, follower = await follow(tmp_path)
    try:
        assert follower.position == 100
        position = 30 if where == "an earlier segment" else 99
        cut_after(str(d), position)
        with pytest.raises(IntegrityError, match="open the store again"):
            await follower.refresh()
        with pytest.raises(IntegrityError, match="open the store again"):
            await follower.refresh()  # and again, not a log gone quiet
    finally:
        await follower.close()
    async with EventStore(d, read_only=True) as again:
        assert again.position == position


async def test_a_follower_open_across_a_repair_is_told_to_open_again(tmp_path: Path) -> None:
    """The same for repair, which sets the segments after the damage aside."""
    d, follower = await follow(tmp_path)
    try:
        second = segment_files(d)[1]
        data = bytearray(second.read_bytes())
        data[HEADER_SIZE + 30] ^= 0x40
        second.write_bytes(bytes(data))
        assert repair(str(d)).repaired
        with pytest.raises(IntegrityError, match="open the store again"):
            await follower.refresh()
    finally:
        await follower.close()


async def test_undo_import_acts_on_the_marker_it_reads_under_the_lock(tmp_path: Path) -> None:
    d = tmp_path / "s"
    events = await make(d, 40)
    before = digest(d)
    assert undo_import(str(d)) is None  # no marker: nothing to undo
    assert digest(d) == before
    write_marker(str(d), 25)
    marked = digest(d)
    # Another run's marker (it names another position): left to that run.
    assert undo_import(str(d), before=24) is None
    assert digest(d) == marked
    with pytest.raises(ConnectionError, match="IMPORTING-MORE is there"):
        await EventStore(d).connect()  # no writer while the marker is there
    assert undo_import(str(d), before=25) == 25
    assert not (d / IMPORTING_MORE).exists()
    assert await all_events(d) == events[:25]
    # A second run that read the marker before the first removed it finds
    # none under the lock, and cuts nothing (the store may hold a new
    # import by then).
    async with EventStore(d) as store:
        await fill(store, 5, prefix="new")
    assert undo_import(str(d)) is None
    assert len(await all_events(d)) == 30


async def test_a_follower_is_told_even_when_new_events_refill_the_cut(tmp_path: Path) -> None:
    """By the follower's next look the cut positions may hold new events
    again, past what it had read: the head alone cannot tell."""
    d, follower = await follow(tmp_path)
    try:
        cut_after(str(d), 30)
        async with EventStore(d, durability="flush", segment_size=1024) as store:
            await fill(store, 120, prefix="other")
        with pytest.raises(IntegrityError, match="open the store again"):
            await follower.refresh()
            await follower.refresh()  # the second look takes up new files
    finally:
        await follower.close()


async def test_a_follower_is_told_of_a_cut_a_compaction_followed(tmp_path: Path) -> None:
    """The compaction's new segments made the cut look like its own doing, and
    the follower went on with events that are no longer in the log: CUTS tells."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024) as writer:
        for i in range(100):
            await writer.save_user_stats("old", chat_lines=1, last_seen=1000 + i)
    follower = EventStore(d, read_only=True)
    await follower.connect()
    try:
        cut_after(str(d), 50)
        assert (d / "CUTS").read_bytes() == b"2\n"  # counted before and after
        async with EventStore(d, segment_size=1024) as writer:
            for i in range(30):
                await writer.save_user_stats("new", chat_lines=1, last_seen=5000 + i)
            await writer.compact()
            for i in range(30, 100):
                await writer.save_user_stats("new", chat_lines=1, last_seen=5000 + i)
        with pytest.raises(IntegrityError, match="the log was cut since this reader opened"):
            await follower.refresh()
    finally:
        await follower.close()
    async with EventStore(d, read_only=True) as again:  # opened anew: fine
        stats = {u["username"]: u["total_chat_lines"] for u in await again.get_all_user_stats()}
        assert stats == {"old": 50, "new": 100}


async def test_cuts_is_a_file_of_the_store_for_verify_and_info(tmp_path: Path) -> None:
    from eventstore.inspect import store_info
    from eventstore.verify import verify

    d = tmp_path / "s"
    await make(d, 20)
    cut_after(str(d), 10)
    assert (d / "CUTS").exists()
    report = verify(d)
    assert report.ok and not [n for n in report.notes if "CUTS" in n], report.notes
    assert store_info(d).other_files == []


@pytest.mark.parametrize("then", ["the cut run again", "a writer's open"])
async def test_a_cut_killed_between_its_two_counts_is_counted_again(
    tmp_path: Path, then: str
) -> None:
    """The count is left odd, and a follower that opened during the cut
    recorded it; run again, the cut finds nothing to cut.  Something must
    still count, or that follower is never told."""
    d, follower = await follow(tmp_path)
    try:
        cut_after(str(d), 30)
        (d / "CUTS").write_bytes(b"1\n")  # as if killed before the second count
        (d / "CUTS.tmp").write_bytes(b"2")  # and inside it
        await follower.close()
        follower = EventStore(d, read_only=True)
        await follower.connect()  # opened "during" the cut: it records the odd count
        if then == "the cut run again":
            assert cut_after(str(d), 30).bytes_cut == 0
        else:
            async with EventStore(d, durability="flush", segment_size=1024):
                pass
        assert (d / "CUTS").read_bytes() == b"2\n" and not (d / "CUTS.tmp").exists()
        with pytest.raises(IntegrityError, match="the log was cut since this reader opened"):
            await follower.refresh()
    finally:
        await follower.close()
