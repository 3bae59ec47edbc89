"""Compaction: same reads before and after, positions unchanged, space
reclaimed, refusal when unsafe, crash safety, retention and forgetting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
import zlib
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storeutil import frames_only, segment_files

from eventstore import ConnectionError, EventStore, IntegrityError, StorageError
from eventstore import compaction as compaction_mod
from eventstore.events import MessageSaved, UserCountsTrimmed, UserForgotten
from eventstore.lockfile import WriterLock
from eventstore.recovery import find_damage, repair
from eventstore.snapshot import check_snapshots, encode_state
from eventstore.verify import verify
from projections import Projections
from projections.sorted_index import SortedIndex

HERE = Path(__file__).parent


async def reads(store: EventStore) -> dict[str, Any]:
    """Every read method's full answer."""
    return {
        "users": await store.get_all_user_stats(),
        "channel": await store.get_channel_stats(),
        "actions": await store.get_user_actions(limit=10**6),
        "counts": await store.get_user_count_history(),
        "messages": await store.get_recent_messages(limit=10**6),
    }


async def busy_history(store: EventStore, rounds: int = 6, *, forget: bool = False) -> None:
    t = 10_000
    for r in range(rounds):
        for i in range(40):
            user = f"user{(i * 7 + r) % 9}"
            t += 7
            await store.save_user_stats(user, chat_lines=1, last_seen=t)
            await store.save_message(user, f"r{r} line {i} from {user}", timestamp=t)
            if i % 8 == 0:
                await store.save_user_stats(user, session_start=t)
                await store.log_user_action(user, "join", timestamp=t)
                await store.update_channel_stats(max_users=r * 10 + i, timestamp=t)
            if i % 8 == 4:
                await store.end_session(user, timestamp=t)
                await store.log_user_action(user, "leave", timestamp=t)
            if i % 10 == 0:
                await store.log_user_count(i, i + 3, timestamp=t)
        await store.clear_old_messages(25)
    if forget:
        await store.forget_user("user3", timestamp=t)


async def test_compaction_keeps_every_read_and_every_position(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096) as store:
        await busy_history(store)
        before = await reads(store)
        state = store.projections.state()
        size_before = sum(p.stat().st_size for p in segment_files(d))
        report = await store.compact()
        assert await reads(store) == before  # same ids, same rows, live
        assert store.projections.state() == state
        # New writes after compaction go on from the same positions.
        position = store.position
        await store.save_message("late", "after compaction", timestamp=99_999)
        assert (await store.get_recent_messages(limit=1))[0]["id"] == position + 1
    assert report.segments_rewritten > 1
    assert report.events_dropped > 0
    assert report.dropped_by_type["message_saved"] > 0
    assert report.dropped_by_type["user_stats_saved"] > 0
    assert report.users_folded > 0
    size_after = sum(p.stat().st_size for p in segment_files(d))
    assert size_after < size_before
    assert not (d / compaction_mod.COMPACT_DIR).exists()
    assert find_damage(str(d)) is None
    assert await check_snapshots(str(d)) == []
    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        got = await reads(store)
    assert got["messages"][0]["message"] == "after compaction"
    got["messages"] = got["messages"][1:]
    assert got == before


def deleted_files_open(directory: Path) -> list[str]:
    """Files of ``directory`` this process holds open although they were removed."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(directory)) and target.endswith(" (deleted)"):
                found.append(target)
    return found


async def test_a_read_in_progress_reads_on_through_a_compaction(tmp_path: Path) -> None:
    """A read that began before compaction switched the segments goes on with
    the files it began with: the events as they were, not an OSError of a
    closed descriptor (or, once its number is reused, another file's bytes).
    The replaced files are closed when the last such read ends."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096) as store:
        await busy_history(store)
        everything = [item async for item in store.read()]
        reading = store.read()
        began = [await anext(reading) for _ in range(10)]
        other = store.read()
        await anext(other)
        report = await store.compact()
        assert report.segments_rewritten > 1
        rest = [item async for item in reading]
        assert began + rest == everything
        assert deleted_files_open(d)  # ``other`` still reads them
        await other.aclose()
        await asyncio.sleep(0.05)  # they are closed in the log's thread
        assert deleted_files_open(d) == []
        # Reads that begin now see the compacted log.
        after = [item async for item in store.read()]
        assert len(after) < len(everything)
        assert {pos for pos, _ in after} <= {pos for pos, _ in everything}


async def test_closing_the_store_ends_a_read_with_a_clear_error(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096) as store:
        await busy_history(store, 2)
        assert len(segment_files(d)) > 2
        reading = store.read()
        await anext(reading)
    with pytest.raises(ConnectionError, match="closed during a read"):
        async for _ in reading:
            pass
    assert deleted_files_open(d) == []


async def test_short_writes_lose_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.write may write less than asked (a full disk, a signal): every file
    the store writes that way (segment headers, compacted segments,
    snapshots) must still come out whole."""
    real_write = os.write
    calls = 0

    def dribble(fd: int, data: Any) -> int:
        nonlocal calls
        calls += 1
        return real_write(fd, bytes(memoryview(data)[:5]))

    d = tmp_path / "s"
    monkeypatch.setattr(os, "write", dribble)
    async with EventStore(d, segment_size=4096) as store:
        await busy_history(store, 3)
        before = await reads(store)
        await store.compact()
        assert await reads(store) == before
    monkeypatch.undo()
    assert calls > 100
    assert find_damage(str(d)) is None
    assert await check_snapshots(str(d)) == []
    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        assert await reads(store) == before


async def test_full_replay_without_snapshot_after_compaction(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096) as store:
        await busy_history(store, 3)
        await store.compact()
        before = await reads(store)
    for snap in d.glob("snapshot-*"):
        snap.unlink()
    async with EventStore(d, segment_size=4096) as store:
        assert await reads(store) == before


async def test_dry_run_changes_nothing_and_reports(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096) as store:
        await busy_history(store, 3)
        files = {p.name: p.read_bytes() for p in d.iterdir() if p.suffix == ".seg"}
        position = store.position
        report = await store.compact(dry_run=True)
        assert report.dry_run and report.events_dropped > 0
        assert report.bytes_after < report.bytes_before
        assert {p.name: p.read_bytes() for p in d.iterdir() if p.suffix == ".seg"} == files
        assert store.position == position


@pytest.mark.parametrize("dry_run", [True, False])
async def test_the_progress_rises_and_ends_full(tmp_path: Path, dry_run: bool) -> None:
    """Also a second time, over a range the first compaction left with gaps."""
    d = tmp_path / "s"
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))

    async with EventStore(d, segment_size=4096) as store:
        for _ in range(2):
            await busy_history(store, 3)
            seen.clear()
            await store.compact(dry_run=dry_run, progress=progress)
            assert len({t for _, t in seen}) == 1
            done = [n for n, _ in seen]
            assert done == sorted(done) and done[-1] == seen[-1][1] > 0
        # Nothing left to drop: no proof runs, and the bar still ends full.
        seen.clear()
        report = await store.compact(dry_run=dry_run, progress=progress)
        if not dry_run:
            assert report.segments_rewritten == 0
        assert seen[-1][0] == seen[-1][1] > 0


async def test_a_dry_run_ends_full_where_compaction_dropped_the_last_events(
    tmp_path: Path,
) -> None:
    """forget_user's compaction drops its own UserForgotten, the last event:
    a dry run's second pass then ends short of the head it counted to."""
    seen: list[tuple[int, int]] = []
    async with EventStore(tmp_path / "s", segment_size=4096) as store:
        await busy_history(store, 3, forget=True)
        await store.compact(
            dry_run=True, keep_history_days=0, progress=lambda n, t: seen.append((n, t))
        )
    done = [n for n, _ in seen]
    assert done == sorted(done) and done[-1] == seen[-1][1] > 0


async def test_forget_user_passes_its_progress_to_the_compaction(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))

    async with EventStore(tmp_path / "s", segment_size=4096) as store:
        await busy_history(store, 3)
        assert await store.forget_user("user1", progress=progress)
    done = [n for n, _ in seen]
    assert len(done) > 2 and done == sorted(done) and done[-1] == seen[-1][1]


async def test_compaction_refuses_when_the_new_log_would_read_differently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096) as store:
        await busy_history(store, 2)
        await store.log.roll()  # type: ignore[attr-defined]
        files = {p.name: p.read_bytes() for p in segment_files(d)}
        real = compaction_mod._visible
        lost = {"n": 0}

        def lossy(index: Any, ts: int, pos: int) -> bool:
            seen = real(index, ts, pos)
            if seen and not lost["n"]:
                lost["n"] = pos  # a bug that loses one visible row
                return False
            return seen

        monkeypatch.setattr(compaction_mod, "_visible", lossy)
        with pytest.raises(IntegrityError, match="compaction refused"):
            await store.compact()
        assert {p.name: p.read_bytes() for p in segment_files(d)} == files
        assert not (d / compaction_mod.COMPACT_DIR).exists()


