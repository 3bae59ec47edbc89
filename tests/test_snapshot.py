"""Snapshots: written atomically, used on connect, ignored (with a warning) when
they do not belong to the log, and never a source of wrong state."""

from __future__ import annotations

import contextlib
import logging
import shutil
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest
from storeutil import fill

from eventstore import EventStore, StorageError
from eventstore import snapshot as snapshot_mod
from eventstore.snapshot import check_snapshots, list_snapshots, read_snapshot, remove_snapshots
from projections import Projections


async def _busy(store: EventStore, n: int = 120, text: str = "line") -> None:
    for i in range(n):
        user = f"user{i % 7}"
        await store.save_user_stats(user, chat_lines=1, last_seen=1000 + i, session_start=900)
        await store.save_message(user, f"{text} {i}", timestamp=1000 + i)
        if i % 10 == 0:
            await store.log_user_action(user, "join", timestamp=1000 + i)
            await store.log_user_count(i, i + 1, timestamp=1000 + i)
            await store.update_channel_stats(max_users=i, timestamp=1000 + i)
        if i % 25 == 24:
            await store.end_session(user, timestamp=1000 + i)
            await store.clear_old_messages(30)


async def _full_replay_state(directory: Path) -> dict[str, object]:
    store = EventStore(directory, read_only=True)
    await store.connect()
    proj = Projections()
    async for pos, ev in store.read():
        proj.apply(pos, ev)
    await store.close()
    return proj.state()


