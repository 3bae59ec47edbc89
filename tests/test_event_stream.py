"""What each call of EventStore records: which events, with which resolved values.

The contract suite only looks at reads; these tests look at the log.  In this
design a row's id is the position of the event that created it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from eventstore import EventStore, ValidationError
from eventstore.events import (
    ChannelPeakRaised,
    ChannelStatsSet,
    MessageSaved,
    MessagesCleared,
    SessionEnded,
    UserActionLogged,
    UserCountLogged,
    UserForgotten,
    UserStatsSaved,
    UserStatsSet,
)
from eventstore.testing import FakeClock, Match, Scenario, assert_events, recorded_events

Action = Callable[[EventStore], Awaitable[Any]]


async def _state(store: EventStore) -> dict[str, Any]:
    return {
        "projections": store.projections.state(),
        "actions": await store.get_user_actions(limit=10**6),
        "messages": await store.get_recent_messages(limit=10**6),
        "users": await store.get_all_user_stats(),
        "channel": await store.get_channel_stats(),
        "counts": await store.get_user_count_history(),
        "position": store.position,
    }


# -- user statistics -----------------------------------------------------------------------
async def test_a_new_user_records_now_and_the_raw_arguments(
    memory_store: EventStore, fake_clock: FakeClock
) -> None:
    await memory_store.save_user_stats("alice")
    await memory_store.save_user_stats("bob", 100, 200, 3, 40, 150)
    await assert_events(
        memory_store,
        [
            (1, UserStatsSaved("alice", fake_clock.now, None, None, 0, 0, None)),
            (2, UserStatsSaved("bob", fake_clock.now, 100, 200, 3, 40, 150)),
        ],
    )


async def test_an_update_records_the_arguments_not_the_merged_result(
    memory_store: EventStore, fake_clock: FakeClock
) -> None:
    await memory_store.save_user_stats("alice", first_seen=1000, last_seen=2000)
    fake_clock.advance(30)
    scenario = Scenario(memory_store)
    # first_seen=5000 is later than stored and changes nothing; the chat line does.
    await scenario.when(lambda s: s.save_user_stats("alice", first_seen=5000, chat_lines=1))
    await scenario.then([UserStatsSaved("alice", fake_clock.now, 5000, None, 1, 0, None)])
    stats = await memory_store.get_user_stats("alice")
    assert stats is not None and stats["first_seen"] == 1000


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="nothing-given"),
        pytest.param({"first_seen": 1500}, id="later-first-seen"),
        pytest.param({"first_seen": 1000}, id="same-first-seen"),
        pytest.param({"last_seen": 1500}, id="earlier-last-seen"),
        pytest.param({"last_seen": 2000}, id="same-last-seen"),
        pytest.param({"chat_lines": 0, "time_connected": 0}, id="zero-increments"),
        pytest.param({"session_start": 1800}, id="same-session"),
    ],
)
async def test_a_save_that_changes_nothing_records_nothing(
    memory_store: EventStore, fake_clock: FakeClock, kwargs: dict[str, Any]
) -> None:
    await memory_store.save_user_stats(
        "alice", first_seen=1000, last_seen=2000, chat_lines=5, session_start=1800
    )
    before = await _state(memory_store)
    fake_clock.advance(100)
    scenario = Scenario(memory_store)
    await scenario.when(lambda s: s.save_user_stats("alice", **kwargs))
    await scenario.then([])
    assert await _state(memory_store) == before


async def test_end_session_records_the_seconds_added(
    memory_store: EventStore, fake_clock: FakeClock
) -> None:
    t = fake_clock.now
    await memory_store.save_user_stats("alice", first_seen=1, last_seen=1, session_start=t - 90)
    scenario = Scenario(memory_store)
    assert await scenario.when(lambda s: s.end_session("alice")) == 90
    await scenario.then([(2, SessionEnded("alice", t, 90))])
    await memory_store.save_user_stats("alice", session_start=500)
    assert await scenario.when(lambda s: s.end_session("alice", timestamp=400)) == 0
    await scenario.then([SessionEnded("alice", 400, 0)])


async def test_end_session_without_an_open_session_records_nothing(
    memory_store: EventStore,
) -> None:
    await memory_store.save_user_stats("alice")
    scenario = Scenario(memory_store)
    assert await scenario.when(lambda s: s.end_session("alice")) == 0
    assert await scenario.when(lambda s: s.end_session("nobody", timestamp=5)) == 0
    await scenario.then([])
    assert memory_store.position == 1


# -- channel peaks -------------------------------------------------------------------------
async def test_a_peak_event_names_only_the_raised_maxima(
    memory_store: EventStore, fake_clock: FakeClock
) -> None:
    scenario = Scenario(memory_store)
    await scenario.when(lambda s: s.update_channel_stats(max_users=10, max_connected=5))
    await scenario.then([ChannelPeakRaised(fake_clock.now, 10, 5)])
    await scenario.when(lambda s: s.update_channel_stats(12, 5, timestamp=0))
    await scenario.then([ChannelPeakRaised(0, 12, None)])
    await scenario.when(lambda s: s.update_channel_stats(max_users=3, max_connected=9))
    await scenario.then([ChannelPeakRaised(fake_clock.now, None, 9)])


async def test_a_peak_update_that_raises_nothing_records_nothing(
    memory_store: EventStore,
) -> None:
    await memory_store.update_channel_stats(10, 5, timestamp=100)
    scenario = Scenario(memory_store)
    for kwargs in [{}, {"max_users": 10}, {"max_users": 9, "max_connected": 5}]:
        await scenario.when(lambda s, kw=kwargs: s.update_channel_stats(**kw))
        await scenario.then([])
    assert memory_store.position == 1


# -- history rows: ids are positions -------------------------------------------------------
async def test_history_writes_record_one_event_each(
    memory_store: EventStore, fake_clock: FakeClock
) -> None:
    t = fake_clock.now
    await memory_store.log_user_action("alice", "join")
    await memory_store.log_user_action("bob", "pm", "!help", timestamp=7)
    await memory_store.log_user_count(3, 4)
    await memory_store.save_message("alice", "hi\x00there", timestamp=0)
    await assert_events(
        memory_store,
        [
            (1, UserActionLogged(t, "alice", "join", None)),
            (2, UserActionLogged(7, "bob", "pm", "!help")),
            (3, UserCountLogged(t, 3, 4)),
            (4, MessageSaved(0, "alice", "hi\x00there")),
        ],
    )


async def test_row_ids_are_the_positions_of_their_events(memory_store: EventStore) -> None:
    for i in range(4):
        await memory_store.save_user_stats("alice", chat_lines=1)
        await memory_store.log_user_action("alice", "join", f"a{i}", timestamp=50 - i)
        await memory_store.log_user_count(i, i, timestamp=i)
        await memory_store.save_message("alice", f"m{i}", timestamp=i % 2)
    events = dict(await recorded_events(memory_store))
    actions = await memory_store.get_user_actions()
    counts = await memory_store.get_user_count_history()
    messages = await memory_store.get_recent_messages()
    assert len(actions) == len(counts) == len(messages) == 4
    for row in actions:
        assert events[row["id"]] == UserActionLogged(
            row["timestamp"], row["username"], row["action_type"], row["details"]
        )
    for row in counts:
        assert events[row["id"]] == UserCountLogged(
            row["timestamp"], row["chat_users"], row["connected_users"]
        )
    for row in messages:
        assert events[row["id"]] == MessageSaved(row["timestamp"], row["username"], row["message"])


# -- clearing and forgetting ---------------------------------------------------------------
async def test_clear_records_keep_count_deleted_and_now(
    memory_store: EventStore, fake_clock: FakeClock
) -> None:
    for i in range(5):
        await memory_store.save_message("alice", f"m{i}")
    scenario = Scenario(memory_store)
    assert await scenario.when(lambda s: s.clear_old_messages(2)) == 3
    await scenario.then([(6, MessagesCleared(2, 3, fake_clock.now))])
    assert await scenario.when(lambda s: s.clear_old_messages(2)) == 0
    await scenario.then([])
    fake_clock.advance(9)
    assert await scenario.when(lambda s: s.clear_old_messages(0)) == 2
    await scenario.then([MessagesCleared(0, 2, fake_clock.now)])


async def test_forget_user_records_one_event_only_for_a_known_user(
    memory_store: EventStore, fake_clock: FakeClock
) -> None:
    await memory_store.save_message("alice", "hi")
    scenario = Scenario(memory_store)
    assert await scenario.when(lambda s: s.forget_user("nobody")) is False
    await scenario.then([])
    assert await scenario.when(lambda s: s.forget_user("alice")) is True
    await scenario.then([UserForgotten("alice", fake_clock.now)])
    assert await scenario.when(lambda s: s.forget_user("alice", timestamp=3)) is False
    await scenario.then([])


# -- bad input records nothing -------------------------------------------------------------
_BAD: list[Any] = [
    pytest.param(lambda s: s.save_user_stats("alice", chat_lines=2, time_connected=-1), id="stats"),
    pytest.param(lambda s: s.save_user_stats("", chat_lines=2), id="stats-empty-name"),
    pytest.param(lambda s: s.end_session("alice", timestamp=True), id="end-session-bool"),
    pytest.param(lambda s: s.log_user_action("alice", "join", "\ud800"), id="action-surrogate"),
    pytest.param(lambda s: s.log_user_action("alice", 7), id="action-type-int"),
    pytest.param(lambda s: s.update_channel_stats(99, 99, timestamp=-5), id="peak-timestamp"),
    pytest.param(lambda s: s.log_user_count(1, 1.0), id="count-float"),
    pytest.param(lambda s: s.save_message("alice", "x" * (1_048_576 + 1)), id="message-too-big"),
    pytest.param(lambda s: s.clear_old_messages(-1), id="clear-negative"),
    pytest.param(lambda s: s.forget_user("alice", timestamp="now"), id="forget-timestamp"),
    pytest.param(lambda s: s.append([MessageSaved(1, "a", "b"), "not an event"]), id="append"),
    # Events given whole are checked field by field: a Struct checks nothing
    # when it is made, and an int past 64 bits would be durable before its
    # fold failed, and fail every replay after.
    pytest.param(lambda s: s.append([MessageSaved(2**63, "a", "b")]), id="append-int-too-big"),
    pytest.param(lambda s: s.append([MessageSaved(-1, "a", "b")]), id="append-negative"),
    pytest.param(lambda s: s.append([MessageSaved(True, "a", "b")]), id="append-bool"),
    pytest.param(lambda s: s.append([MessageSaved(1, "a", 3)]), id="append-int-for-str"),  # type: ignore[arg-type]
    pytest.param(lambda s: s.append([MessageSaved(1, None, "b")]), id="append-none"),  # type: ignore[arg-type]
    pytest.param(lambda s: s.append([MessageSaved(1, "a", "\ud800")]), id="append-surrogate"),
    pytest.param(lambda s: s.append([MessageSaved(1, "", "b")]), id="append-empty-name"),
    pytest.param(lambda s: s.append([UserActionLogged(1, "a", "")]), id="append-empty-type"),
    pytest.param(
        lambda s: s.append([UserStatsSet("a", 1, 2, 3, 4, current_session_start="x")]),  # type: ignore[arg-type]
        id="append-optional-int",
    ),
]


@pytest.mark.parametrize("action", _BAD)
async def test_bad_input_records_nothing(
    memory_store: EventStore, fake_clock: FakeClock, action: Action
) -> None:
    await memory_store.save_user_stats("alice", session_start=fake_clock.now - 10)
    await memory_store.save_message("alice", "hi")
    before = await _state(memory_store)
    scenario = Scenario(memory_store)
    error = await scenario.when_raises(ValidationError, action)
    assert str(error)
    await scenario.then([])
    assert await _state(memory_store) == before


# -- replay --------------------------------------------------------------------------------
async def _write_a_bit_of_everything(store: EventStore, clock: FakeClock) -> None:
    await store.save_user_stats("alice", session_start=clock.now - 60)
    await store.save_user_stats("bob", chat_lines=2)
    clock.advance(5)
    await store.end_session("alice")
    await store.log_user_action("bob", "join")
    await store.update_channel_stats(4, 2)
    await store.log_user_count(4, 2)
    for i in range(4):
        clock.advance(1)
        await store.save_message("alice" if i % 2 else "bob", f"m{i}")
    await store.clear_old_messages(3)
    await store.forget_user("bob")
    await store.save_user_stats("carol")


async def test_replay_never_reads_the_clock(
    memory_store: EventStore, fake_clock: FakeClock
) -> None:
    await _write_a_bit_of_everything(memory_store, fake_clock)
    before = await _state(memory_store)
    events = await recorded_events(memory_store)
    await memory_store.close()
    fake_clock.set(5)
    calls = fake_clock.calls
    await memory_store.connect()
    assert fake_clock.calls == calls
    assert await _state(memory_store) == before
    assert await recorded_events(memory_store) == events


async def test_replay_works_with_a_clock_that_cannot_be_read(
    memory_store: EventStore, fake_clock: FakeClock
) -> None:
    await _write_a_bit_of_everything(memory_store, fake_clock)
    before = await _state(memory_store)

    def broken_clock() -> int:
        raise AssertionError("replay read the clock")

    await memory_store.close()
    memory_store.clock = broken_clock
    await memory_store.connect()
    assert await _state(memory_store) == before


async def test_a_fresh_store_on_the_same_log_rebuilds_the_same_state(
    memory_store: EventStore, fake_clock: FakeClock
) -> None:
    await _write_a_bit_of_everything(memory_store, fake_clock)
    before = await _state(memory_store)
    await memory_store.close()
    other = EventStore(memory_store.log, clock=FakeClock(0))
    async with other:
        assert await _state(other) == before


# -- given: history appended as facts ------------------------------------------------------
async def test_given_events_are_facts_the_reads_reflect(memory_store: EventStore) -> None:
    scenario = Scenario(memory_store)
    await scenario.given(
        [
            UserStatsSet("alice", 10, 20, 30, 40, 15),
            ChannelStatsSet(50, 1, 60, 2, 3),
            MessageSaved(5, "alice", "old"),
        ]
    )
    assert memory_store.position == 3
    assert await memory_store.get_user_stats("alice") == {
        "username": "alice",
        "first_seen": 10,
        "last_seen": 20,
        "total_chat_lines": 30,
        "total_time_connected": 40,
        "current_session_start": 15,
    }
    assert await memory_store.get_channel_stats() == {
        "max_users": 50,
        "max_users_timestamp": 1,
        "max_connected": 60,
        "max_connected_timestamp": 2,
        "last_updated": 3,
    }
    assert await scenario.when(lambda s: s.end_session("alice", timestamp=25)) == 10
    await scenario.then([(4, SessionEnded("alice", 25, 10))])
    await scenario.when(lambda s: s.save_message("alice", "new", timestamp=6))
    await scenario.then([(5, Match(MessageSaved, message="new"))])
    assert [m["id"] for m in await memory_store.get_recent_messages()] == [5, 3]


# -- concurrency ---------------------------------------------------------------------------
async def test_concurrent_writes_get_consecutive_positions(memory_store: EventStore) -> None:
    await asyncio.gather(*(memory_store.save_message(f"u{i}", f"m{i}") for i in range(30)))
    recorded = await recorded_events(memory_store)
    assert [pos for pos, _ in recorded] == list(range(1, 31))
    assert sorted(ev.message for _, ev in recorded if isinstance(ev, MessageSaved)) == sorted(
        f"m{i}" for i in range(30)
    )