@given(
    rows=st.lists(st.integers(0, 4), max_size=60),
    probes=st.lists(st.tuples(st.integers(-1, 5), st.integers(0, 70)), max_size=30),
)
def test_a_row_is_visible_exactly_when_the_index_holds_it(
    rows: list[int], probes: list[tuple[int, int]]
) -> None:
    """Many rows share each timestamp (back-dated ones too): _visible bisects
    their positions, and must answer as a walk over every row would."""
    index = SortedIndex()
    held: set[tuple[int, int]] = set()
    for pos, ts in enumerate(rows, 1):
        if pos % 7 == 0:
            continue  # a position without a row here
        index.add(ts, pos)
        held.add((ts, pos))
    for ts, pos in probes + sorted(held):
        assert compaction_mod._visible(index, ts, pos) == ((ts, pos) in held), (ts, pos)


async def test_compaction_keeps_thousands_of_lines_of_one_second(tmp_path: Path) -> None:
    """A clock that stood still: every chat line at one timestamp, some cleared."""
    d = tmp_path / "s"
    async with EventStore(d, clock=lambda: 1_000) as store:
        for i in range(3000):
            await store.save_message(f"u{i % 5}", f"line {i}")
        await store.clear_old_messages(keep_count=2000)
        before = await store.get_recent_messages(limit=5000)
        report = await store.compact()
        assert report.events_dropped == 1000
        assert await store.get_recent_messages(limit=5000) == before
    async with EventStore(d, clock=lambda: 1_000) as store:
        assert await store.get_recent_messages(limit=5000) == before


async def test_keep_history_records_the_decision_then_compacts(tmp_path: Path) -> None:
    d = tmp_path / "s"
    now = 10 * 86_400
    async with EventStore(d, segment_size=4096, clock=lambda: now) as store:
        for day in range(10):
            await store.log_user_count(day, day, timestamp=day * 86_400 + 5)
        dry = await store.compact(dry_run=True, keep_history_days=3)
        assert dry.dropped_by_type.get("user_count_logged") == 7
        assert len(await store.get_user_count_history()) == 10
        report = await store.compact(keep_history_days=3)
        history = await store.get_user_count_history()
        assert [h["chat_users"] for h in history] == [7, 8, 9]
        assert report.dropped_by_type["user_count_logged"] == 7
        trims = [ev async for _, ev in store.read() if isinstance(ev, UserCountsTrimmed)]
        assert trims == [UserCountsTrimmed(before=7 * 86_400, timestamp=now)]


def _bytes_hold(directory: Path, needle: bytes) -> list[str]:
    return [
        f
        for root, _dirs, files in os.walk(directory)
        for f in files
        if needle in (Path(root) / f).read_bytes()
    ]


@pytest.mark.parametrize("reopen", [False, True], ids=["same store", "after a crash"])
async def test_forget_user_again_finishes_an_erasure_whose_compaction_never_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reopen: bool
) -> None:
    """The UserForgotten is durable, the compaction after it did not happen
    (the process died, or close() came first): the user is gone from every
    read but not from the files, and asking again must finish the job."""
    d = tmp_path / "s"

    class Crash(BaseException):
        pass

    async def crash(self: EventStore, **kwargs: Any) -> Any:
        raise Crash

    store = EventStore(d, segment_size=4096)
    await store.connect()
    await busy_history(store, 2)
    await store.save_message("alice", "alice-private-chat-line", timestamp=20_000)
    monkeypatch.setattr(EventStore, "compact", crash)
    with pytest.raises(Crash):
        await store.forget_user("alice")
    monkeypatch.undo()
    if reopen:
        store._log._lock.release()  # type: ignore[attr-defined]  # the process "dies"
        store._connected = False
        store = EventStore(d, segment_size=4096)
        await store.connect()
    try:
        assert not store.knows_user("alice")
        assert _bytes_hold(d, b"alice-private-chat-line")
        before = await reads(store)
        assert await store.forget_user("alice")  # finishes the erasure
        assert await reads(store) == before
        assert not await store.forget_user("alice")  # now nothing is left
        assert not await store.forget_user("nobody")
    finally:
        await store.close()
    assert _bytes_hold(d, b"alice-private-chat-line") == []
    assert find_damage(str(d)) is None


