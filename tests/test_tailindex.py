"""tail.index: a writer's open walks the last segment only from the frame it names.

The file only saves time.  These tests check that it does (the open's walk
starts at the saved frame), that damage it lets the open skip is still
found (in the background, and by the reads it touches), and that whenever
it does not fit, or the walk from it finds anything but a clean end, the
open decides exactly as a full walk does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import struct
import time
import zlib
from array import array
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from storeutil import copy_store, record_walks, segment_files

from eventstore import EventStore, IntegrityError, StorageError
from eventstore import segmentlog as segmentlog_module
from eventstore.segment import FRAME_HEADER_SIZE, HEADER_SIZE
from eventstore.tailindex import TAIL_INDEX, read_tail_index, write_tail_index

N = 600  # one frame each: about 36 KB of frames, nine index entries


async def _store_of_small_frames(directory: Path, n: int = N) -> None:
    """A store whose last segment holds ``n`` one-event frames, closed cleanly."""
    async with EventStore(directory, durability="flush", snapshot_every=None) as store:
        for i in range(n):
            await store.save_message(f"user{i % 7}", f"line {i}", timestamp=1000 + i)


@pytest.fixture
async def small_frames(tmp_path: Path) -> Path:
    directory = tmp_path / "made"
    await _store_of_small_frames(directory)
    return directory


def _hint(directory: Path) -> Any:
    seg = segment_files(directory)[-1]
    store_id = seg.read_bytes()[28:44]
    return read_tail_index(str(directory), store_id, int(seg.stem))


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The offsets every frame walk of the log starts at, in order."""
    return record_walks(monkeypatch)


async def _checked(store: EventStore) -> None:
    """Wait for the background check (and indexing) that connect() starts.

    A close() before the check of the frames an open from tail.index skipped
    is done removes the file (test_a_close_before_the_check_removes_the_file).
    """
    indexer = store._log._indexer  # type: ignore[attr-defined]
    if indexer is not None:
        await indexer


async def _messages(directory: Path) -> list[dict[str, Any]]:
    async with EventStore(directory, snapshot_every=None) as store:
        await _checked(store)
        return await store.get_recent_messages(limit=10_000)


def _index_of(store: EventStore) -> tuple[list[int], list[int], int, int]:
    seg = store._log._segments[-1]  # type: ignore[attr-defined]
    return list(seg.frame_pos), list(seg.frame_off), seg.end, seg.next_position


async def test_close_saves_the_index_and_open_walks_from_its_last_entry(
    small_frames: Path, tmp_path: Path, walks: list[int]
) -> None:
    hint = _hint(small_frames)
    assert hint is not None and len(hint.offsets) > 5
    assert hint.offsets[0] == HEADER_SIZE and hint.positions[0] == 1

    without = copy_store(small_frames, tmp_path / "without")
    (without / TAIL_INDEX).unlink()
    async with EventStore(without, snapshot_every=None) as store:
        full = _index_of(store)
    assert walks == [HEADER_SIZE]

    walks.clear()
    store = EventStore(small_frames, snapshot_every=None)
    await store.connect()
    # The open walked from the saved frame; the check of the frames before it
    # runs afterwards, from the segment header.
    assert walks[0] == hint.offsets[-1] > HEADER_SIZE
    assert _index_of(store) == full
    assert store.position == N
    await _checked(store)
    assert walks[1] == HEADER_SIZE
    assert _index_of(store) == full
    rows = await store.get_recent_messages(limit=10_000)
    await store.close()
    assert [r["message"] for r in rows] == [f"line {i}" for i in reversed(range(N))]
    assert rows == await _messages(without)


async def test_a_reader_opens_from_the_saved_frame_too(
    small_frames: Path, walks: list[int]
) -> None:
    expected = await _messages(small_frames)
    walks.clear()
    async with EventStore(small_frames, read_only=True) as store:
        assert walks[0] == _hint(small_frames).offsets[-1]
        assert store.position == N
        assert await store.get_recent_messages(limit=10_000) == expected


