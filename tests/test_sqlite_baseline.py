"""The benchmarks' baseline and workload: the contract suite on SQLite, and sanity checks."""

from __future__ import annotations

import itertools
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiosqlite")

# bench/ is not an installed package; under a plain ``pytest`` (no cwd on
# sys.path) it is found only through the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sqlite_adapter import SqliteAdapter
from bench.workload import DAY, START, SimClock, apply, events, op_time, operations
from eventstore import EventStore, StorageAdapter
from eventstore.events import (
    ChannelPeakRaised,
    MessageSaved,
    UserActionLogged,
    UserCountLogged,
)
from eventstore.legacy import import_sqlite
from eventstore.testing import FakeClock, StorageContract, read_state


class TestSqliteBaseline(StorageContract):
    def make_store(self, clock: FakeClock, tmp_path: Path) -> StorageAdapter:
        return SqliteAdapter(tmp_path / "db.sqlite", clock=clock)


def pragma(path: Path, name: str) -> Any:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


# -- the adapter ---------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "level"), [("FULL", 2), ("NORMAL", 1)])
async def test_wal_mode_and_synchronous(tmp_path: Path, mode: Any, level: int) -> None:
    path = tmp_path / "db.sqlite"
    async with SqliteAdapter(path, synchronous=mode) as store:
        assert isinstance(store, SqliteAdapter)
        db = store._conn()
        assert (await db.execute_fetchall("PRAGMA synchronous"))[0][0] == level  # type: ignore[index]
    assert pragma(path, "journal_mode") == "wal"


def test_synchronous_must_be_full_or_normal(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SqliteAdapter(tmp_path / "db.sqlite", synchronous="OFF")  # type: ignore[arg-type]


async def test_writes_that_change_nothing_write_nothing(tmp_path: Path) -> None:
    clock = FakeClock(1_000)
    async with SqliteAdapter(tmp_path / "db.sqlite", clock=clock) as store:
        assert isinstance(store, SqliteAdapter)
        await store.save_user_stats("amy", session_start=900)
        await store.update_channel_stats(max_users=5, max_connected=5)
        await store.save_message("amy", "hi")
        changes = store._conn().total_changes
        await store.save_user_stats("amy")
        await store.save_user_stats("amy", first_seen=2_000, last_seen=10, session_start=900)
        await store.save_user_stats("amy", chat_lines=0, time_connected=0)
        await store.update_channel_stats(max_users=5, max_connected=4)
        await store.update_channel_stats()
        assert await store.clear_old_messages(keep_count=1) == 0
        assert await store.end_session("nobody") == 0
        assert store._conn().total_changes == changes


async def test_ids_come_from_autoincrement_and_are_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with SqliteAdapter(path) as store:
        for i in range(3):
            await store.save_message("amy", f"m{i}", timestamp=i)
        old = max(m["id"] for m in await store.get_recent_messages())
        assert await store.clear_old_messages(keep_count=0) == 3
    async with SqliteAdapter(path) as store:
        await store.save_message("amy", "again", timestamp=9)
        assert [m["id"] for m in await store.get_recent_messages()] == [old + 1]


async def test_the_file_is_a_legacy_database(tmp_path: Path) -> None:
    # The baseline writes the bot's legacy schema, so the importer reads it.
    path = tmp_path / "db.sqlite"
    clock = SimClock()
    async with SqliteAdapter(path, synchronous="NORMAL", clock=clock) as baseline:
        await apply(baseline, operations(600, seed=1), clock=clock)
        expected = await read_state(baseline)
    async with EventStore(":memory:") as store:
        report = await import_sqlite(store, path)
        assert report.missing_tables == ()
        state = await read_state(store)
    for rows in ("actions", "counts", "messages"):
        for row in expected[rows] + state[rows]:
            del row["id"]
    assert state == expected


# -- the workload ---------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "seed"), [(1, 0), (2, 0), (3, 5), (7, 1), (250, 2), (4_000, 0)])
async def test_events_are_exactly_what_the_store_appends(n: int, seed: int) -> None:
    clock = SimClock()
    async with EventStore(":memory:", clock=clock) as store:
        await apply(store, operations(n, seed), clock=clock)
        recorded = [event async for _, event in store.read()]
    assert len(recorded) == n
    assert recorded == list(events(n, seed))


async def test_baseline_and_store_agree_on_the_workload(tmp_path: Path) -> None:
    ops = list(operations(3_000, seed=4))
    states = []
    for adapter, clock in [
        (EventStore(":memory:", clock=(c := SimClock())), c),
        (SqliteAdapter(tmp_path / "db.sqlite", synchronous="NORMAL", clock=(d := SimClock())), d),
    ]:
        async with adapter:
            assert await apply(adapter, ops, clock=clock) == len(ops)
            states.append(await read_state(adapter))
    # Ids differ by design (log positions vs AUTOINCREMENT); everything else agrees.
    for state in states:
        for rows in ("actions", "counts", "messages"):
            for row in state[rows]:
                del row["id"]
    assert states[0] == states[1]


def test_workload_is_deterministic_and_in_time_order() -> None:
    ops = list(operations(5_000, seed=7))
    assert ops == list(operations(5_000, seed=7))
    assert ops != list(operations(5_000, seed=8))
    times = [op_time(op) for op in ops]
    assert times == sorted(times)
    assert times[0] >= START
    assert list(operations(0)) == []
    assert list(events(0)) == []


def test_workload_is_a_busy_channel() -> None:
    kinds: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    count_times = []
    last = START
    for event in events(500_000, seed=0):
        kinds[type(event).__name__] += 1
        if isinstance(event, UserActionLogged):
            actions[event.action_type] += 1
            assert event.details == ("!stats" if event.action_type == "pm" else None)
        elif isinstance(event, UserCountLogged):
            count_times.append(event.timestamp)
            assert 0 <= event.chat_users <= event.connected_users
        elif isinstance(event, ChannelPeakRaised):
            assert event.max_users is not None or event.max_connected is not None
        if isinstance(event, MessageSaved):
            last = event.timestamp
    days = (last - START) / DAY
    assert kinds["MessageSaved"] / days == pytest.approx(20_000, rel=0.05)
    assert actions["join"] / days == pytest.approx(1_500, rel=0.1)
    assert actions["leave"] / days == pytest.approx(1_500, rel=0.1)
    assert 0 < actions["pm"] / days < 300
    assert {b - a for a, b in itertools.pairwise(count_times)} == {300}


async def test_apply_skips_end_session_where_there_is_none() -> None:
    calls: list[str] = []

    class Recorder:
        def __getattr__(self, name: str) -> Any:
            if name == "end_session":
                raise AttributeError(name)

            async def record(*args: Any, **kwargs: Any) -> None:
                calls.append(name)

            return record

    ops = list(operations(2_000, seed=3))
    made = await apply(Recorder(), ops)
    assert "end_session" not in calls
    assert made == len(ops) - sum(op[0] == "end_session" for op in ops) == len(calls)
    assert sum(op[0] == "end_session" for op in ops) > 0