@pytest.mark.parametrize(
    "compacted", [False, True], ids=["never compacted", "kept by a compaction"]
)
async def test_forget_user_erases_cleared_chat_lines_no_read_returns(
    tmp_path: Path, compacted: bool
) -> None:
    """clear_old_messages takes a user's lines out of every read, but they
    stay in the files until a compaction: a forget of that user (whom no
    read knows any more) must erase them, not report nothing to forget."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096) as store:
        await busy_history(store, 2)
        await store.save_message("eve", "eve-private-555-0100", timestamp=20_000)
        await store.save_message("bob", "bob was here", timestamp=20_001)
        if compacted:
            await store.compact()  # keeps eve's line: a read still returns it
            assert _bytes_hold(d, b"eve-private-555-0100")
        await store.clear_old_messages(1)
        assert not store.knows_user("eve")
        assert await store.erasure_unfinished("eve")
        assert not await store.erasure_unfinished("bob")  # a read knows bob
        assert not await store.erasure_unfinished("nobody")
        position = store.position
        before = await reads(store)
        assert await store.forget_user("eve")
        assert store.position == position  # no read had eve: nothing appended
        assert await reads(store) == before
        assert not await store.erasure_unfinished("eve")
        assert not await store.forget_user("eve")
    assert _bytes_hold(d, b"eve-private-555-0100") == []
    assert _bytes_hold(d, b"eve") == []
    assert find_damage(str(d)) is None


async def test_a_forget_whose_compaction_runs_out_of_space_says_so_and_can_be_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The UserForgotten is written, the compaction after it runs out of
    space: the error must not read as a forget that did not happen (the
    compaction's own 'nothing was changed'), and calling again finishes."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096) as store:
        await busy_history(store, 2)
        await store.save_message("alice", "alice-private-chat-line", timestamp=20_000)

        real_write = os.write

        def full(fd: int, data: Any) -> int:  # the new segments' only (os is shared)
            if f"/{compaction_mod.COMPACT_DIR}/" in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(28, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(compaction_mod.os, "write", full)
        with pytest.raises(StorageError) as failed:
            await store.forget_user("alice")
        monkeypatch.undo()
        assert "'alice' is forgotten in every read, but erasing them from the files" in str(
            failed.value
        )
        assert "compaction failed, nothing was changed: No space left" in str(failed.value)
        assert not store.knows_user("alice")
        assert await store.erasure_unfinished("alice")
        assert _bytes_hold(d, b"alice-private-chat-line")
        assert await store.forget_user("alice")  # finishes the erasure
    assert _bytes_hold(d, b"alice-private-chat-line") == []
    assert find_damage(str(d)) is None


@pytest.mark.parametrize("call", ["compact", "forget_user"])
async def test_no_room_for_the_snapshot_after_a_compaction_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, call: str
) -> None:
    """The compaction committed and switched; then the snapshot it writes
    finds no room.  compact() used to raise, which reported a rewrite that
    happened as a failure (and lost its report), and forget_user() with it.
    A snapshot only saves replay time: a warning, and the store goes on."""
    import eventstore.store as store_mod

    def full(*args: Any) -> str:
        raise StorageError("snapshot-1.snap: cannot write the snapshot: No space left on device")

    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096) as store:
        await busy_history(store, 3)
        await store.save_message("alice", "alice-private-chat-line", timestamp=20_000)
        old = sorted(p.name for p in segment_files(d))
        monkeypatch.setattr(store_mod, "write_snapshot", full)
        if call == "compact":
            assert (await store.compact()).segments_rewritten
        else:
            assert await store.forget_user("alice")
        monkeypatch.undo()
        assert sorted(p.name for p in segment_files(d)) != old
        assert "no snapshot written: snapshot-1.snap: cannot write the snapshot" in caplog.text
        await store.save_message("late", "after", timestamp=99_999)
        after = await reads(store)
    async with EventStore(d, segment_size=4096) as again:
        assert await reads(again) == after
    if call == "forget_user":
        assert _bytes_hold(d, b"alice-private-chat-line") == []
        assert _bytes_hold(d, b"alice") == []
    assert verify(d).ok


async def test_a_user_whose_messages_were_all_cleared_leaves_no_name_on_disk(
    tmp_path: Path,
) -> None:
    """clear_old_messages can take a user's last row away: nothing of theirs is
    read any more, but the files keep the cleared line until a compaction
    (which forget_user runs for it).  The messages view must not keep the
    name either, or every snapshot would carry it for ever."""
    d = tmp_path / "s"
    name = "zebra_unicorn_43"
    async with EventStore(d, segment_size=4096) as store:
        await store.save_message(name, "said once", timestamp=1)
        await store.save_message("other", "said later", timestamp=2)
        assert await store.clear_old_messages(keep_count=1) == 1
        assert not store.knows_user(name)
        assert await store.forget_user(name)  # the cleared line, still on disk
        assert not await store.forget_user(name)
        assert _bytes_hold(d, name.encode()) == []
        # Back again (under a new code), and cleared again.
        await store.save_message(name, "back again", timestamp=0)
        assert [m["message"] for m in await store.get_recent_messages()] == [
            "said later",
            "back again",
        ]
        assert await store.clear_old_messages(keep_count=1) == 1
        await store.compact()
        await store.save_message("other", "after", timestamp=4)
    assert _bytes_hold(d, name.encode()) == []  # nor in the snapshot of close()
    async with EventStore(d, segment_size=4096) as store:
        assert [m["message"] for m in await store.get_recent_messages()] == ["after", "said later"]


async def test_nightly_clears_do_not_grow_the_messages_name_list() -> None:
    """Each clear blanks the names of users it leaves without a message, and
    they take new codes when they come back: a year of nightly clears must
    not leave a list of thousands of blank names (in memory and in every
    snapshot).  Reads, forgets and snapshots still agree after renumbering."""
    users = [f"user{i}" for i in range(50)]
    async with EventStore(":memory:") as store:
        ts = 0
        for _ in range(365):
            for name in users:
                ts += 1
                await store.save_message(name, f"{name} at {ts}", timestamp=ts)
            await store.clear_old_messages(keep_count=10)
        names = store.projections.messages.users.names
        assert len(names) <= 2 * 10 + 64 + len(users), len(names)
        assert sorted(n for n in names if n) == sorted(users[-10:])
        recent = await store.get_recent_messages()
        assert [m["username"] for m in recent] == users[:-11:-1]
        loaded = Projections.load(msgspec.msgpack.decode(encode_state(store.projections)))
        assert loaded.state() == store.projections.state()
        assert await store.forget_user(users[-1])
        assert [m["username"] for m in await store.get_recent_messages()] == users[-2:-11:-1]


async def test_a_reopen_without_snapshot_keeps_the_position_a_forget_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """forget_user compacts its own UserForgotten away with the user's last
    events: the log's head stays past the last event left.  A replay from
    the start used to stop at that event, so the store reported a lower
    position than before the close, and took its snapshot there."""
    d = tmp_path / "s"
    async with EventStore(d) as store:
        await store.save_message("a", "stays", timestamp=1)
        await store.save_message("bob", "goes", timestamp=2)
        assert await store.forget_user("bob", timestamp=3)
        before = store.position
        reads = await store.get_recent_messages()
    assert before == 3
    for snap in d.glob("*.snap"):
        snap.unlink()
    for read_only in (True, False):
        async with EventStore(d, read_only=read_only) as store:
            assert store.position == before
            assert await store.get_recent_messages() == reads
    assert [p.name for p in d.glob("*.snap")] == [f"snapshot-{before:020d}.snap"]
    caplog.set_level(logging.WARNING)
    async with EventStore(d) as store:  # from that snapshot, which holds
        assert store.position == before
        await store.save_message("a", "next", timestamp=4)
        assert (await store.get_recent_messages(limit=1))[0]["id"] == before + 1
    assert caplog.records == []
    assert await check_snapshots(str(d)) == []


async def test_forget_user_leaves_no_byte_of_the_name(tmp_path: Path) -> None:
    d = tmp_path / "s"
    name = "zebra_unicorn_42"
    async with EventStore(d, segment_size=4096) as store:
        await busy_history(store, 2)
        await store.save_user_stats(name, chat_lines=3, session_start=5)
        await store.save_message(name, "my secret words", timestamp=20_000)
        await store.log_user_action(name, "pm", details="!stats", timestamp=20_001)
        # Short details and an action type are interned; only this user's are theirs.
        await store.log_user_action(name, "pm", details="my-address-7", timestamp=20_003)
        await store.log_user_action(name, "secret-kind", timestamp=20_004)
        await store.log_user_action("other", "pm", details="!stats", timestamp=20_005)
        await store.save_message("other", "nothing about anyone", timestamp=20_002)
        await store.write_snapshot()
        assert await store.forget_user(name)
        assert await store.get_user_stats(name) is None
        assert await store.get_user_actions(username=name) == []
        assert all(m["username"] != name for m in await store.get_recent_messages(limit=1000))
        assert not await store.forget_user(name)  # nothing left to forget
    needle = name.encode()
    for root, _dirs, files in os.walk(d):
        for f in files:
            data = (Path(root) / f).read_bytes()
            assert needle not in data, f"{f} still holds the name"
            assert b"my secret words" not in data
            assert b"my-address-7" not in data, f"{f} still holds the user's details"
            assert b"secret-kind" not in data, f"{f} still holds the user's action type"
    assert find_damage(str(d)) is None
    assert await check_snapshots(str(d)) == []
    async with EventStore(d, segment_size=4096) as store:
        assert await store.get_user_stats(name) is None
        assert [a["details"] for a in await store.get_user_actions(username="other")] == ["!stats"]
        assert await store.get_user_actions(action_type="secret-kind") == []
        # A type forgotten with its only user can be used again.
        await store.log_user_action("other", "secret-kind", timestamp=20_010)
        assert len(await store.get_user_actions(action_type="secret-kind")) == 1


async def test_a_crash_after_the_switch_never_brings_a_forgotten_user_back(
    tmp_path: Path,
) -> None:
    """A process killed between compaction's switch and its new snapshot:
    an older snapshot (of a moment inside the rewritten range) must not be
    loaded with the compacted log's tail.  Its frame checksum can still
    match (one event per frame, re-encoded with the same bytes), and the
    compacted log has dropped the UserForgotten event with the user's."""
    d = tmp_path / "s"
    name = "zebra_unicorn_42"
    async with EventStore(d) as store:  # "fsync": one frame per event
        await store.save_message("alice", "hello", timestamp=100)
        await store.save_message(name, "my secret words", timestamp=101)
        await store.save_user_stats(name, chat_lines=1, last_seen=102)
        await store.save_message("alice", "bye", timestamp=103)
    script = f"""
import asyncio, os, sys
sys.path.insert(0, {str(HERE.parent)!r})
from eventstore import EventStore
from eventstore import compaction
real = compaction._switch
def switch_then_die(*args):
    real(*args)
    os._exit(9)
compaction._switch = switch_then_die
async def main():
    store = EventStore({str(d)!r})
    await store.connect()
    await store.forget_user({name!r}, timestamp=200)
asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    async with EventStore(d) as store:
        assert await store.get_user_stats(name) is None
        messages = await store.get_recent_messages(limit=10)
        assert [(m["username"], m["message"]) for m in messages] == [
            ("alice", "bye"),
            ("alice", "hello"),
        ]
    for path in d.iterdir():
        if path.is_file():
            assert name.encode() not in path.read_bytes(), path.name


async def test_close_waits_for_a_compaction_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """close() during the switch: the compaction finishes (its snapshot too)
    before the log closes, instead of failing half-way."""
    import threading
    import time

    d = tmp_path / "s"
    switching = threading.Event()
    real_switch = compaction_mod._switch

    def slow_switch(*args: Any) -> None:
        switching.set()
        time.sleep(0.3)
        real_switch(*args)

    monkeypatch.setattr(compaction_mod, "_switch", slow_switch)
    store = EventStore(d, segment_size=4096)
    await store.connect()
    await busy_history(store, 3)
    before = await reads(store)
    await store.write_snapshot()  # nothing left for close() to snapshot
    compacting = asyncio.ensure_future(store.compact())
    while not switching.is_set():
        await asyncio.sleep(0.01)
    await store.close()
    report = await compacting
    assert report.segments_rewritten > 1
    with caplog.at_level(logging.WARNING, logger="eventstore"):
        async with EventStore(d, segment_size=4096) as again:
            assert await reads(again) == before
    assert "ignoring snapshot" not in caplog.text
    assert "compaction" not in caplog.text  # nothing left to finish or undo


async def test_readers_that_open_during_a_commit_are_asked_to_retry(tmp_path: Path) -> None:
    from eventstore import ConnectionError

    d = tmp_path / "s"
    async with EventStore(d) as store:
        await store.save_message("a", "b")
    (d / compaction_mod.COMPACT_DIR).mkdir()
    (d / compaction_mod.COMPACT_DIR / "COMMIT").write_text("")
    lock = WriterLock(str(d))
    lock.acquire()  # a writer is switching segments right now
    try:
        with pytest.raises(ConnectionError, match="compaction is being committed; try again"):
            await EventStore(d, read_only=True).connect()
    finally:
        lock.release()
    # Nobody is: it was interrupted, and waiting will not help.
    with pytest.raises(ConnectionError, match="interrupted after it committed; opening the"):
        await EventStore(d, read_only=True).connect()


@pytest.mark.parametrize("rounds", [1, 2, 3])
async def test_followers_keep_reading_across_compactions(tmp_path: Path, rounds: int) -> None:
    """A read-only store and ``tail -f`` take up the segments compaction
    wrote: they used to go on with the replaced files, and read events again
    after the positions that followed them."""
    from eventstore.inspect import tail_events

    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096) as store:
        await busy_history(store, 2)
        seen: list[int] = []

        async def tail() -> None:
            async for position, _ in tail_events(str(d), 5, follow=True, interval=0.05):
                seen.append(position)

        tailing = asyncio.ensure_future(tail())
        async with EventStore(d, read_only=True) as follower:
            assert await reads(follower) == await reads(store)
            for _ in range(rounds):
                await asyncio.sleep(0.1)
                await store.compact()
                await busy_history(store, 1)  # more history, and another clear
            await store.log.flush()
            await follower.refresh()
            assert await reads(follower) == await reads(store)
            assert follower.projections.state() == store.projections.state()
            await asyncio.sleep(0.3)
        tailing.cancel()
        await asyncio.gather(tailing, return_exceptions=True)
        assert tailing.cancelled()  # not ended by an error
        now = [position async for position, _ in store.read()]
    assert seen == sorted(set(seen))  # never a position twice, never one going back
    assert seen[-1] == now[-1]
    assert {position for position in now if position >= seen[0]} <= set(seen)


async def test_a_follower_reads_what_the_replaced_files_held_last(tmp_path: Path) -> None:
    """A forget and a clear right before a compaction are dropped from the
    new files with what they erased; a follower reads them from the files it
    holds before it takes up the new ones, so it forgets and clears too (its
    reads used to fail on positions the new files no longer have)."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024) as store:
        for i in range(30):
            await store.save_user_stats(f"u{i % 3}", chat_lines=1, last_seen=1000 + i)
            await store.save_message(f"u{i % 3}", f"line {i}", timestamp=1000 + i)
        async with EventStore(d, read_only=True) as follower:
            assert await reads(follower) == await reads(store)
            assert await store.forget_user("u1")  # compacts at once
            await store.clear_old_messages(3)
            await store.compact()
            await store.save_user_stats("u1", chat_lines=1, last_seen=2000)  # a new u1
            await follower.refresh()
            assert await reads(follower) == await reads(store)
            assert follower.projections.state() == store.projections.state()