async def test_a_follower_opened_from_the_saved_frame_follows_the_writer(
    small_frames: Path, walks: list[int]
) -> None:
    async with EventStore(small_frames, snapshot_every=None) as writer:
        await writer.save_message("w", "while the reader opens", timestamp=9_000)
        walks.clear()
        async with EventStore(small_frames, read_only=True) as reader:
            assert walks[0] == _hint(small_frames).offsets[-1]
            assert reader.position == N + 1
            for i in range(50):
                await writer.save_message("w", f"then {i}", timestamp=9_001 + i)
            await reader.refresh()
            assert reader.position == N + 51
            assert await reader.get_recent_messages(
                limit=10_000
            ) == await writer.get_recent_messages(limit=10_000)


async def test_the_index_follows_the_log_across_sessions(small_frames: Path) -> None:
    first = _hint(small_frames)
    async with EventStore(small_frames, durability="flush", snapshot_every=None) as store:
        for i in range(200):
            await store.save_message("late", f"late {i}", timestamp=5000 + i)
    second = _hint(small_frames)
    assert second.offsets[-1] > first.offsets[-1]
    assert list(second.offsets[: len(first.offsets)]) == list(first.offsets)
    assert len(await _messages(small_frames)) == N + 200


@pytest.mark.parametrize("durability", ["fsync", "flush"])
async def test_a_snapshot_saves_the_index_in_fsync_mode(
    tmp_path: Path, walks: list[int], durability: str
) -> None:
    """A start after a crash walks only what came after the last snapshot
    ("fsync": every frame the file names was synced).  In "flush" mode a
    power cut may lose frames before the one it would name, so only close()
    saves it, after its fdatasync."""
    made = tmp_path / "made"
    async with EventStore(made, durability=durability, snapshot_every=None) as store:
        for i in range(600):
            await store.save_message("u", f"line {i}", timestamp=i)
        await store.write_snapshot()
        for i in range(600, 650):
            await store.save_message("u", f"line {i}", timestamp=i)
        crashed = copy_store(made, tmp_path / "crashed")  # as a kill leaves it
    if durability == "flush":
        assert not (crashed / TAIL_INDEX).exists()
        return
    hint = _hint(crashed)
    assert 500 < hint.positions[-1] <= 600
    walks.clear()
    async with EventStore(crashed, snapshot_every=None) as store:
        assert walks[0] == hint.offsets[-1]
        assert store.position == 650
        rows = await store.get_recent_messages(limit=10_000)
    assert [r["message"] for r in rows] == [f"line {i}" for i in reversed(range(650))]


async def test_a_log_without_frames_leaves_no_index(tmp_path: Path) -> None:
    async with EventStore(tmp_path / "s"):
        pass
    assert not (tmp_path / "s" / TAIL_INDEX).exists()
    async with EventStore(tmp_path / "s") as store:
        await store.save_message("a", "b")
    assert (tmp_path / "s" / TAIL_INDEX).exists()


def _damage_before_hint(directory: Path) -> int:
    """Flip a payload byte of a frame well before the saved frame; return its offset."""
    hint = _hint(directory)
    seg = segment_files(directory)[-1]
    data = bytearray(seg.read_bytes())
    frame = hint.offsets[2]  # a frame the open does not walk
    data[frame + FRAME_HEADER_SIZE + 3] ^= 0x40
    seg.write_bytes(bytes(data))
    return int(frame)