async def test_connect_reads_and_decodes_the_snapshot_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 10M events reading, checking and decoding the snapshot held the
    event loop for a quarter of a second: it runs in a worker thread."""
    d = tmp_path / "s"
    async with EventStore(d) as store:
        await _busy(store)
    threads: list[int] = []
    real = snapshot_mod.read_snapshot

    def read(path: str) -> Any:
        threads.append(threading.get_ident())
        return real(path)

    monkeypatch.setattr(snapshot_mod, "read_snapshot", read)
    store = EventStore(d)
    await store.connect()
    try:
        assert threads and threading.get_ident() not in threads
        assert store.projections.position == store.position
        assert store.projections.state() == await _full_replay_state(d)
    finally:
        await store.close()


async def test_close_writes_a_snapshot_that_connect_uses(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=2048) as store:
        await _busy(store)
        position = store.position
        state = store.projections.state()
    snaps = list_snapshots(str(d))
    assert [s.position for s in snaps] == [position]
    _info, loaded = read_snapshot(snaps[0].path)
    assert loaded.state() == state
    async with EventStore(d, segment_size=2048) as store:
        assert store.projections.state() == state
        # Reads that go back to the log for rows work after a snapshot start.
        # 30 kept by the last clear at line 99, then lines 100..119.
        assert len(await store.get_recent_messages(limit=100)) == 50
        assert await store.get_user_actions(username="user0")
    assert await check_snapshots(str(d)) == []


async def test_connect_replays_only_the_tail_after_a_snapshot(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=2048) as store:
        await _busy(store, 60)
    async with EventStore(d, segment_size=2048, snapshot_every=None) as store:
        # Without a new snapshot on close... the write below is in the tail.
        await _busy(store, 40)
        state = store.projections.state()
    # close() still snapshots (snapshot_every only controls periodic ones).
    async with EventStore(d, segment_size=2048) as store:
        assert store.projections.state() == state
    assert state == await _full_replay_state(d)


async def test_periodic_snapshots_every_n_events(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, snapshot_every=50) as store:
        await fill(store, 130)
        await store.log.flush()  # type: ignore[attr-defined]
        import asyncio

        for _ in range(50):
            if len(list_snapshots(str(d))) >= 2:
                break
            await asyncio.sleep(0.01)
        positions = [s.position for s in list_snapshots(str(d))]
        assert len(positions) == 2  # the newest two are kept
        assert all(p >= 50 for p in positions)


def _corrupt(path: str, offset: int) -> None:
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("offset", [0, 12, 16, 40, 50, 60, 70, -1])
async def test_damaged_snapshot_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, offset: int
) -> None:
    d = tmp_path / "s"
    async with EventStore(d) as store:
        await _busy(store)
        state = store.projections.state()
    snap = list_snapshots(str(d))[0].path
    _corrupt(snap, offset)
    caplog.set_level(logging.WARNING)
    async with EventStore(d, snapshot_every=None) as store:
        assert store.projections.state() == state
    assert "ignoring snapshot" in caplog.text


async def test_truncated_snapshot_is_ignored(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d) as store:
        await _busy(store)
        state = store.projections.state()
    snap = Path(list_snapshots(str(d))[0].path)
    snap.write_bytes(snap.read_bytes()[:-10])
    async with EventStore(d) as store:
        assert store.projections.state() == state


async def test_foreign_snapshot_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    async with EventStore(a) as store:
        await _busy(store, 100)
    async with EventStore(b, snapshot_every=None) as store:
        await _busy(store, 100, text="other")
        await store.save_message("only-in-b", "hello", timestamp=1)
        state = store.projections.state()
    for f in b.glob("snapshot-*"):
        f.unlink()
    # A's snapshot, at a position B also has, but of other bytes.
    shutil.copy(list_snapshots(str(a))[0].path, b)
    caplog.set_level(logging.WARNING)
    async with EventStore(b, snapshot_every=None) as store:
        assert store.projections.state() == state
    assert "belongs to another store" in caplog.text


async def test_snapshot_past_the_end_of_a_cut_log_is_ignored(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024) as store:
        await fill(store, 100)
    # Drop the last segment entirely: the snapshot now covers missing events.
    segs = sorted(d.glob("*.seg"))
    segs[-1].unlink()
    state = await _full_replay_state(d)
    async with EventStore(d, segment_size=1024, snapshot_every=None) as store:
        assert store.projections.state() == state


async def test_a_stale_snapshot_of_a_later_position_never_pushes_out_a_new_one(
    tmp_path: Path,
) -> None:
    """After a cut log, an old snapshot of a later position sorts before the
    one just written: "keep the newest one" must keep the new one, and drop
    the stale one (which, here, still holds a user forgotten since)."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024) as store:
        await store.save_message("zebra_unicorn_42", "private words", timestamp=1)
        await fill(store, 100)
    stale = list_snapshots(str(d))
    assert [info.position for info in stale] == [101]
    segs = sorted(d.glob("*.seg"))
    segs[-1].unlink()  # the log is cut: it now ends before 101
    async with EventStore(d, segment_size=1024, snapshot_every=None) as store:
        assert store.position < 101
        assert await store.forget_user("zebra_unicorn_42")  # compacts, keeps 1 snapshot
        position = store.position
    assert [info.position for info in list_snapshots(str(d))] == [position]
    for path in d.iterdir():
        assert b"zebra_unicorn_42" not in path.read_bytes(), path.name
    async with EventStore(d, segment_size=1024, snapshot_every=None) as store:
        assert store.position == position
        assert await store.get_user_stats("zebra_unicorn_42") is None


async def test_a_new_snapshot_removes_what_a_crashed_one_left(tmp_path: Path) -> None:
    """A crash while writing a snapshot leaves its temporary file behind:
    the next snapshot removes it (it may hold a user forgotten since)."""
    d = tmp_path / "s"
    async with EventStore(d) as store:
        await fill(store, 10)
        leftover = d / "snapshot-00000000000000000005.snap.tmp"
        leftover.write_bytes(b"half a snapshot of zebra_unicorn_42")
        await store.write_snapshot()
        assert not leftover.exists()
        assert [info.position for info in list_snapshots(str(d))] == [10]