async def test_a_users_actions_read_keeps_its_details_across_a_rebuild_during_its_fetch(
    tmp_path: Path,
) -> None:
    """get_user_actions(username=...) takes the details codes of its rows
    from one set of read models and fetches long details from the log
    meanwhile.  A rebuild during that fetch (the follow task's refresh after
    a compaction it had not read; on PostgreSQL another read's) interns the
    details again, under other codes: the names must come from the same read
    models as the rows (it raised IndexError, or named another action's
    details)."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024, snapshot_every=None) as store:
        await store.log_user_action("x", "pm", details="only x", timestamp=100)
        await store.log_user_action("y", "pm", details="short y", timestamp=101)
        await store.log_user_action("y", "pm", details="long " * 20, timestamp=102)
        await store.log_user_action("y", "pm", details="other y", timestamp=103)
        async with EventStore(d, read_only=True) as follower:
            expected = await follower.get_user_actions(username="y")
            for i in range(40):  # new segments, the follower has not looked at them
                await store.save_message("z", f"filler {i}", timestamp=200 + i)
            await store.forget_user("x")  # compacts past what the follower read
            for snapshot in d.glob("snapshot-*"):  # none: the rebuild replays
                snapshot.unlink()
            before = follower.projections
            real_fetch = follower.log.fetch

            async def fetch(positions: list[int]) -> list[Any]:
                await follower.refresh()  # as the follow task would, meanwhile
                return await real_fetch(positions)

            follower.log.fetch = fetch  # type: ignore[method-assign]
            got = await follower.get_user_actions(username="y")
            assert follower.projections is not before  # rebuilt during the read
            assert got == expected
            assert await follower.get_user_actions(username="y") == expected


async def test_a_read_that_walks_an_old_segment_beside_a_refresh_keeps_its_file(
    tmp_path: Path,
) -> None:
    d = tmp_path / "s"

    async def write_and_compact() -> None:
        async with EventStore(d, segment_size=1024, durability="flush") as store:
            for i in range(100):
                await store.save_message(f"u{i % 3}", f"msg {i} " + "x" * 60, timestamp=1000 + i)
            await store.compact()

    await write_and_compact()
    async with EventStore(d, read_only=True) as follower:
        await write_and_compact()
        await follower.refresh()  # new files, the sealed ones not walked yet
        await write_and_compact()
        refreshing = asyncio.ensure_future(follower.log.refresh())
        await asyncio.sleep(0)
        time.sleep(0.3)  # the look in the log's thread is done; its result waits
        reading = asyncio.ensure_future(follower.get_recent_messages(limit=1000))
        await asyncio.gather(refreshing, reading)
        await follower.refresh()
        assert len(await follower.get_recent_messages(limit=1000)) == 300


async def test_a_follower_that_missed_what_a_compaction_dropped_builds_its_state_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It looked too seldom: two compactions (a clear and a forget between
    them) went by.  Its state from what it read has a hole, so it is built
    again, from the writer's snapshot and the log."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024) as store:
        for i in range(30):
            await store.save_message(f"u{i % 3}", f"line {i}", timestamp=1000 + i)
        async with EventStore(d, read_only=True) as follower:
            await store.compact()
            await store.clear_old_messages(4)
            await store.forget_user("u2")
            for i in range(10):
                await store.save_message("u0", f"late {i}", timestamp=2000 + i)
            await store.compact()
            with caplog.at_level(logging.WARNING, logger="eventstore"):
                await follower.refresh()
            assert "its read models were built again" in caplog.text
            assert await reads(follower) == await reads(store)
            assert follower.projections.state() == store.projections.state()


async def test_a_loss_found_before_a_reconnect_rebuilds_nothing_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The follower's rebuild failed, then it closed and connected again:
    connect() built its state anew, so the loss found by the old open is
    not this state's, and its first refresh must not build it again (with a
    warning about a compaction it never missed)."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024) as store:
        for i in range(30):
            await store.save_message(f"u{i % 3}", f"line {i}", timestamp=1000 + i)
        follower = EventStore(d, read_only=True)
        await follower.connect()
        try:
            await store.compact()
            await store.clear_old_messages(4)
            await store.forget_user("u2")
            await store.compact()

            async def fails(*args: Any, **kwargs: Any) -> None:
                raise StorageError("the rebuild failed")

            monkeypatch.setattr(follower, "_rebuild", fails)
            with pytest.raises(StorageError, match="the rebuild failed"):
                await follower.refresh()
            monkeypatch.undo()
            await follower.close()
            await follower.connect()
            with caplog.at_level(logging.WARNING, logger="eventstore"):
                await follower.refresh()
            assert "built again" not in caplog.text
            assert await reads(follower) == await reads(store)
        finally:
            await follower.close()


async def test_refreshes_at_once_share_one_look(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024) as store:
        await busy_history(store, 1)
        async with EventStore(d, read_only=True) as follower:
            for _ in range(5):
                await busy_history(store, 1)
                await store.compact()
                await asyncio.gather(*(follower.refresh() for _ in range(4)))
                assert await reads(follower) == await reads(store)


async def _forget_behind_a_follower(store: EventStore) -> None:
    """History a follower reads first; then a forget_user, which compacts at
    once and drops its UserForgotten from the new files."""
    for i in range(30):
        await store.save_user_stats(f"u{i % 3}", chat_lines=1, last_seen=1000 + i)
        await store.save_message(f"u{i % 3}", f"line {i}", timestamp=1000 + i)


@pytest.mark.parametrize("look_done", [True, False])
async def test_a_refresh_cancelled_in_its_look_leaves_the_next_no_hole(
    tmp_path: Path, look_done: bool
) -> None:
    """The first look after a compaction stops at the end of the files it
    replaced, so that the caller reads what only those hold (here the
    UserForgotten the compaction dropped) before a look takes up the new
    ones.  A refresh cancelled during that look (a timeout around it) left
    the look to finish with nothing read, and the next refresh took up the
    new files at once: the follower kept the forgotten user, and rows the
    new files no longer hold (its reads raised QueryError)."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024) as store:
        await _forget_behind_a_follower(store)
        async with EventStore(d, read_only=True) as follower:
            assert await reads(follower) == await reads(store)
            assert await store.forget_user("u1")
            log = follower.log
            real = log._look_for_rewrite  # type: ignore[attr-defined]
            started, release = threading.Event(), threading.Event()

            def first_look() -> None:  # waits, then looks
                log._look_for_rewrite = real  # type: ignore[attr-defined]
                started.set()
                release.wait(5)
                real()

            log._look_for_rewrite = first_look  # type: ignore[attr-defined]
            refreshing = asyncio.ensure_future(follower.refresh())
            assert await asyncio.to_thread(started.wait, 5)
            refreshing.cancel()  # its look goes on
            await asyncio.gather(refreshing, return_exceptions=True)
            if look_done:
                release.set()
                await asyncio.wait({log._looking})  # type: ignore[attr-defined]
                assert log.refresh_pending  # it stopped at the end of the old files
                await follower.refresh()
            else:  # the next refresh comes while it is under way
                again = asyncio.ensure_future(follower.refresh())
                await asyncio.sleep(0.01)
                release.set()
                await again
            assert not follower.knows_user("u1")
            assert await reads(follower) == await reads(store)
            assert follower.projections.state() == store.projections.state()