async def test_damage_before_the_saved_frame_is_logged_in_the_background(
    small_frames: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    frame = _damage_before_hint(small_frames)
    # Without the file the open walks that frame and refuses the log.
    without = copy_store(small_frames, tmp_path / "without")
    (without / TAIL_INDEX).unlink()
    with pytest.raises(IntegrityError, match=f"offset {frame}"):
        async with EventStore(without):
            pass

    caplog.set_level(logging.WARNING, logger="eventstore")
    store = EventStore(small_frames, snapshot_every=None)
    await store.connect()
    await _checked(store)
    seg = segment_files(small_frames)[-1]
    warned = [r.getMessage() for r in caplog.records if str(seg) in r.getMessage()]
    assert any(f"offset {frame}" in m and "checksum" in m for m in warned), warned
    # The newest rows do not touch that frame; a read that does fails.
    assert (await store.get_recent_messages(limit=5))[0]["message"] == f"line {N - 1}"
    with pytest.raises(IntegrityError, match=f"offset {frame}"):
        await store.get_recent_messages(limit=10_000)
    # The check removed the file at once: after a crash as after a close,
    # the next open walks the frames, and refuses the log as an open
    # without the file did above.
    assert not (small_frames / TAIL_INDEX).exists()
    crashed = copy_store(small_frames, tmp_path / "crashed")
    await store.save_message("after", "still writes")
    await store.close()
    assert not (small_frames / TAIL_INDEX).exists()
    for directory in (crashed, small_frames):
        with pytest.raises(IntegrityError, match=f"offset {frame}"):
            async with EventStore(directory):
                pass


def _rewrite(directory: Path, **change: Any) -> None:
    """Write tail.index again with some fields changed (its checksum made right)."""
    hint = _hint(directory)
    seg = segment_files(directory)[-1]
    fields = {
        "store_id": seg.read_bytes()[28:44],
        "segment": hint.segment,
        "positions": hint.positions,
        "offsets": hint.offsets,
        "frame_header": hint.frame_header,
    }
    fields.update(change)
    write_tail_index(
        str(directory),
        fields["store_id"],
        fields["segment"],
        fields["positions"],
        fields["offsets"],
        fields["frame_header"],
    )


def _flip_byte(directory: Path) -> None:
    path = directory / TAIL_INDEX
    data = bytearray(path.read_bytes())
    data[70] ^= 1
    path.write_bytes(bytes(data))


def _cut(directory: Path) -> None:
    path = directory / TAIL_INDEX
    path.write_bytes(path.read_bytes()[:-8])


def _other_header(directory: Path) -> None:
    hint = _hint(directory)
    header = bytearray(hint.frame_header)
    header[4] ^= 1  # the checksum field: another frame than the one there
    _rewrite(directory, frame_header=bytes(header))


def _past_the_end(directory: Path) -> None:
    seg = segment_files(directory)[-1]
    end = len(seg.read_bytes())
    hint = _hint(directory)
    hint.offsets[-1] = end
    _rewrite(directory, offsets=hint.offsets)


def _other_store(directory: Path) -> None:
    _rewrite(directory, store_id=os.urandom(16))


def _other_segment(directory: Path) -> None:
    _rewrite(directory, segment=2)


def _without_the_first_entry(directory: Path) -> None:
    # A replay or a read before the second entry starts at the first: it
    # must be the segment's first frame, or events before it go unread.
    hint = _hint(directory)
    _rewrite(directory, positions=hint.positions[1:], offsets=hint.offsets[1:])


def _only_the_last_entry(directory: Path) -> None:
    hint = _hint(directory)
    _rewrite(directory, positions=hint.positions[-1:], offsets=hint.offsets[-1:])


@pytest.mark.parametrize(
    "spoil",
    [
        _flip_byte,
        _cut,
        _other_header,
        _past_the_end,
        _other_store,
        _other_segment,
        _without_the_first_entry,
        _only_the_last_entry,
    ],
)
async def test_an_index_that_does_not_fit_is_ignored(
    small_frames: Path, walks: list[int], spoil: Any
) -> None:
    expected = await _messages(small_frames)
    spoil(small_frames)
    walks.clear()
    async with EventStore(small_frames, snapshot_every=None) as store:
        assert walks == [HEADER_SIZE]  # the whole segment, and nothing after
        assert await store.get_recent_messages(limit=10_000) == expected


async def test_an_index_of_a_segment_since_rolled_is_ignored(
    small_frames: Path, walks: list[int]
) -> None:
    old = (small_frames / TAIL_INDEX).read_bytes()
    async with EventStore(small_frames, segment_size=4096) as store:
        for i in range(100):  # rolls: the segment is full
            await store.save_message("x", f"more {i}", timestamp=9000 + i)
    assert len(segment_files(small_frames)) >= 2  # the saved one is not the last
    (small_frames / TAIL_INDEX).write_bytes(old)
    walks.clear()
    async with EventStore(small_frames, segment_size=4096) as store:
        assert walks[0] == HEADER_SIZE
        assert len(await store.get_recent_messages(limit=10_000)) == N + 100


async def test_wrong_entries_before_the_saved_frame_are_rebuilt(
    small_frames: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    without = copy_store(small_frames, tmp_path / "without")
    (without / TAIL_INDEX).unlink()
    async with EventStore(without, snapshot_every=None) as store:
        full = _index_of(store)
    expected = await _messages(without)

    hint = _hint(small_frames)
    hint.offsets[3] += 1  # no frame starts there
    _rewrite(small_frames, offsets=hint.offsets)
    caplog.set_level(logging.WARNING, logger="eventstore")
    store = EventStore(small_frames, snapshot_every=None)
    await store.connect()
    await _checked(store)
    assert any("did not match" in r.getMessage() for r in caplog.records)
    assert _index_of(store) == full
    assert await store.get_recent_messages(limit=10_000) == expected
    await store.close()


async def test_an_index_naming_zeros_as_its_frame_is_ignored(
    tmp_path: Path, walks: list[int]
) -> None:
    """Zero-filled space after the last frame (an "fsync" writer's, copied
    while it ran) matches 20 zero bytes anywhere in it; taken for a frame,
    the walk from there would end clean, and the writer would write past a
    run of zeros, at positions no event has."""
    made = tmp_path / "made"
    async with EventStore(made, snapshot_every=None) as store:
        for i in range(300):
            await store.save_message("u", f"line {i}", timestamp=i)
        live = copy_store(made, tmp_path / "live")  # as a crash leaves it
    seg = segment_files(live)[-1]
    data = seg.read_bytes()
    end = data.rstrip(b"\0")
    zeros_at = len(end) + 1000
    assert data[zeros_at : zeros_at + 64] == bytes(64)
    write_tail_index(
        str(live),
        data[28:44],
        1,
        array("q", [1, 5000]),
        array("q", [HEADER_SIZE, zeros_at]),
        bytes(FRAME_HEADER_SIZE),
    )
    walks.clear()
    async with EventStore(live) as store:
        assert walks[0] == HEADER_SIZE
        assert store.position == 300
        await store.save_message("u", "next", timestamp=301)
        assert (await store.get_recent_messages(limit=1))[0]["id"] == 301


async def test_a_close_before_the_check_leaves_the_file_as_it_was(
    small_frames: Path, walks: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saved again, the index would cover frames no check has passed; removed,
    the next start would walk them all (``eventstore snapshot`` before a
    restart made the restart slow).  Left alone, it names the same frames,
    and the next open skips them and checks them again."""
    monkeypatch.setattr(segmentlog_module, "INDEX_CHUNK", 4096)  # a check of nine calls
    before = (small_frames / TAIL_INDEX).read_bytes()
    store = EventStore(small_frames, snapshot_every=None)
    await store.connect()
    assert walks[0] > HEADER_SIZE
    await asyncio.sleep(0)  # the check begins, and is cut short
    await store.save_message("late", "written after the saved frame", timestamp=5_000)
    await store.close()
    assert (small_frames / TAIL_INDEX).read_bytes() == before
    walks.clear()
    entries = len(_hint(small_frames).offsets)
    async with EventStore(small_frames, durability="flush", snapshot_every=None) as store:
        assert walks[0] == _hint(small_frames).offsets[-1]
        assert store.position == N + 1
        await _checked(store)
        for i in range(100):  # past the next entry
            await store.save_message("later", f"line {i}", timestamp=6_000 + i)
    assert len(_hint(small_frames).offsets) > entries  # checked, then saved anew


async def test_a_close_after_a_failed_write_leaves_the_file_as_it_was(
    small_frames: Path,
) -> None:
    before = (small_frames / TAIL_INDEX).read_bytes()
    store = EventStore(small_frames, snapshot_every=None)
    await store.connect()
    store._log._fail(StorageError("a failing disk"), [])  # type: ignore[attr-defined]
    with contextlib.suppress(StorageError):
        await store.close()
    assert (small_frames / TAIL_INDEX).read_bytes() == before


async def test_one_store_object_across_opens_starts_afresh(small_frames: Path) -> None:
    """State of an open from the file (frames unchecked) does not outlive its close."""
    store = EventStore(small_frames, snapshot_every=None)
    await store.connect()  # from the file; closed before its check
    await store.close()
    (small_frames / TAIL_INDEX).unlink()
    await store.connect()  # a full walk: nothing unchecked
    await store.close()
    assert _hint(small_frames) is not None


async def test_a_reader_whose_walk_from_the_file_fails_walks_it_all(
    small_frames: Path, walks: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a writer does: the whole walk decides, on an index of its own."""
    async with EventStore(small_frames, read_only=True) as store:
        full = _index_of(store)
    real = segmentlog_module.SegmentLog._continue_scan
    failed: list[int] = []

    def failing_once(log: Any, seg: Any, live: bool = True) -> None:
        if seg.end > HEADER_SIZE and not failed:  # the walk from the saved frame
            failed.append(seg.end)
            raise IntegrityError("what looked like damage after the saved frame")
        real(log, seg, live)

    monkeypatch.setattr(segmentlog_module.SegmentLog, "_continue_scan", failing_once)
    walks.clear()
    async with EventStore(small_frames, read_only=True) as store:
        assert failed and walks[-1] == HEADER_SIZE
        assert _index_of(store) == full
        assert store.position == N


async def test_a_check_whose_segment_compaction_replaced_stops_quietly(
    small_frames: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Compaction read every frame of the segment to prove its rewrite."""
    monkeypatch.setattr(segmentlog_module, "INDEX_CHUNK", 1024)  # 36 calls
    real = segmentlog_module._index_frames
    saved_frame = _hint(small_frames).offsets[-1]
    stops: list[int] = []

    def slow(seg: Any, start: int, position: int, stop: int, *args: Any, **kw: Any) -> Any:
        stops.append(stop)
        time.sleep(0.02)  # in the log's thread: the check spans the compaction
        return real(seg, start, position, stop, *args, **kw)

    monkeypatch.setattr(segmentlog_module, "_index_frames", slow)
    caplog.set_level(logging.WARNING, logger="eventstore")
    store = EventStore(small_frames, snapshot_every=None)
    await store.connect()
    await store.forget_user("user3")  # rolls, and compacts the segment being checked
    await _checked(store)
    assert saved_frame not in stops  # the check stopped before the saved frame
    await store.save_message("late", "after the compaction", timestamp=9_000)
    await store.close()
    assert _hint(small_frames) is not None  # nothing left unchecked: saved
    assert [r.getMessage() for r in caplog.records] == []
    assert len(await _messages(small_frames)) == 1 + sum(1 for i in range(N) if i % 7 != 3)


# -- the same decisions as a full walk -------------------------------------------


def _outcome(directory: Path, error: BaseException | None, store: Any) -> Any:
    """What an open decided: its error, or the log it left and the events it read."""
    if error is not None:
        return type(error).__name__, str(error).replace(str(directory), "<dir>")
    seg = segment_files(directory)[-1]
    return "opened", seg.read_bytes(), store


async def _open(directory: Path, read_only: bool = False) -> Any:
    try:
        async with EventStore(directory, snapshot_every=None, read_only=read_only) as store:
            rows = await store.get_recent_messages(limit=5)
            return _outcome(directory, None, (store.position, rows))
    except (IntegrityError, StorageError) as err:
        return _outcome(directory, err, None)


DAMAGE = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("zeros"), st.integers(0, 10**6), st.integers(1, 300)),
    st.tuples(st.just("append"), st.integers(0, 10**6), st.integers(1, 60)),
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(damage=DAMAGE, read_only=st.booleans())
async def test_damage_after_the_saved_frame_is_decided_as_without_the_index(
    small_frames: Path,
    tmp_path_factory: pytest.TempPathFactory,
    walks: list[int],
    damage: tuple[str, int, int],
    read_only: bool,
) -> None:
    """Flipped bits, cuts, zeroed runs and appended bytes in the part the open
    walks (from the saved frame to the end): with and without tail.index the
    open refuses with the same error, or cuts the same tail (a reader: leaves
    it) and reads the same; as a writer and as a reader."""
    kind, where, arg = damage
    seg_path = segment_files(small_frames)[-1]
    data = bytearray(seg_path.read_bytes())
    start = int(_hint(small_frames).offsets[-1])
    at = start + where % (len(data) - start)
    if kind == "flip":
        data[at] ^= 1 << arg
    elif kind == "cut":
        del data[at:]
    elif kind == "zeros":
        data[at : at + arg] = bytes(len(data[at : at + arg]))
    else:
        data += bytes((where + k * 37) % 256 for k in range(arg))
    outcomes = []
    for keep_index in (True, False):
        copy = tmp_path_factory.mktemp("case") / "store"
        copy_store(small_frames, copy)
        (copy / seg_path.name).write_bytes(bytes(data))
        if not keep_index:
            (copy / TAIL_INDEX).unlink()
        walks.clear()
        outcomes.append(await _open(copy, read_only))
        if keep_index:
            # Whether the open began its walk at the saved frame (it walks
            # the whole segment after it if that walk does not end clean).
            began = walks[0] > HEADER_SIZE
            who = "reader" if read_only else "writer"
            event(f"{who}, {kind}: {outcomes[0][0]}, began at the saved frame: {began}")
        shutil.rmtree(copy)
    assert outcomes[0] == outcomes[1]


# -- the bytes ------------------------------------------------------------------


async def test_bytes_as_documented(small_frames: Path) -> None:
    data = (small_frames / TAIL_INDEX).read_bytes()
    seg = segment_files(small_frames)[-1].read_bytes()
    n = struct.unpack_from("<I", data, 60)[0]
    assert data[:8] == bytes.fromhex("89 45 53 54 41 49 4c 0a")
    assert struct.unpack_from("<HH", data, 8) == (1, 0)
    assert struct.unpack_from("<I", data, 12)[0] == zlib.crc32(data[16:])
    assert data[16:32] == seg[28:44]  # the store id
    assert struct.unpack_from("<Q", data, 32)[0] == 1
    assert len(data) == 64 + 16 * n
    positions = struct.unpack_from(f"<{n}q", data, 64)
    offsets = struct.unpack_from(f"<{n}q", data, 64 + 8 * n)
    assert data[40:60] == seg[offsets[-1] : offsets[-1] + FRAME_HEADER_SIZE]
    for pos, off in zip(positions, offsets, strict=True):
        # Each entry names the frame header there: its first position.
        assert struct.unpack_from("<Q", seg, off + 8)[0] == pos
    assert all(b - a >= 4096 for a, b in pairwise(offsets))
    doc = (Path(__file__).parent.parent / "docs" / "format.md").read_text()
    assert "`\\x89ESTAIL\\n`" in doc and "## tail.index" in doc