async def test_a_snapshot_that_runs_out_of_space_leaves_no_file_and_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot whose write fails (a full disk) removes its temporary file:
    left behind, it would hold the space it took, which on a full disk is the
    room the log's next writes need.  The error is a StorageError naming the
    file, and the previous snapshot stays usable."""
    import errno
    import os

    import eventstore.fsutil as fsutil

    d = tmp_path / "s"
    store = EventStore(d, snapshot_every=None)
    await store.connect()
    await _busy(store, 40)
    old = await store.write_snapshot()
    await _busy(store, 40, text="more")
    real_write = os.write
    budget = [300]

    def write(fd: int, data: bytes | memoryview) -> int:  # part of the payload, then ENOSPC
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, bytes(data[: budget[0]]))
        budget[0] -= n
        return n

    monkeypatch.setattr(fsutil.os, "write", write)
    with pytest.raises(StorageError, match=r"\.snap: cannot write the snapshot: No space"):
        await store.write_snapshot()
    monkeypatch.undo()
    assert sorted(p.name for p in d.iterdir() if "snap" in p.name) == [Path(old).name]
    # The store goes on, and the old snapshot still loads.
    await store.save_message("x", "after", timestamp=9000)
    position = store.position
    expected = store.projections.state()
    await store.log.close()  # as a crash would: no snapshot on close
    store2 = EventStore(d, snapshot_every=None)
    await store2.connect()
    assert store2.position == position
    assert store2.projections.state() == expected
    await store2.close()


async def test_verify_notes_a_stale_snapshot_and_reports_a_damaged_one(tmp_path: Path) -> None:
    """A snapshot connect() ignores without harm (past the end of a cut log)
    is a note, not a problem: verify stays ok.  A damaged snapshot file is a
    problem, named once; info does not call it current."""
    from eventstore.inspect import store_info
    from eventstore.verify import verify

    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024) as store:
        await fill(store, 100)
    sorted(d.glob("*.seg"))[-1].unlink()  # the log is cut before the snapshot
    report = verify(d)
    assert report.ok, report.problems
    assert any("ignored by connect(): it covers position 100, past" in n for n in report.notes)
    # A flipped payload byte.
    async with EventStore(d, segment_size=1024) as store:
        await store.save_message("x", "y", timestamp=5000)
    newest = list_snapshots(str(d))[0]
    data = bytearray(Path(newest.path).read_bytes())
    data[-5] ^= 0x40
    Path(newest.path).write_bytes(bytes(data))
    statuses = {snap.name: snap.status for snap in store_info(d).snapshots}
    assert statuses[Path(newest.path).name] == (
        "ignored: checksum mismatch (truncated, or its header or payload damaged)"
    )
    report = verify(d)
    assert [str(p) for p in report.problems] == [
        f"{newest.path}: checksum mismatch (truncated, or its header or payload damaged) "
        "at offset 0"
    ]
    # A file cut below its header is reported too, not passed over.
    Path(newest.path).write_bytes(bytes(data[:10]))
    report = verify(d)
    assert [p.path for p in report.problems] == [newest.path]
    assert "snapshot header is 10 bytes" in report.problems[0].message


@pytest.mark.parametrize("keep", [0, -1, 1.5])
async def test_write_snapshot_refuses_a_bad_keep(tmp_path: Path, keep: object) -> None:
    from eventstore import ValidationError

    async with EventStore(tmp_path / "s") as store:
        await fill(store, 3)
        await store.write_snapshot()
        with pytest.raises(ValidationError, match="keep must be an int of at least 1"):
            await store.write_snapshot(keep=keep)  # type: ignore[arg-type]
        assert [info.position for info in list_snapshots(str(tmp_path / "s"))] == [3]


async def test_memory_and_read_only_stores_keep_no_snapshots(tmp_path: Path) -> None:
    async with EventStore(":memory:") as store:
        await store.save_message("a", "b")
        with pytest.raises(StorageError):
            await store.write_snapshot()
    d = tmp_path / "s"
    async with EventStore(d, snapshot_every=None) as store:
        await store.save_message("a", "b")
        with pytest.raises(StorageError, match="empty") if False else _nothing():
            pass
    for f in d.glob("snapshot-*"):
        f.unlink()
    async with EventStore(d, read_only=True) as reader:
        with pytest.raises(StorageError, match="read-only"):
            await reader.write_snapshot()
    assert not list(d.glob("snapshot-*"))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


async def test_empty_store_has_nothing_to_snapshot(tmp_path: Path) -> None:
    async with EventStore(tmp_path / "s") as store:
        with pytest.raises(StorageError, match="empty"):
            await store.write_snapshot()
    assert not list((tmp_path / "s").glob("snapshot-*"))


async def test_check_snapshots_reports_a_snapshot_that_disagrees(tmp_path: Path) -> None:
    import msgspec

    from eventstore import snapshot as snapmod

    d = tmp_path / "s"
    async with EventStore(d) as store:
        await _busy(store, 50)
    info, proj = read_snapshot(list_snapshots(str(d))[0].path)
    # A well-formed snapshot with a wrong state (a lying writer).
    proj.channel.max_users = 999_999
    payload = msgspec.msgpack.encode(proj.dump())
    snapmod.write_snapshot(str(d), info.store_id, info.position, payload, info.frame_checksum)
    problems = await check_snapshots(str(d))
    assert len(problems) == 1 and "differs from a replay" in problems[0][2]


async def test_snapshot_rename_is_durable_before_older_ones_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from eventstore import snapshot as snapmod

    d = tmp_path / "s"
    for n in (10, 20, 30):  # three closes: three snapshots, two kept
        async with EventStore(d) as store:
            await _busy(store, n)
    calls: list[str] = []
    real_unlink, real_fsync_dir = os.unlink, snapmod.fsync_dir
    monkeypatch.setattr(snapmod.os, "unlink", lambda p: (calls.append("unlink"), real_unlink(p)))
    monkeypatch.setattr(
        snapmod, "fsync_dir", lambda p: (calls.append("fsync_dir"), real_fsync_dir(p))
    )
    async with EventStore(d) as store:
        await _busy(store, 5)
    # The rename made durable, then the removal, then the removal made durable.
    assert calls == ["fsync_dir", "unlink", "fsync_dir"], calls
    assert len(list_snapshots(str(d))) == 2


async def test_snapshot_survives_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from eventstore import snapshot as snapmod

    d = tmp_path / "s"
    real_write = os.write

    def dribble(fd: int, data: bytes | memoryview) -> int:
        return real_write(fd, bytes(data[:7]))  # never more than 7 bytes a call

    async with EventStore(d) as store:
        await _busy(store, 30)
        state = store.projections.state()
        monkeypatch.setattr(snapmod.os, "write", dribble)
        await store.write_snapshot()
        monkeypatch.undo()
    _info, loaded = read_snapshot(list_snapshots(str(d))[0].path)
    assert loaded.state() == state


def _as_other_snapshot(path: Path, position: int, *, version: int | None, flags: int = 0) -> Path:
    """A copy of the snapshot at ``path`` under another position, version or flags."""
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 10, flags)
    if version is not None:
        struct.pack_into("<I", data, 12, version)
    struct.pack_into("<Q", data, 16, position)
    other = path.with_name(f"snapshot-{position:020d}.snap")
    other.write_bytes(bytes(data))
    return other


async def test_a_new_snapshot_drops_those_this_code_cannot_load(tmp_path: Path) -> None:
    """Other projection versions and unreadable headers do not count among the
    kept ones, and go: they may hold what a forget_user erased since."""
    d = tmp_path / "s"
    async with EventStore(d, snapshot_every=None) as store:
        await _busy(store, 30)
        first = Path(await store.write_snapshot())
        old_version = _as_other_snapshot(first, 5, version=1)
        flagged = _as_other_snapshot(first, 6, version=None, flags=1)
        await _busy(store, 30, text="more")
        second = Path(await store.write_snapshot())
    assert not old_version.exists() and not flagged.exists()
    assert first.exists() and second.exists()  # the two newest this code loads


async def test_compaction_removes_snapshots_it_cannot_read_too(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, snapshot_every=None) as store:
        await _busy(store, 30)
        snap = Path(await store.write_snapshot())
    flagged = _as_other_snapshot(snap, 7, version=None, flags=1)
    assert [i.position for i in list_snapshots(str(d))] == [int(snap.stem[9:])]  # unlisted
    assert remove_snapshots(str(d), before=10) == 1
    assert not flagged.exists() and snap.exists()


async def test_a_cancelled_snapshot_keeps_its_lock_until_its_file_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling write_snapshot() does not stop the thread writing the file.
    The snapshot lock stays held until it is done: released at once, a
    forget_user's compaction ran meanwhile, and the old snapshot, landing
    after it, removed the compaction's newer one and kept the forgotten
    user's data on disk (and in the reads of the next connect())."""
    import asyncio
    import threading

    from eventstore import store as storemod

    d = tmp_path / "s"
    store = EventStore(d, snapshot_every=None)
    await store.connect()
    await store.save_message("alice", "secret of alice", timestamp=1)
    await store.log_user_action("alice", "join", details="alice joins", timestamp=1)
    await store.save_message("bob", "hello", timestamp=2)
    real = storemod.write_snapshot
    entered, release = threading.Event(), threading.Event()

    def held(*args: object) -> str:
        if not entered.is_set():
            entered.set()
            release.wait(10)  # in the executor, until the test lets go
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(storemod, "write_snapshot", held)
    snap = asyncio.ensure_future(store.write_snapshot())
    while not entered.is_set():
        await asyncio.sleep(0.001)
    snap.cancel()  # a timeout around write_snapshot()
    for _ in range(5):
        await asyncio.sleep(0)
    still_held = not snap.done() and store._snap_lock.locked()
    forget = asyncio.ensure_future(store.forget_user("alice"))
    await asyncio.sleep(0.05)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await snap
    assert await forget
    await store.close()
    assert still_held
    snaps = list_snapshots(d)
    assert snaps
    for info in snaps:
        assert b"alice" not in Path(info.path).read_bytes()
    async with EventStore(d) as again:
        assert await again.get_recent_messages() == [
            {"id": 3, "timestamp": 2, "username": "bob", "message": "hello"}
        ]
        assert await again.get_user_stats("alice") is None
        assert await again.get_user_actions() == []