async def test_refresh_on_a_writer_hands_no_position_out_twice(tmp_path: Path) -> None:
    """A writer's refresh() used to read its head from the disk, which does
    not hold yet what "none" mode accepted: the next write reused positions."""
    from eventstore.events import MessageSaved

    async with EventStore(tmp_path / "s", segment_size=1024, durability="none") as store:
        await store.append([MessageSaved(1, "a", "first")])
        await store.log.flush()
        second = await store.append([MessageSaved(2, "a", f"second {i}") for i in range(3)])
        await store.refresh()  # "none": the three are not on disk yet
        third = await store.append([MessageSaved(3, "a", f"third {i}") for i in range(3)])
        assert (second, third) == (2, 5)
        got = [ev.message for ev in await store.log.fetch(list(range(1, 8)))]  # type: ignore[attr-defined]
    assert got == ["first", *(f"second {i}" for i in range(3)), *(f"third {i}" for i in range(3))]


async def _compact_failing_in_its_switch(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compact with every removal of an old segment failing (EIO): COMMIT is
    written, some files have moved, and the switch stops half-way."""
    real_unlink = os.unlink

    def unlink(path: Any) -> None:
        if str(path).endswith(".seg"):
            raise OSError(5, "Input/output error", str(path))
        real_unlink(path)

    monkeypatch.setattr(compaction_mod.os, "unlink", unlink)
    with pytest.raises(StorageError, match="Input/output error"):
        await store.compact()
    monkeypatch.undo()


async def test_a_follower_does_not_spin_while_a_switch_stays_unfinished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compaction that committed and failed leaves its COMMIT until a
    writer opens the store again; a follower's refresh() must return."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024, snapshot_every=None) as store:
        await busy_history(store, 2)
        async with EventStore(d, read_only=True) as follower:
            await _compact_failing_in_its_switch(store, monkeypatch)
            assert compaction_mod.pending_commit(str(d)) is not None
            before = await reads(follower)
            await asyncio.wait_for(follower.refresh(), 5)  # used to loop for ever
            await asyncio.wait_for(follower.refresh(), 5)
            assert await reads(follower) == before


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_cancelled_refresh_leaks_no_file(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024) as store:
        await busy_history(store, 1)
        follower = EventStore(d, read_only=True)
        await follower.connect()
        held = _open_fds()
        for _ in range(5):
            await busy_history(store, 1)
            await store.compact()
            for _ in range(3):  # each look cancelled as it runs in the log's thread
                task = asyncio.ensure_future(follower.refresh())
                await asyncio.sleep(0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await follower.refresh()
        assert await reads(follower) == await reads(store)
        assert _open_fds() <= held + len(follower.log.segments) + 2  # type: ignore[attr-defined]
        await follower.close()
        after_close = _open_fds()
    assert after_close <= held - 1  # its segments, its lock-free directory: all closed


@pytest.mark.parametrize("fail_in", ["write", "fsync"])
async def test_a_compaction_that_runs_out_of_space_releases_what_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_in: str
) -> None:
    """A compaction whose new segment cannot be written (ENOSPC) or synced
    (EIO) removes compacting/ and closes the segment it was writing: an
    unlinked file held open keeps its space, up to a whole segment, for as
    long as the process lives, on a disk that has just run full."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1 << 20, snapshot_every=None) as store:
        await busy_history(store, 3)
        before = await reads(store)
        if fail_in == "write":
            real_write = os.write
            budget = [2000]

            def write(fd: int, data: Any) -> int:
                if budget[0] <= 0:
                    raise OSError(28, "No space left on device")
                n = real_write(fd, bytes(data[: budget[0]]))
                budget[0] -= n
                return n

            monkeypatch.setattr(compaction_mod.os, "write", write)
        else:
            real_fsync = os.fsync

            def fsync(fd: int) -> None:  # the new segments' only (os is shared)
                if f"/{compaction_mod.COMPACT_DIR}/" in os.readlink(f"/proc/self/fd/{fd}"):
                    raise OSError(5, "Input/output error")
                real_fsync(fd)

            monkeypatch.setattr(compaction_mod.os, "fsync", fsync)
        with pytest.raises(StorageError, match="compaction failed, nothing was changed"):
            await store.compact()
        monkeypatch.undo()
        assert not (d / compaction_mod.COMPACT_DIR).exists()
        assert deleted_files_open(d) == []
        # Nothing changed: the store reads, writes and compacts on.
        assert await reads(store) == before
        await store.save_message("late", "after", timestamp=99_999)
        assert (await store.compact()).segments_rewritten
        after = await reads(store)
    async with EventStore(d, segment_size=1 << 20, snapshot_every=None) as again:
        assert await reads(again) == after
    assert verify(d).ok


def _no_room_to_rename_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the rename that puts COMMIT in place fail with ENOSPC."""
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        if str(dst).endswith(compaction_mod.COMMIT):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(compaction_mod.os, "rename", rename)


@pytest.mark.parametrize("fail_at", ["write", "rename"])
async def test_a_commit_that_cannot_be_written_changes_nothing_and_the_store_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    """No room for COMMIT (its write or its rename fails): the compaction did
    not commit and is rolled back.  The store must not then stop saying it
    committed: its segments did not move, so it reads and writes on, and
    the compaction can be run again."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        await busy_history(store, 3)
        before = await reads(store)
        if fail_at == "write":
            real_fsync = os.fsync

            def fsync(fd: int) -> None:  # COMMIT.tmp's data cannot be written out
                if os.readlink(f"/proc/self/fd/{fd}").endswith("COMMIT.tmp"):
                    raise OSError(28, "No space left on device")
                real_fsync(fd)

            monkeypatch.setattr(compaction_mod.os, "fsync", fsync)
        else:
            _no_room_to_rename_commit(monkeypatch)
        with pytest.raises(StorageError, match="nothing was changed: No space left"):
            await store.compact()
        monkeypatch.undo()
        assert not (d / compaction_mod.COMPACT_DIR).exists()
        assert store.is_connected
        assert await reads(store) == before
        await store.save_message("late", "after", timestamp=99_999)
        assert (await store.compact()).segments_rewritten
        after = await reads(store)
    async with EventStore(d, segment_size=4096, snapshot_every=None) as again:
        assert await reads(again) == after
    assert verify(d).ok


async def test_a_failed_commit_says_which_snapshots_it_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Snapshots inside the rewritten range go before COMMIT: a compaction
    that then fails changed no segment, but those snapshots are gone, and
    the error says so rather than "nothing was changed"."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        await busy_history(store, 3)
        await store.write_snapshot()
        await store.save_message("late", "after", timestamp=99_999)
        await busy_history(store, 1)
        _no_room_to_rename_commit(monkeypatch)
        with pytest.raises(StorageError) as failed:
            await store.compact()
        monkeypatch.undo()
        assert "compaction failed, the segments were not changed (but 1 snapshot(s)" in str(
            failed.value
        )
        assert not list(d.glob("snapshot-*.snap"))
        assert store.is_connected


async def test_a_switch_whose_last_directory_fsync_fails_still_stops_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The switch's last step, the directory fsync after COMMIT and
    compacting/ are removed, fails (EIO): the segments have moved, so the
    compaction committed although no COMMIT is left.  It must not be taken
    for one that changed nothing: the store went on with its list of the
    removed segments, and the next compaction (a forget_user) left the
    first one's new segments beside its own, overlapping."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        await busy_history(store, 20)
        before = await reads(store)
        real_fsync_dir = compaction_mod.fsync_dir

        def fsync_dir(path: str) -> None:
            if path == str(d) and not (d / compaction_mod.COMPACT_DIR).exists():
                raise OSError(5, "Input/output error")
            real_fsync_dir(path)

        monkeypatch.setattr(compaction_mod, "fsync_dir", fsync_dir)
        with pytest.raises(StorageError, match="Input/output error") as info:
            await store.compact()
        monkeypatch.undo()
        assert "nothing was changed" not in str(info.value)
        assert not store.is_connected
        with pytest.raises(ConnectionError, match="did not finish moving its segments"):
            await store.forget_user("user1")
    assert verify(d).ok
    async with EventStore(d, segment_size=4096, snapshot_every=None) as again:
        assert await reads(again) == before
        for user in range(9):
            await again.forget_user(f"user{user}")
    assert verify(d).ok


# -- crash safety --------------------------------------------------------------------


async def test_a_switch_that_fails_in_the_process_stops_the_store_until_reconnect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError half-way through the switch (COMMIT written, some files
    moved) must not let the open store go on with its old list of segments:
    a second compaction used to delete the first one's COMMIT and files."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        await busy_history(store, 3)
        before = await reads(store)
        await _compact_failing_in_its_switch(store, monkeypatch)
        assert compaction_mod.pending_commit(str(d)) is not None
        with pytest.raises(ConnectionError, match="did not finish moving its segments"):
            await store.compact()
        with pytest.raises(ConnectionError, match="close\\(\\) and connect\\(\\) again"):
            await store.save_message("late", "refused")
        assert compaction_mod.pending_commit(str(d)) is not None  # left for connect()
        # Nor does the log's own compaction, for callers other than the store.
        with pytest.raises(IntegrityError, match="an earlier compaction committed"):
            await compaction_mod.compact_log(store.log)  # type: ignore[arg-type]
        assert compaction_mod.pending_commit(str(d)) is not None
    async with EventStore(d, segment_size=4096, snapshot_every=None) as again:
        assert await reads(again) == before
        await again.compact()
        assert await reads(again) == before
    assert verify(d).ok
    assert not (d / compaction_mod.COMPACT_DIR).exists()


async def test_a_compaction_cancelled_in_its_switch_leaves_the_store_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        await busy_history(store, 3)
        before = await reads(store)
        real_switch = compaction_mod._switch
        started = asyncio.Event()
        loop = asyncio.get_running_loop()

        def slow_switch(*args: Any) -> None:
            loop.call_soon_threadsafe(started.set)
            time.sleep(0.3)  # cancelled meanwhile: the files move all the same
            real_switch(*args)

        monkeypatch.setattr(compaction_mod, "_switch", slow_switch)
        task = asyncio.ensure_future(store.compact())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        monkeypatch.undo()
        assert compaction_mod.pending_commit(str(d)) is None
        # The store took up the new segments: it reads, writes and compacts on.
        assert await reads(store) == before
        await store.save_message("late", "after", timestamp=99_999)
        await store.compact()
        after = await reads(store)
    async with EventStore(d, segment_size=4096, snapshot_every=None) as again:
        assert await reads(again) == after
    assert verify(d).ok


async def test_compaction_hashes_its_read_models_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proof's digests (of the old and the new log's read models) are
    computed in a worker thread: over 0.1 s each at 10M events."""
    d = tmp_path / "s"
    hashers: list[int] = []
    real_digest = Projections.digest

    def digest(self: Projections) -> bytes:
        hashers.append(threading.get_ident())
        return real_digest(self)

    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        await busy_history(store, 3)
        before = await reads(store)
        monkeypatch.setattr(Projections, "digest", digest)
        assert (await store.compact()).segments_written
        assert len(hashers) == 2 and threading.get_ident() not in hashers
        assert await reads(store) == before


async def test_the_proof_replays_with_the_old_read_models_freed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While it replays the new log, compaction holds only a digest of the
    state before: both sets of read models at once cost hundreds of
    megabytes at years of history.  (The planner's bound methods kept the
    old set alive.)"""
    d = tmp_path / "s"
    made: list[weakref.ref[Projections]] = []

    class Tracked(Projections):
        def __init__(self) -> None:
            super().__init__()
            made.append(weakref.ref(self))

    alive: list[list[bool]] = []
    real_replay = compaction_mod._replay

    async def replay(*args: Any, **kwargs: Any) -> Any:
        alive.append([ref() is not None for ref in made])
        return await real_replay(*args, **kwargs)

    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        await busy_history(store, 3)
        before = await reads(store)
        monkeypatch.setattr(compaction_mod, "Projections", Tracked)
        monkeypatch.setattr(compaction_mod, "_replay", replay)
        assert (await store.compact()).segments_written
        assert await reads(store) == before
    # One replay of the new log, one of the tail.  Made: the planner's empty
    # placeholder, the state before, the proof's; only the last is alive.
    assert alive == [[False, False, True]] * 2


