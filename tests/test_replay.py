"""Point-in-time replay: exact answers at a position (``until``) and at a moment (``at``).

Two oracles that do not share replay's code path:

* ``until``: while a store is being written, the live store's own reads are
  recorded after every write; replaying up to that position must give the
  same reads.
* ``at``: a naive model below folds the events whose ``event_time`` is at or
  before the moment, one plain dict and list at a time, straight from the
  semantics in ``eventstore/adapter.py``.  Histories mix in back-dated events
  (an import appends old timestamps at the end of the log), where ``at`` and
  ``until`` disagree.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from eventstore import ConnectionError, EventStore, ValidationError
from eventstore.events import (
    ChannelPeakRaised,
    ChannelStatsSet,
    Event,
    MessageSaved,
    MessagesCleared,
    SessionEnded,
    UserActionLogged,
    UserCountLogged,
    UserForgotten,
    UserStatsSaved,
    UserStatsSet,
    event_time,
)
from eventstore.inspect import tail_events
from eventstore.replay import replay
from eventstore.testing import FakeClock
from projections import Projections

T0 = 1_700_000_000
NAMES = ("ada", "bob", "cy", "dee", "eve")


# -- the naive model --------------------------------------------------------------------


def model(events: list[tuple[int, Event]], at: int) -> dict[str, Any]:
    """Reads as of ``at``: fold every event with event_time <= at, in log order."""
    users: dict[str, list[Any]] = {}
    messages: list[tuple[int, int, str, str]] = []  # (ts, pos, user, text)
    actions: list[tuple[int, int, str, str, str | None]] = []
    counts: list[tuple[int, int, int, int]] = []
    channel: dict[str, Any] = {
        "max_users": 0,
        "max_users_timestamp": None,
        "max_connected": 0,
        "max_connected_timestamp": None,
        "last_updated": None,
    }
    for pos, ev in events:
        if event_time(ev) > at:
            continue
        if isinstance(ev, UserStatsSaved):
            rec = users.get(ev.username)
            if rec is None:
                users[ev.username] = [
                    ev.now if ev.first_seen is None else ev.first_seen,
                    ev.now if ev.last_seen is None else ev.last_seen,
                    ev.chat_lines,
                    ev.time_connected,
                    ev.session_start,
                ]
            else:
                if ev.first_seen is not None:
                    rec[0] = min(rec[0], ev.first_seen)
                if ev.last_seen is not None:
                    rec[1] = max(rec[1], ev.last_seen)
                rec[2] += ev.chat_lines
                rec[3] += ev.time_connected
                if ev.session_start is not None:
                    rec[4] = ev.session_start
        elif isinstance(ev, UserStatsSet):
            users[ev.username] = [
                ev.first_seen,
                ev.last_seen,
                ev.total_chat_lines,
                ev.total_time_connected,
                ev.current_session_start,
            ]
        elif isinstance(ev, SessionEnded):
            rec = users.get(ev.username)
            if rec is not None and rec[4] is not None:
                rec[3] += ev.seconds
                rec[1] = max(rec[1], ev.timestamp)
                rec[4] = None
        elif isinstance(ev, UserActionLogged):
            actions.append((ev.timestamp, pos, ev.username, ev.action_type, ev.details))
        elif isinstance(ev, ChannelPeakRaised):
            changed = False
            if ev.max_users is not None and ev.max_users > channel["max_users"]:
                channel["max_users"], channel["max_users_timestamp"] = ev.max_users, ev.timestamp
                changed = True
            if ev.max_connected is not None and ev.max_connected > channel["max_connected"]:
                channel["max_connected"] = ev.max_connected
                channel["max_connected_timestamp"] = ev.timestamp
                changed = True
            if changed:
                channel["last_updated"] = ev.timestamp
        elif isinstance(ev, ChannelStatsSet):
            channel = {
                "max_users": ev.max_users,
                "max_users_timestamp": ev.max_users_timestamp,
                "max_connected": ev.max_connected,
                "max_connected_timestamp": ev.max_connected_timestamp,
                "last_updated": ev.last_updated,
            }
        elif isinstance(ev, UserCountLogged):
            counts.append((ev.timestamp, pos, ev.chat_users, ev.connected_users))
        elif isinstance(ev, MessageSaved):
            messages.append((ev.timestamp, pos, ev.username, ev.message))
        elif isinstance(ev, MessagesCleared):
            messages.sort()
            if len(messages) > ev.keep_count:
                messages = messages[len(messages) - ev.keep_count :]
        elif isinstance(ev, UserForgotten):
            users.pop(ev.username, None)
            messages = [m for m in messages if m[2] != ev.username]
            actions = [a for a in actions if a[2] != ev.username]
        else:  # pragma: no cover - the histories below use no other events
            raise AssertionError(ev)
    return {
        "users": {
            name: {
                "username": name,
                "first_seen": r[0],
                "last_seen": r[1],
                "total_chat_lines": r[2],
                "total_time_connected": r[3],
                "current_session_start": r[4],
            }
            for name, r in users.items()
        },
        "channel": channel,
        "messages": [
            {"id": p, "timestamp": ts, "username": u, "message": m}
            for ts, p, u, m in sorted(messages, reverse=True)
        ],
        "actions": [
            {"id": p, "timestamp": ts, "username": u, "action_type": a, "details": d}
            for ts, p, u, a, d in sorted(actions, reverse=True)
        ],
        "counts": [
            {"id": p, "timestamp": ts, "chat_users": c, "connected_users": n}
            for ts, p, c, n in sorted(counts)
        ],
    }


async def replayed(directory: Path, **point: Any) -> dict[str, Any]:
    """The same reads, from a replay."""
    async with await replay(directory, **point) as result:
        return {
            "users": {row["username"]: row for row in result.top_chatters(None)},
            "channel": result.channel_peaks(),
            "messages": await result.recent_messages(10_000),
            "actions": await result.recent_actions(10_000),
            "counts": result.projections.counts.history(None, None, None),
        }


async def live_reads(store: EventStore) -> dict[str, Any]:
    return {
        "users": {row["username"]: row for row in await store.get_all_user_stats()},
        "channel": await store.get_channel_stats(),
        "messages": await store.get_recent_messages(limit=10_000),
        "actions": await store.get_user_actions(limit=10_000),
        "counts": await store.get_user_count_history(),
    }


# -- histories --------------------------------------------------------------------------


async def random_history(
    directory: Path, seed: int, steps: int = 150, *, record: bool = False
) -> tuple[list[tuple[int, Event]], dict[int, dict[str, Any]]]:
    """Write a random bot history; return the log and, optionally, reads after each write.

    Time mostly moves forward, sometimes stands still (equal timestamps), and
    now and then an "import" appends a batch of back-dated events.  Recording
    histories forget nobody: ``forget_user`` compacts the log, which rewrites
    the past the recorded reads describe (by design: forgotten is forgotten).
    """
    rng = random.Random(seed)
    clock = FakeClock(T0)
    reads: dict[int, dict[str, Any]] = {}
    async with EventStore(directory, durability="none", clock=clock, segment_size=4096) as store:
        for _ in range(steps):
            clock.advance(rng.choice((0, 1, 1, 5, 30)))
            t = clock.now
            user = rng.choice(NAMES)
            op = rng.random()
            if op < 0.3:
                await store.save_user_stats(user, chat_lines=1, last_seen=t)
                await store.save_message(user, f"line {rng.randrange(1000)}", timestamp=t)
            elif op < 0.4:
                await store.log_user_action(user, "join", timestamp=t)
                await store.save_user_stats(user, first_seen=t, last_seen=t, session_start=t)
            elif op < 0.5:
                await store.log_user_action(user, "leave", timestamp=t)
                await store.end_session(user, t)
            elif op < 0.6:
                chat = rng.randrange(10)
                await store.log_user_count(chat, chat + rng.randrange(10), timestamp=t)
            elif op < 0.7:
                await store.update_channel_stats(
                    max_users=rng.randrange(20), max_connected=rng.randrange(40), timestamp=t
                )
            elif op < 0.75:
                await store.clear_old_messages(keep_count=rng.randrange(1, 6))
            elif op < 0.78 and not record:
                await store.forget_user(user, timestamp=t)
            elif op < 0.85:
                await store.log_user_action(
                    user, "pm", details=f"!cmd{rng.randrange(5)}", timestamp=t
                )
            else:
                # An import: absolute stats and history, back-dated up to an hour.
                old = t - rng.randrange(1, 3600)
                await store.append(
                    [
                        UserStatsSet(user, old - 100, old, rng.randrange(50), rng.randrange(900)),
                        MessageSaved(old, user, "imported"),
                        UserCountLogged(old + 1, rng.randrange(9), rng.randrange(9, 30)),
                        UserActionLogged(old, user, "join", None),
                        ChannelStatsSet(rng.randrange(30), old, rng.randrange(60), old, old),
                    ]
                )
            if record:
                reads[store.position] = await live_reads(store)
    # Read back what is on disk (the log replay reads), not from the writer.
    async with EventStore(directory, read_only=True) as reader:
        events = [item async for item in reader.read()]
    return events, reads


def moments(events: list[tuple[int, Event]]) -> list[int]:
    """Every distinct event time, a second either side, and beyond both ends."""
    times = sorted({event_time(ev) for _, ev in events})
    out = {times[0] - 1, times[-1] + 1}
    for t in times:
        out.update((t - 1, t, t + 1))
    return sorted(out)


# -- at -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
async def test_at_equals_the_naive_model_at_every_moment(tmp_path: Path, seed: int) -> None:
    directory = tmp_path / "s"
    events, _ = await random_history(directory, seed)
    assert any(isinstance(ev, UserStatsSet) for _, ev in events), "no back-dated import"
    every = moments(events)
    for at in [*every[:: max(1, len(every) // 40)], every[-1]]:
        assert await replayed(directory, at=at) == model(events, at), f"at={at}"


async def test_at_includes_events_exactly_at_the_moment(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    async with EventStore(tmp_path / "s", clock=clock) as store:
        await store.save_message("ada", "one", timestamp=T0 + 10)
        await store.save_message("bob", "two", timestamp=T0 + 20)
    for at, expected in (
        (T0 + 9, []),
        (T0 + 10, ["one"]),
        (T0 + 19, ["one"]),
        (T0 + 20, ["two", "one"]),
    ):
        async with await replay(tmp_path / "s", at=at) as past:
            assert [m["message"] for m in await past.recent_messages()] == expected, at


async def test_at_answers_for_back_dated_history(tmp_path: Path) -> None:
    """An import appended last, with old timestamps: ``at`` sees it in its own time."""
    clock = FakeClock(T0 + 10_000)
    d = tmp_path / "s"
    async with EventStore(d, clock=clock) as store:
        await store.save_user_stats("ada", chat_lines=1, last_seen=T0 + 10_000)
        await store.save_message("ada", "live", timestamp=T0 + 10_000)
        await store.log_user_count(3, 5, timestamp=T0 + 10_000)
        await store.append(
            [
                UserStatsSet("old", T0, T0 + 100, 42, 600),
                MessageSaved(T0 + 50, "old", "from the legacy db"),
                UserCountLogged(T0 + 60, 7, 9),
                ChannelStatsSet(7, T0 + 60, 9, T0 + 60, T0 + 60),
            ]
        )
    async with await replay(d, at=T0 + 1000) as past:
        assert [u["username"] for u in past.top_chatters()] == ["old"]
        assert past.top_chatters()[0]["total_chat_lines"] == 42
        assert [m["message"] for m in await past.recent_messages()] == ["from the legacy db"]
        assert past.user_counts()["samples"] == 1
        assert past.channel_peaks()["max_users"] == 7
        assert (past.applied, past.skipped) == (4, 3)
        assert past.position == 7  # the last event applied
    async with await replay(d, at=T0 + 60) as past:
        # UserStatsSet's time is its last_seen (T0 + 100): not yet.
        assert past.top_chatters() == []
        assert [m["message"] for m in await past.recent_messages()] == ["from the legacy db"]
    # Up to position 3 the import had not happened: ``until`` follows the log.
    async with await replay(d, until=3) as past:
        assert [u["username"] for u in past.top_chatters()] == ["ada"]
        assert past.user_counts()["samples"] == 1


async def test_at_before_everything_is_empty_and_after_everything_is_now(tmp_path: Path) -> None:
    d = tmp_path / "s"
    events, _ = await random_history(d, seed=7, steps=60)
    first, last = moments(events)[0], moments(events)[-1]
    async with await replay(d, at=first) as past:
        assert past.applied == 0 and past.position == 0
        assert past.top_chatters() == [] and await past.recent_messages() == []
    async with await replay(d, at=last) as everything, await replay(d) as now:
        assert everything.projections.state() == now.projections.state()


# -- until ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
async def test_until_equals_the_live_reads_after_that_write(tmp_path: Path, seed: int) -> None:
    directory = tmp_path / "s"
    _, reads = await random_history(directory, seed, steps=120, record=True)
    positions = sorted(reads)
    for position in [*positions[::5], positions[-1]]:
        assert await replayed(directory, until=position) == reads[position], position


async def test_until_zero_is_empty_and_past_the_end_is_everything(tmp_path: Path) -> None:
    d = tmp_path / "s"
    await random_history(d, seed=3, steps=40)
    async with await replay(d, until=0) as empty:
        assert empty.position == 0 and empty.applied == 0
        assert empty.projections.state() == Projections().state()
    async with await replay(d, until=10**9) as everything, EventStore(d, read_only=True) as store:
        assert everything.projections.state() == store.projections.state()
        assert everything.position == store.position == everything.head


async def test_replay_matches_a_fresh_connect(tmp_path: Path) -> None:
    d = tmp_path / "s"
    await random_history(d, seed=11)
    async with await replay(d) as now, EventStore(d, read_only=True) as store:
        assert now.projections.state() == store.projections.state()
        assert await now.recent_messages(50) == await store.get_recent_messages(limit=50)


# -- the rest of the API ------------------------------------------------------------------


async def test_summary_has_every_section(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d) as store:
        await store.save_user_stats("ada", chat_lines=3, last_seen=T0)
        await store.save_user_stats("bob", chat_lines=5, last_seen=T0)
        await store.save_message("bob", "hi", timestamp=T0)
        await store.log_user_count(2, 4, timestamp=T0)
        await store.log_user_count(6, 3, timestamp=T0 + 300)
        await store.update_channel_stats(max_users=6, max_connected=4, timestamp=T0 + 300)
    async with await replay(d) as now:
        summary = await now.summary(limit=1)
    assert [u["username"] for u in summary["top_chatters"]] == ["bob"]
    assert summary["recent_chat"] == [
        {"id": 3, "timestamp": T0, "username": "bob", "message": "hi"}
    ]
    assert summary["user_counts"] == {
        "samples": 2,
        "first_timestamp": T0,
        "last_timestamp": T0 + 300,
        "latest": {"timestamp": T0 + 300, "chat_users": 6, "connected_users": 3},
        "max_chat_users": {"value": 6, "timestamp": T0 + 300},
        "max_connected_users": {"value": 4, "timestamp": T0},
        "mean_chat_users": 4.0,
        "mean_connected_users": 3.5,
    }
    assert summary["channel_peaks"]["max_users"] == 6
    assert (summary["position"], summary["head"], summary["users"]) == (6, 6, 2)


async def test_until_and_at_together_are_refused(tmp_path: Path) -> None:
    async with EventStore(tmp_path / "s") as store:
        await store.save_message("ada", "hi")
    with pytest.raises(ValidationError, match="not both"):
        await replay(tmp_path / "s", until=1, at=T0)


@pytest.mark.parametrize("point", [{"until": -1}, {"at": -5}, {"until": True}, {"at": 1.5}])
async def test_bad_points_are_refused(tmp_path: Path, point: dict[str, Any]) -> None:
    (tmp_path / "s").mkdir()
    with pytest.raises(ValidationError):
        await replay(tmp_path / "s", **point)


async def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConnectionError, match="no such store directory"):
        await replay(tmp_path / "nope")


async def test_replay_beside_a_live_writer_and_reports_progress(tmp_path: Path) -> None:
    d = tmp_path / "s"
    calls: list[tuple[int, int]] = []
    async with EventStore(d, segment_size=2048) as store:
        for i in range(100):
            await store.save_message("ada", f"m{i}", timestamp=T0 + i)
        async with await replay(d, progress=lambda done, total: calls.append((done, total))) as now:
            assert now.position == 100
            assert (await now.recent_messages(1))[0]["message"] == "m99"
    assert calls and calls[-1] == (100, 100)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


async def test_compacted_stretch_is_reported(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024) as store:
        for i in range(40):
            await store.save_user_stats("ada", chat_lines=1, last_seen=T0 + i)
        async with await replay(d) as before:
            assert before.compacted_through is None
        await store.compact()
        async with await replay(d) as after:
            assert after.compacted_through is not None
            assert after.compacted_through >= 40
            # The end state is what it was: compaction keeps every read.
            assert after.top_chatters() == before.top_chatters()


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
async def test_replay_of_a_path_that_holds_no_store_says_so(tmp_path: Path, kind: str) -> None:
    """As the CLI does: an empty answer would pass for an empty store."""
    target = tmp_path / "data"
    if kind == "empty":
        target.mkdir()
    elif kind == "file":
        target.write_text("not a store")
    message = {
        "missing": "no such store directory",
        "empty": r"no event store here \(no segment files\)",
        "file": "is a file, not a store directory",
    }[kind]
    with pytest.raises(ConnectionError, match=message):
        await replay(target)
    if kind == "empty":
        assert list(target.iterdir()) == []  # nothing was created


async def test_tail_follow_waits_for_a_store_not_created_yet(tmp_path: Path) -> None:
    """A follower started before the bot (a mounted volume): it waits, then reads."""
    target = tmp_path / "data"
    target.mkdir()

    async def first_three() -> list[int]:
        got = []
        async for position, _ in tail_events(target, 5, follow=True, interval=0.02):
            got.append(position)
            if len(got) == 3:
                return got
        return got

    follower = asyncio.create_task(first_three())
    await asyncio.sleep(0.1)
    async with EventStore(target) as store:
        for i in range(3):
            await store.save_message("a", f"m{i}", timestamp=i)
    assert await asyncio.wait_for(follower, 10) == [1, 2, 3]


def test_an_absolute_record_describes_its_latest_moment() -> None:
    from eventstore.events import ChannelStatsSet, UserStatsSet

    # A user who left at 1100 and came back at 5000 without a chat line.
    assert event_time(UserStatsSet("ada", 1000, 1100, 3, 100, 5000)) == 5000
    assert event_time(UserStatsSet("ada", 1000, 1100, 3, 100, None)) == 1100
    assert event_time(ChannelStatsSet(9, 700, 12, 900, None)) == 900
    assert event_time(ChannelStatsSet(0, None, 0, None, None)) == 0


async def test_at_a_moment_no_session_starts_later_even_after_compaction(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, segment_size=1024) as store:
        await store.save_user_stats("ada", first_seen=1000, last_seen=1000, session_start=1000)
        await store.end_session("ada", 1100)
        await store.save_user_stats("ada", session_start=5000)  # rejoins, says nothing
        await store.save_message("bob", "keeps the log going", 6000)
        await store.compact()
    async with await replay(d, at=2000) as past:
        sessions = [u["current_session_start"] for u in past.top_chatters(None)]
    assert all(start is None or start <= 2000 for start in sessions), sessions