async def test_verify_finds_a_damaged_position_in_a_snapshot_header(tmp_path: Path) -> None:
    """In format 1 the header had no checksum: a flipped bit in its position
    made the snapshot read as one past the log's end, a mere note."""
    from eventstore.verify import verify

    d = tmp_path / "s"
    async with EventStore(d) as store:
        for i in range(50):
            await store.save_message("alice", f"m{i}", timestamp=i)
    (snap,) = d.glob("snapshot-*.snap")
    data = bytearray(snap.read_bytes())
    # As format 1 wrote it (its checksum covers the payload alone); format 2's
    # covers the header too, and finds any flip.
    struct.pack_into("<H", data, 8, 1)
    struct.pack_into("<I", data, 52, zlib.crc32(data[64:]))
    data[18] ^= 1  # position 50 -> 65586
    snap.write_bytes(bytes(data))
    report = verify(d)
    assert not report.ok
    assert any("its header says position 65586, its name 50" in str(p) for p in report.problems)


async def test_every_flipped_byte_of_a_snapshot_is_found_and_never_used(tmp_path: Path) -> None:
    """Format 2's checksum covers the header: a flipped bit anywhere is a
    problem for verify (not a note about another version or a cut log), and
    connect() replays instead, to the same state."""
    from eventstore.verify import verify

    d = tmp_path / "s"
    async with EventStore(d) as store:
        for i in range(40):
            await store.save_message(f"u{i % 3}", f"m{i}", timestamp=i)
            await store.save_user_stats(f"u{i % 3}", chat_lines=1, last_seen=i)
        state = store.projections.state()
    (snap,) = d.glob("snapshot-*.snap")
    good = snap.read_bytes()
    assert struct.unpack_from("<H", good, 8) == (2,)
    for offset in [*range(64), len(good) // 2, len(good) - 1]:
        bad = bytearray(good)
        bad[offset] ^= 1 << (offset % 8)
        snap.write_bytes(bytes(bad))
        assert not verify(d).ok, offset
        async with EventStore(d, read_only=True) as store:
            assert store.projections.state() == state, offset
    snap.write_bytes(good)
    assert verify(d).ok


async def test_info_names_damage_in_a_snapshot_header_as_damage(tmp_path: Path) -> None:
    """Format 2's checksum covers the header: info says damaged, not "another
    version" or "another store" as the damaged field would read."""
    from eventstore.inspect import store_info

    d = tmp_path / "s"
    async with EventStore(d) as store:
        await store.save_message("alice", "m", timestamp=1)
    (snap,) = d.glob("snapshot-*.snap")
    good = snap.read_bytes()
    for offset in (12, 16, 24, 32, 48):
        bad = bytearray(good)
        bad[offset] ^= 1
        snap.write_bytes(bytes(bad))
        (status,) = [s.status for s in store_info(d).snapshots]
        assert status.startswith("ignored: checksum mismatch"), (offset, status)


async def test_verify_counts_the_snapshot_replays_in_its_progress(tmp_path: Path) -> None:
    """The replays that check snapshots take most of a verify of a long log:
    a bar that only counted the walk sat full while they ran."""
    from eventstore.verify import verify

    d = tmp_path / "s"
    async with EventStore(d, snapshot_every=200) as store:
        await _busy(store)
        await store.write_snapshot()
    positions = [s.position for s in list_snapshots(str(d))]
    assert len(positions) == 2
    walk = sum(p.stat().st_size for p in d.glob("*.seg"))
    seen: list[tuple[int, int]] = []
    report = verify(d, progress=lambda done, total: seen.append((done, total)))
    assert report.problems == [] and report.snapshots_checked == 2
    assert {total for _, total in seen} == {walk + sum(positions)}
    done = [n for n, _ in seen]
    assert done == sorted(done) and done[-1] == walk + sum(positions)
    assert any(walk < n < walk + sum(positions) for n in done)


@pytest.mark.parametrize("steps", range(8))
async def test_a_close_cancelled_half_way_leaves_periodic_snapshots_on(
    tmp_path: Path, steps: int
) -> None:
    """A timeout around close() may cancel it before it marks the store
    closed: the store goes on open, and must go on taking snapshots."""
    import asyncio

    d = tmp_path / "s"
    store = EventStore(d, durability="flush", snapshot_every=100)
    await store.connect()
    try:
        for i in range(150):
            await store.save_message("amy", f"m{i}", timestamp=1000 + i)
        closing = asyncio.create_task(store.close())
        for _ in range(steps):
            await asyncio.sleep(0)
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing
        if not store.is_connected:
            return  # closed before the cancel arrived: nothing goes on
        # Writes start snapshots: they go on (at 100 a snapshot may still be
        # being written, and the next is due 100 events after it).
        for i in range(3000):
            await store.save_message("amy", f"n{i}", timestamp=2000 + i)
            if i % 10 == 9:
                await asyncio.sleep(0.005)
            if any(s.position > 150 for s in list_snapshots(str(d))):
                break
        assert any(s.position > 150 for s in list_snapshots(str(d)))
    finally:
        await store.close()


async def test_a_snapshot_removed_as_it_is_read_is_passed_over_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader that lists the snapshots just before the writer removes one
    (it keeps the newest two; compaction removes stale ones): no warning of
    damage, and the next one is used."""
    import eventstore.snapshot as snapshot_mod

    d = tmp_path / "s"
    async with EventStore(d) as store:
        await _busy(store, 40)
        await store.write_snapshot()
        await _busy(store, 40)
    newest, _older = sorted(list_snapshots(str(d)), key=lambda s: -s.position)
    real = snapshot_mod.read_snapshot

    def removed_meanwhile(path: str) -> Any:
        if path == newest.path:
            Path(path).unlink()
        return real(path)

    monkeypatch.setattr(snapshot_mod, "read_snapshot", removed_meanwhile)
    with caplog.at_level(logging.INFO, logger="eventstore"):
        async with EventStore(d, read_only=True) as reader:
            assert reader.position == newest.position
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("was removed as it was read" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("error", [StorageError("No space left on device"), MemoryError()])
async def test_a_failed_periodic_snapshot_is_not_retried_at_every_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    """On a full disk a periodic snapshot fails; the next try waits another
    snapshot_every events instead of coming at every following write (each
    try serialises the whole projections on the loop and logs a warning).
    So for any other failure (no memory to serialise large projections)."""
    import asyncio

    import eventstore.store as store_mod

    tries = 0

    def full(*args: object) -> str:
        nonlocal tries
        tries += 1
        raise error

    monkeypatch.setattr(store_mod, "write_snapshot", full)
    async with EventStore(tmp_path / "s", snapshot_every=50, clock=lambda: 1) as store:
        for i in range(200):
            await store.save_message("a", "hi", timestamp=i)
            await asyncio.sleep(0)  # let each snapshot task finish, as between a bot's writes
        assert tries <= 4
        monkeypatch.undo()


@pytest.mark.parametrize("fails", ["fsync_dir", "_remove"])
async def test_a_snapshot_written_but_not_synced_or_tidied_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    import errno

    import eventstore.snapshot as snapshot_mod

    def eio(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    d = tmp_path / "s"
    async with EventStore(d) as store:
        await _busy(store, 20)
        await store.write_snapshot()
        await _busy(store, 20)
        monkeypatch.setattr(snapshot_mod, fails, eio)
        with pytest.raises(StorageError, match=r"\.snap: written, but .*Input/output error"):
            await store.write_snapshot()
        monkeypatch.undo()
        position, state = store.position, store.projections.state()
    async with EventStore(d) as store:
        assert (store.position, store.projections.state()) == (position, state)


async def test_verify_progress_never_goes_back_when_a_writer_grew_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify runs beside the bot: the segments it sized first are longer by
    the time it walks them, and the snapshot replays come after the walk."""
    import os

    from eventstore.verify import verify

    d = tmp_path / "s"
    async with EventStore(d, snapshot_every=200) as store:
        await _busy(store)
    real = os.path.getsize

    def sized_before_the_last_writes(path: object) -> int:
        size = real(path)  # type: ignore[arg-type]
        return size - 500 if str(path).endswith(".seg") else size

    monkeypatch.setattr(os.path, "getsize", sized_before_the_last_writes)
    seen: list[tuple[int, int]] = []
    report = verify(d, progress=lambda done, total: seen.append((done, total)))
    monkeypatch.undo()
    assert report.problems == [] and report.snapshots_checked
    done = [n for n, _ in seen]
    assert done == sorted(done), done
    assert all(n <= t for n, t in seen) and seen[-1][0] == seen[-1][1]


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s["counts"].update(chat="not the bytes of an array"),
        lambda s: s["actions"].pop("by_user"),
        lambda s: s["messages"].update(index=[b"\x00" * 8, b"", b""]),
        lambda s: s.update(position="1"),
        lambda s: s.update(channel=[]),
        lambda s: s.update(user_stats=[]),
        lambda s: s["user_stats"].update({next(iter(s["user_stats"])): [1, 2]}),
        lambda s: s["messages"].update(index=[b"", b""]),
        lambda s: s["actions"]["by_type"].update({0: [b""]}),
    ],
    ids=[
        "text-for-bytes",
        "key-missing",
        "arrays-of-different-lengths",
        "position-text",
        "channel-a-list",
        "user-stats-a-list",
        "user-record-short",
        "index-of-two-arrays",
        "type-view-of-one-array",
    ],
)
async def test_a_snapshot_of_the_wrong_shape_is_ignored_for_a_full_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Any
) -> None:
    """Checksum-valid (written by a buggy writer, say), but not what this
    code loads: ignored with a warning, never a wrong state or a crash."""
    import msgspec

    from eventstore import snapshot as snapmod

    d = tmp_path / "s"
    async with EventStore(d) as store:
        await _busy(store, 50)
    snap = list_snapshots(str(d))[0]
    info, proj = read_snapshot(snap.path)
    state = msgspec.msgpack.decode(msgspec.msgpack.encode(proj.dump()))
    damage(state)
    Path(snap.path).unlink()
    snapmod.write_snapshot(
        str(d), info.store_id, info.position, msgspec.msgpack.encode(state), info.frame_checksum
    )
    expected = await _full_replay_state(d)
    with caplog.at_level(logging.WARNING, logger="eventstore"):
        async with EventStore(d, read_only=True) as store:
            assert store.projections.state() == expected
    assert any("ignoring snapshot" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("when", ["payload_damage", "read_snapshot"])
async def test_verify_beside_a_writer_that_removes_a_snapshot_reports_no_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """verify runs beside the bot, whose snapshots come and go: one removed
    between the listing and its check is a note, not a problem."""
    import eventstore.snapshot as snapshot_mod
    from eventstore.verify import verify

    d = tmp_path / "s"
    async with EventStore(d) as store:
        await _busy(store, 40)
        await store.write_snapshot()
        await _busy(store, 40)
    oldest = min(list_snapshots(str(d)), key=lambda s: s.position)
    real = getattr(snapshot_mod, when)

    def removed_meanwhile(path: str) -> Any:
        if path == oldest.path:
            Path(path).unlink()
        return real(path)

    monkeypatch.setattr(snapshot_mod, when, removed_meanwhile)
    report = verify(d)
    assert report.problems == []
    assert f"{oldest.path}: removed by the writer while it was being checked" in report.notes