async def test_compaction_writes_its_segments_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new segments are written, synced and closed in a worker thread:
    on the event loop they stalled the bot behind the disk's writeback."""
    d = tmp_path / "s"
    writers: set[int] = set()
    real_write_all = compaction_mod.write_all

    def write_all(fd: int, data: Any) -> None:
        writers.add(threading.get_ident())
        real_write_all(fd, data)

    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        await busy_history(store, 3)
        before = await reads(store)
        monkeypatch.setattr(compaction_mod, "write_all", write_all)
        assert (await store.compact()).segments_written
        assert writers and threading.get_ident() not in writers
        assert await reads(store) == before
    assert verify(d).ok


async def test_the_snapshot_after_a_compaction_indexes_the_new_segment_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot a compaction writes names a frame of a segment nobody has
    walked yet: the walk runs in the log's thread, not on the event loop."""
    from eventstore.segmentlog import SegmentLog

    d = tmp_path / "s"
    on_loop: list[str] = []
    real_index_segment = SegmentLog._index_segment

    def index_segment(self: SegmentLog, seg: Any) -> None:
        on_loop.append(seg.path)
        real_index_segment(self, seg)

    async with EventStore(d, segment_size=4096) as store:
        await busy_history(store, 3)
        monkeypatch.setattr(SegmentLog, "_index_segment", index_segment)
        assert (await store.compact()).segments_written
        assert list(d.glob("snapshot-*")) and on_loop == []
        monkeypatch.undo()
        before = await reads(store)
    async with EventStore(d, segment_size=4096) as again:
        assert await reads(again) == before


@pytest.mark.parametrize("cancels", [1, 2])
async def test_a_compaction_cancelled_while_its_thread_writes_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cancels: int
) -> None:
    """Cancelled while the worker thread writes a new segment, once or again
    (a timeout, then shutdown): the compaction waits for the thread before it
    closes the file and removes its work.  Otherwise the thread's next write
    lands in whatever file took the descriptor number, and files are left."""
    d = tmp_path / "s"
    real_write_all = compaction_mod.write_all
    writing, release = threading.Event(), threading.Event()
    monkeypatch.setattr(compaction_mod, "DRAIN_BYTES", 1)

    def slow_write_all(fd: int, data: Any) -> None:
        if len(data) > 100 and not writing.is_set():
            writing.set()
            release.wait(10)
        real_write_all(fd, data)

    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        await busy_history(store, 3)
        before = await reads(store)
        monkeypatch.setattr(compaction_mod, "write_all", slow_write_all)
        task = asyncio.ensure_future(store.compact())
        while not writing.is_set():
            await asyncio.sleep(0.01)
        for _ in range(cancels):
            task.cancel()
            await asyncio.sleep(0.05)
            assert not task.done()  # still waiting for the thread's write
        victim = tmp_path / "victim"
        fd = os.open(victim, os.O_RDWR | os.O_CREAT, 0o600)  # would take a closed number
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        os.close(fd)
        assert victim.stat().st_size == 0
        monkeypatch.setattr(compaction_mod, "write_all", real_write_all)
        assert not (d / compaction_mod.COMPACT_DIR).exists()
        assert deleted_files_open(d) == []
        assert await reads(store) == before
        assert (await store.compact()).segments_rewritten
        after = await reads(store)
    async with EventStore(d, segment_size=4096, snapshot_every=None) as again:
        assert await reads(again) == after
    assert verify(d).ok


@pytest.mark.parametrize("then", ["open", "repair"])
@pytest.mark.parametrize("fail_at", ["write", "verify", "commit", "switch"])
async def test_an_interrupted_compaction_opens_old_or_new_never_a_mix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str, then: str
) -> None:
    """Stop compaction at each stage as a crash would, then reopen from disk,
    or first check and repair the directory as an operator would: neither
    verify nor repair takes a switch in progress for damage."""
    d = tmp_path / "s"

    class Crash(BaseException):
        pass

    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        # Kept by every clear (the newest timestamp), so the first compacted
        # segment takes the first old segment's name: a crash between moving
        # it into place and removing the old ones must not lose it.
        await store.save_message("first", "kept for ever", timestamp=10**9)
        await busy_history(store, 3)
        before = await reads(store)
        old_files = {p.name: frames_only(p) for p in segment_files(d)}
        if fail_at == "write":
            real_add = compaction_mod._SegmentWriter.add
            count = {"n": 0}

            def add(self: Any, pos: int, ev: Any) -> None:
                count["n"] += 1
                if count["n"] == 50:
                    raise Crash
                real_add(self, pos, ev)

            monkeypatch.setattr(compaction_mod._SegmentWriter, "add", add)
        elif fail_at == "verify":
            real_replay = compaction_mod._replay
            calls = {"n": 0}

            async def replay_then_crash(*a: Any, **k: Any) -> Any:
                calls["n"] += 1
                if calls["n"] == 2:
                    raise Crash
                return await real_replay(*a, **k)

            monkeypatch.setattr(compaction_mod, "_replay", replay_then_crash)
        elif fail_at == "commit":

            def no_commit(*args: Any) -> None:
                raise Crash

            monkeypatch.setattr(compaction_mod, "_write_commit", no_commit)
        else:
            real_replace = os.replace
            moved = {"n": 0}

            def replace_then_crash(src: Any, dst: Any) -> None:
                real_replace(src, dst)
                moved["n"] += 1
                if moved["n"] == 1:
                    raise Crash

            monkeypatch.setattr(compaction_mod.os, "replace", replace_then_crash)
        with pytest.raises(Crash):
            await store.compact()
        monkeypatch.undo()
        # The process "dies" here: drop the store without closing it properly.
        store._log._lock.release()  # type: ignore[attr-defined]
        store._connected = False
    if then == "repair":
        report = verify(d)
        damage = find_damage(str(d))
        repaired = repair(str(d))
        assert repaired.damage is None and repaired.set_aside == []
        if fail_at == "switch":
            assert not report.ok and "interrupted after it committed" in str(report.problems)
            assert damage is not None and damage.path.endswith("COMMIT")
            assert repaired.compaction == "finished a committed compaction"
        else:
            # (The failed compaction removed its own work before "dying".)
            assert report.ok and damage is None and repaired.compaction is None
    async with EventStore(d, segment_size=4096, snapshot_every=None) as again:
        assert await reads(again) == before
    assert not (d / compaction_mod.COMPACT_DIR).exists()
    now_files = {p.name: p.read_bytes() for p in segment_files(d)}
    if fail_at in ("write", "verify", "commit"):
        # Rolled back: every old segment is there unchanged (plus the empty
        # segment the roll started).
        for name, data in old_files.items():
            assert now_files[name] == data
    else:
        # Rolled forward: compacted segments only, flagged as such.
        flags = [int.from_bytes((d / n).read_bytes()[10:12], "little") for n in now_files]
        assert flags.count(3) >= 1  # compacted, with holes
    assert find_damage(str(d)) is None


def _compactor(directory: Path) -> subprocess.Popen[str]:
    script = f"""
import asyncio, sys
sys.path.insert(0, {str(HERE.parent)!r})
from eventstore import EventStore
async def main():
    store = EventStore({str(directory)!r}, segment_size=4096, snapshot_every=None)
    await store.connect()
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        await store.save_message("bot", f"tick {{n}}", timestamp=50_000 + n)
        await store.save_user_stats("bot", chat_lines=1, last_seen=50_000 + n)
        if n % 3 == 0:
            await store.clear_old_messages(20)
        await store.compact()
        print(f"ack {{n}}", flush=True)
asyncio.run(main())
"""
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


async def test_sigkill_during_compaction_never_loses_or_mixes(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
        await busy_history(store, 2, forget=True)
    rng = random.Random(7)
    kills = 0
    for _ in range(25):
        proc = _compactor(d)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        await asyncio.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        kills += 1
        acked = [int(line.split()[1]) for line in out.splitlines() if line.startswith("ack")]
        async with EventStore(d, segment_size=4096, snapshot_every=None) as store:
            messages = await store.get_recent_messages(limit=100)
            ticks = [m["message"] for m in messages if m["username"] == "bot"]
            if acked:
                assert f"tick {acked[-1]}" in ticks or len(ticks) >= 20
            users = {u["username"] for u in await store.get_all_user_stats()}
            assert "user0" in users and "user3" not in users
        assert not (d / compaction_mod.COMPACT_DIR).exists()
        assert find_damage(str(d)) is None
    assert kills == 25


# -- property: random histories ---------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("chat"), st.integers(0, 4), st.integers(0, 50)),
        st.tuples(st.just("join"), st.integers(0, 4), st.integers(0, 50)),
        st.tuples(st.just("leave"), st.integers(0, 4), st.integers(0, 50)),
        st.tuples(st.just("count"), st.integers(0, 9), st.integers(0, 50)),
        st.tuples(st.just("peak"), st.integers(0, 30), st.integers(0, 50)),
        st.tuples(st.just("clear"), st.integers(0, 10), st.integers(0, 0)),
        st.tuples(st.just("forget"), st.integers(0, 4), st.integers(0, 50)),
        st.tuples(st.just("compact"), st.integers(0, 0), st.integers(0, 0)),
    ),
    min_size=1,
    max_size=60,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
async def test_random_histories_compact_to_the_same_reads(tmp_path_factory: Any, ops: Any) -> None:
    d = tmp_path_factory.mktemp("prop") / "s"
    async with EventStore(d, segment_size=1024, snapshot_every=None, clock=lambda: 1) as store:
        for op, a, b in ops:
            user = f"u{a}"
            if op == "chat":
                await store.save_user_stats(user, chat_lines=1, last_seen=b)
                await store.save_message(user, f"{user} says {b}", timestamp=b)
            elif op == "join":
                await store.save_user_stats(user, session_start=b)
                await store.log_user_action(user, "join", timestamp=b)
            elif op == "leave":
                await store.end_session(user, timestamp=b)
            elif op == "count":
                await store.log_user_count(a, a + 1, timestamp=b)
            elif op == "peak":
                await store.update_channel_stats(max_users=a, max_connected=a // 2, timestamp=b)
            elif op == "clear":
                await store.clear_old_messages(a)
            elif op == "forget":
                await store.forget_user(user, timestamp=b)
            else:
                before = await reads(store)
                await store.compact()
                assert await reads(store) == before
        before = await reads(store)
        state = store.projections.state()
        await store.compact()
        assert await reads(store) == before
        assert store.projections.state() == state
    async with EventStore(d, segment_size=1024, snapshot_every=None) as store:
        assert await reads(store) == before


async def test_the_proof_of_a_compaction_costs_no_object_per_row(tmp_path: Path) -> None:
    """Compaction proves its rewrite by comparing the read models of the old
    and the new log.  Comparing them through ``state()`` built a dict per
    user count and a tuple per action and message, twice: after a soak of
    two simulated years the nightly compaction (and every forget_user) then
    needed several times the memory of the read models themselves (measured:
    643 MiB at peak for read models of 153 MiB), and on PostgreSQL held the
    append lock meanwhile.  The comparison must cost no more than the models.
    """
    import tracemalloc

    from eventstore.events import UserActionLogged, UserCountLogged, UserStatsSaved

    d = tmp_path / "s"
    rows = 40_000
    async with EventStore(d, durability="none", snapshot_every=None) as store:
        batch: list[Any] = []
        for i in range(rows):
            t = 1_000_000 + 300 * i
            batch.append(UserCountLogged(t, i % 50, i % 70))
            batch.append(UserActionLogged(t, f"user{i % 100}", "join"))
            if len(batch) >= 4096:
                await store.append(batch)
                batch = []
        # Two updates of one user: the first is folded away, so there is
        # something to rewrite, and the proof runs.
        batch += [UserStatsSaved("a", 5, chat_lines=1), UserStatsSaved("a", 6, chat_lines=1)]
        await store.append(batch)
        expected = await reads(store)
        models = len(encode_state(store.projections))  # about the models' own size
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            report = await store.compact()
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert report.events_dropped == 1
        assert await reads(store) == expected
    # The old and the new read models, and the work of replaying into them,
    # take a few times the models; one object per row took far more.
    assert peak < 6 * models, (peak, models)


def test_same_state_sees_every_difference_state_sees() -> None:
    """Projections.same_state (the proof's comparison) agrees with comparing
    ``state()``: one differing row, value or field of any read model is a
    difference, and the same events folded twice are not."""
    from eventstore.events import (
        ChannelPeakRaised,
        MessageSaved,
        UserActionLogged,
        UserCountLogged,
        UserStatsSaved,
    )

    common: list[Any] = [
        UserStatsSaved("a", 5, chat_lines=1),
        UserActionLogged(5, "a", "join"),
        UserCountLogged(5, 1, 2),
        MessageSaved(5, "a", "hi"),
        ChannelPeakRaised(5, 3, 4),
    ]
    extras: list[list[Any]] = [
        [],
        [UserStatsSaved("a", 6, chat_lines=1)],
        [UserStatsSaved("b", 6)],
        [UserActionLogged(6, "a", "leave")],
        [UserCountLogged(6, 1, 2)],
        [MessageSaved(6, "a", "hi")],
        [ChannelPeakRaised(6, 9, None)],
    ]
    built = []
    for extra in extras:
        proj = Projections()
        proj.apply_all(enumerate(common + extra, 1))
        built.append(proj)
    # Same length, other values: only the user count's numbers differ.
    other_count = Projections()
    other_count.apply_all(enumerate([*common[:2], UserCountLogged(5, 1, 3), *common[3:]], 1))
    built.append(other_count)
    for a in built:
        for b in built:
            assert a.same_state(b) == (a.state() == b.state())
            # The digest compaction keeps of the state before agrees too.
            assert (a.digest() == b.digest()) == (a.state() == b.state())
    twice = Projections()
    twice.apply_all(enumerate(common, 1))
    assert twice.same_state(built[0]) and twice.digest() == built[0].digest()
    assert sum(a.same_state(b) for a in built for b in built) == len(built)
    # The users' dict in another order is the same state.
    two = built[2]  # users "a" and "b"
    before = two.digest()
    two.user_stats.users = dict(reversed(two.user_stats.users.items()))
    assert list(two.user_stats.users) == ["b", "a"] and two.digest() == before


def test_read_models_are_freed_without_the_cyclic_collector() -> None:
    """A replay's read models (compaction's state before, a snapshot
    check's) hold hundreds of megabytes at years of history: in a reference
    cycle they lived on until the cyclic collector ran."""
    import gc
    import weakref

    from eventstore.events import UserForgotten, UserStatsSaved

    gc.disable()
    try:
        proj = Projections()
        proj.apply_all(enumerate([UserStatsSaved("a", 5), UserForgotten("a", 6)], 1))
        gone = weakref.ref(proj)
        del proj
        assert gone() is None
    finally:
        gc.enable()


async def test_a_forget_left_unfinished_is_found_without_decoding_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """forget_user asks the log about every name no read knows: the scan
    decodes only frames whose bytes hold the name."""
    from eventstore import segmentlog

    d = tmp_path / "s"
    async with EventStore(d, durability="flush", segment_size=64 * 1024) as store:
        await store.append([MessageSaved(100 + i, f"u{i % 9}", f"m{i}") for i in range(3000)])
        await store.append([MessageSaved(3000, "u2", "where is zed?")])
        await store.append([UserForgotten("carol", 3001)])
        await store.append([MessageSaved(4000 + i, "u1", f"later {i}") for i in range(3000)])
    decoded: list[int] = []
    real = segmentlog._decode_runs

    def counting(*args: Any) -> Any:
        runs = real(*args)
        decoded.append(sum(len(events) for _, events in runs))
        return runs

    monkeypatch.setattr(segmentlog, "_decode_runs", counting)
    async with EventStore(d, read_only=True) as store:
        assert await store.erasure_unfinished("carol")
        assert decoded and sum(decoded) < 6002 // 4
        decoded.clear()
        assert not await store.erasure_unfinished("nobody")
        assert decoded == []
        # A frame holding the name's bytes (here in a message) is decoded,
        # and holds no forget.
        assert not await store.erasure_unfinished("zed")
        assert decoded


def _append_frame(d: Path, position: int, payload: bytes) -> None:
    """A frame of one event, given as its msgpack bytes, at the end of the last segment."""
    seg = sorted(d.glob("*.seg"))[-1]
    tail = struct.pack("<QI", position, 1)
    frame = struct.pack("<II", len(payload) + 1, zlib.crc32(tail + b"\x91" + payload))
    with open(seg, "ab") as f:
        f.write(frame + tail + b"\x91" + payload)


@pytest.mark.parametrize(
    "encoded",
    [
        b"\x93\x0a\xa1a\x05",  # as this code writes it
        b"\x93\x0a\xd9\x01a\x05",  # the name as str 8
        b"\xdc\x00\x03\x0a\xa1a\x05",  # the array as array 16
        b"\x93\xcc\x0a\xa1a\x05",  # the tag as uint 8
        b"\xdc\x00\x10\x0a\xa1a\x05" + b"\x07" * 13,  # newer code: 13 more fields
    ],
    ids=["shortest", "str8", "array16", "uint8-tag", "newer-fields"],
)
async def test_a_forget_in_any_encoding_is_found(tmp_path: Path, encoded: bytes) -> None:
    """msgpack allows longer forms than msgspec writes; another writer may use them."""
    d = tmp_path / "s"
    async with EventStore(d, durability="flush", snapshot_every=None) as store:
        await store.append([MessageSaved(1, "b", "hi")])
    _append_frame(d, 2, encoded)
    async with EventStore(d, read_only=True) as store:
        assert [e async for _, e in store.read()][-1] == UserForgotten("a", 5)
        assert await store.erasure_unfinished("a")
        assert not await store.erasure_unfinished("b")


async def test_a_forget_an_upcaster_makes_is_found(tmp_path: Path) -> None:
    """An old forget, under its old tag and in its old shape, is a forget once upcast."""
    from eventstore.codec import remove_upcaster, upcaster
    from eventstore.events import BaseEvent

    class ForgetV0(BaseEvent, tag=99, frozen=True):
        timestamp: int
        name_parts: list[str]

    @upcaster(ForgetV0)
    def _(old: ForgetV0) -> UserForgotten:
        return UserForgotten("".join(old.name_parts), old.timestamp)

    try:
        d = tmp_path / "s"
        async with EventStore(d, durability="flush", snapshot_every=None) as store:
            await store.append([MessageSaved(1, "carol", "a secret")])
        _append_frame(d, 2, msgspec.msgpack.encode(ForgetV0(2, ["car", "ol"])))
        async with EventStore(d) as store:
            assert not store.knows_user("carol")
            assert await store.erasure_unfinished("carol")
            assert await store.forget_user("carol")
        assert not _bytes_hold(d, b"a secret")
    finally:
        remove_upcaster(ForgetV0)


_DIES_AFTER_COMMIT = """
import asyncio, os, sys
sys.path.insert(0, {repo!r})
import eventstore.compaction as c
c._switch = lambda *a: os._exit(9)  # killed once COMMIT is durable, before any file moves
from eventstore import EventStore
async def main():
    async with EventStore({d!r}, segment_size=1024, snapshot_every=None) as s:
        await s.compact()
asyncio.run(main())
"""


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "LOCK"
    }


async def _committed_not_switched(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A store whose compaction was killed right after its COMMIT; and its reads."""
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024, snapshot_every=None) as store:
        for i in range(100):
            await store.save_message("alice", f"m{i}", timestamp=i)
            await store.save_user_stats("alice", chat_lines=1, last_seen=i)
        before = await reads(store)
    repo = str(Path(__file__).resolve().parent.parent)
    child = _DIES_AFTER_COMMIT.format(repo=repo, d=str(d))
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    assert compaction_mod.pending_commit(str(d)) is not None
    return d, before


async def test_a_damaged_commit_is_refused_and_moves_no_file(tmp_path: Path) -> None:
    """Obeyed, a COMMIT naming a new segment that is not there deleted the
    old segments all the same, and the next open rolled the rest back: the
    whole log was lost.  Every flipped bit is refused, changing nothing."""
    d, before = await _committed_not_switched(tmp_path)
    commit = d / compaction_mod.COMPACT_DIR / compaction_mod.COMMIT
    good = commit.read_bytes()
    assert good.endswith(b"crc32 %08x\n" % zlib.crc32(good[: good.rindex(b"crc32")]))
    files = _tree(d)
    for offset in range(len(good)):
        bad = bytearray(good)
        bad[offset] ^= 1 << (offset % 8)
        commit.write_bytes(bytes(bad))
        with pytest.raises(IntegrityError, match=r"COMMIT: .*nothing was changed"):
            await EventStore(d, segment_size=1024, snapshot_every=None).connect()
        commit.write_bytes(good)
        assert _tree(d) == files, offset
    commit.write_bytes(good[:-10])  # cut short
    with pytest.raises(IntegrityError, match="nothing was changed"):
        await EventStore(d, segment_size=1024, snapshot_every=None).connect()
    commit.write_bytes(good)
    async with EventStore(d, segment_size=1024, snapshot_every=None) as store:
        assert await reads(store) == before
    assert verify(d).ok and not (d / compaction_mod.COMPACT_DIR).exists()


async def test_a_commit_that_names_a_missing_segment_is_refused(tmp_path: Path) -> None:
    """One written by a release before the checksum line: its names are checked."""
    d, before = await _committed_not_switched(tmp_path)
    commit = d / compaction_mod.COMPACT_DIR / compaction_mod.COMMIT
    good = commit.read_bytes()
    lines = good.splitlines(keepends=True)[:-1]  # as an earlier release wrote it
    new = [line for line in lines if line.startswith(b"new ")]
    renamed = new[0].replace(b"0.seg", b"7.seg").replace(b"1.seg", b"7.seg")
    assert renamed != new[0]
    commit.write_bytes(b"".join(renamed if line == new[0] else line for line in lines))
    files = _tree(d)
    with pytest.raises(IntegrityError, match=r"is neither in .* nor in the store directory"):
        await EventStore(d, segment_size=1024, snapshot_every=None).connect()
    assert _tree(d) == files
    commit.write_bytes(b"".join(lines))  # whole, without the checksum line: finished
    async with EventStore(d, segment_size=1024, snapshot_every=None) as store:
        assert await reads(store) == before
    assert verify(d).ok


async def test_a_proof_that_cannot_open_the_new_segments_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a ConnectionError (a bot would reconnect a store that is fine),
    but the compaction's own failure, with the store going on as it was."""
    import errno

    real = os.open

    def no_descriptors(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if "compacting" in str(path) and str(path).endswith(".seg") and flags == os.O_RDONLY:
            raise OSError(errno.EMFILE, "Too many open files", str(path))
        return real(path, flags, *args, **kwargs)

    d = tmp_path / "s"
    async with EventStore(d, segment_size=4096) as store:
        await busy_history(store, 3)
        before = await reads(store)
        monkeypatch.setattr(os, "open", no_descriptors)
        with pytest.raises(StorageError, match="compaction failed, nothing was changed") as err:
            await store.compact()
        monkeypatch.undo()
        assert not isinstance(err.value, ConnectionError)
        assert store.is_connected and await reads(store) == before
        await store.save_message("amy", "still writing", timestamp=99_999)
    assert not (d / "compacting").exists()


async def test_compaction_hands_freed_memory_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its replays' read models are freed, and the allocator asked to return
    the pages (after compacting a 10M-event store: 305 MB kept, 179 after)."""
    import eventstore.store as store_mod
    from eventstore.allocator import release_free_memory

    if sys.platform.startswith("linux"):
        assert release_free_memory() is True  # glibc's malloc_trim is found
    calls: list[bool] = []
    monkeypatch.setattr(store_mod, "release_free_memory", lambda: calls.append(True) or True)
    async with EventStore(tmp_path / "s", segment_size=4096) as store:
        await busy_history(store, 3)
        await store.compact(dry_run=True)  # replays the log all the same
        assert calls == [True]
        await store.compact()
        assert calls == [True, True]
