"""Compaction of the PostgreSQL log: same reads, same positions, refusal, concurrent writers.

Every test runs against a real server (pgserver.py): a fresh schema each
(about 1 ms), or a database of its own where other processes connect.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import pickle
import subprocess
import sys
import threading
import time
from array import array
from itertools import pairwise
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventstore import ConnectionError, EventStore, IntegrityError, QueryError
from eventstore import pgcompaction as pgc
from eventstore.events import (
    ChannelPeakRaised,
    MessageSaved,
    MessagesCleared,
    SessionEnded,
    UserCountLogged,
    UserCountsTrimmed,
    UserForgotten,
    UserStatsSaved,
    UserStatsSet,
)
from eventstore.pgcompaction import PostgresCompactReport, merge_ranges
from eventstore.pglog import PAGE_ROWS, PostgresLog
from eventstore.replay import replay
from eventstore.verify import verify_postgres
from projections import Projections

pytest_plugins = ["pgserver"]

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


async def rows(dsn: str) -> dict[int, tuple[int, bytes, str | None]]:
    """position -> (tag, payload, username) of every row."""
    conn = await asyncpg.connect(dsn)
    try:
        found = await conn.fetch("SELECT position, tag, payload, username FROM eventstore_events")
    finally:
        await conn.close()
    return {r[0]: (r[1], bytes(r[2]), r[3]) for r in found}


async def busy_history(store: EventStore, rounds: int = 3) -> None:
    t = 10_000
    for r in range(rounds):
        for i in range(30):
            user = f"user{(i * 7 + r) % 6}"
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
        await store.clear_old_messages(20)


# -- what compaction keeps --------------------------------------------------------------------


async def test_compaction_keeps_every_read_and_every_position(pg_schema: str) -> None:
    async with EventStore(pg_schema) as store:
        await busy_history(store)
        before = await reads(store)
        state = store.projections.state()
        old_rows = await rows(pg_schema)
        head = store.position
        report = await store.compact()
        assert isinstance(report, PostgresCompactReport)
        assert await reads(store) == before
        assert store.projections.state() == state
        # Appends go on from the same head: no position is handed out twice.
        await store.save_message("late", "after compaction", timestamp=99_999)
        assert (await store.get_recent_messages(limit=1))[0]["id"] == head + 1
    new_rows = await rows(pg_schema)
    assert report.through_position == head
    assert report.events_before == head
    assert report.events_dropped == head - (len(new_rows) - 1) > 0
    assert report.dropped_by_type["message_saved"] == 90 - 20
    assert report.dropped_by_type["user_stats_saved"] > 0
    assert report.users_folded == 6
    assert report.rows_rewritten > 0
    assert report.bytes_after < report.bytes_before
    # Kept rows are byte for byte what they were; rewritten ones are absolute stats.
    for position, (tag, payload, user) in new_rows.items():
        if position > head:
            continue
        _, old_payload, old_user = old_rows[position]
        assert user == old_user
        if payload != old_payload:
            assert tag in (2, 6)  # UserStatsSet, ChannelStatsSet
    async with EventStore(pg_schema) as again:  # a fresh replay of the compacted log
        got = await reads(again)
    assert got["messages"][0]["message"] == "after compaction"
    got["messages"] = got["messages"][1:]
    assert got == before
    report_ok = await verify_postgres(pg_schema)
    assert report_ok.ok, report_ok.problems
    assert report_ok.deleted == report.events_dropped


async def test_dry_run_changes_nothing_and_reports(pg_schema: str) -> None:
    async with EventStore(pg_schema) as store:
        await busy_history(store, 2)
        old_rows = await rows(pg_schema)
        dry = await store.compact(dry_run=True)
        assert dry.dry_run and dry.events_dropped > 0
        assert dry.bytes_after < dry.bytes_before
        assert await rows(pg_schema) == old_rows
        real = await store.compact()
    assert (real.events_dropped, real.dropped_by_type) == (dry.events_dropped, dry.dropped_by_type)
    assert real.bytes_after == dry.bytes_after


async def test_a_second_compaction_finds_nothing_and_merges_its_ranges(pg_schema: str) -> None:
    async with EventStore(pg_schema) as store:
        await busy_history(store, 2)
        await store.compact()
        again = await store.compact()
        assert again.events_dropped == 0 and again.rows_rewritten == 0
        await busy_history(store, 1)
        third = await store.compact()
        assert third.events_dropped > 0
    report = await verify_postgres(pg_schema)
    assert report.ok, report.problems
    assert report.compactions == 2  # the one with nothing to do wrote nothing


async def test_the_books_go_next_to_the_store_whatever_schema_the_path_names_first(
    pg_schema: str,
) -> None:
    # A process whose search_path names another schema before the store's
    # (a role's own schema: "$user" comes first by default) finds the store
    # all the same; the books its compaction creates must go there too, or
    # every process that does not see them takes the gaps for lost rows.
    from urllib.parse import parse_qsl, urlsplit

    from pgserver import with_params

    schema = dict(parse_qsl(urlsplit(pg_schema).query))["search_path"]
    first = f"{schema}_first"
    conn = await asyncpg.connect(pg_schema)
    try:
        await conn.execute(f"CREATE SCHEMA {first}")
        async with EventStore(pg_schema) as store:
            await busy_history(store, 1)
        async with EventStore(with_params(pg_schema, search_path=f"{first},{schema}")) as other:
            assert (await other.compact()).events_dropped > 0
        books = await conn.fetch(
            "SELECT schemaname FROM pg_tables WHERE tablename IN "
            "('eventstore_compactions', 'eventstore_deleted') "
            "AND schemaname IN ($1, $2)",
            schema,
            first,
        )
        assert [r[0] for r in books] == [schema, schema]
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {first} CASCADE")
        await conn.close()
    report = await verify_postgres(pg_schema)
    assert report.ok, report.problems
    assert report.compactions == 1


async def test_keep_history_trims_and_deletes_old_user_counts(pg_schema: str) -> None:
    now = 10 * 86_400
    async with EventStore(pg_schema, clock=lambda: now) as store:
        for day in range(10):
            await store.log_user_count(day, day, timestamp=day * 86_400 + 5)
        dry = await store.compact(dry_run=True, keep_history_days=3)
        assert dry.dropped_by_type == {"user_count_logged": 7}
        assert len(await store.get_user_count_history()) == 10
        report = await store.compact(keep_history_days=3)
        assert report.trimmed_before == 7 * 86_400
        assert report.dropped_by_type == {"user_count_logged": 7}
        assert [h["chat_users"] for h in await store.get_user_count_history()] == [7, 8, 9]
    assert sorted(await rows(pg_schema)) == [8, 9, 10, 11]  # three counts, the trim


async def test_forget_user_again_finishes_an_erasure_whose_compaction_never_ran(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Crash(BaseException):
        pass

    async def crash(self: EventStore, **kwargs: Any) -> Any:
        raise Crash

    async with EventStore(pg_schema) as store:
        await busy_history(store, 1)
        await store.save_message("alice", "alice-private-chat-line", timestamp=20_000)
        monkeypatch.setattr(EventStore, "compact", crash)
        with pytest.raises(Crash):
            await store.forget_user("alice")
        monkeypatch.undo()
    async with EventStore(pg_schema) as store:
        assert not store.knows_user("alice")
        assert await store.forget_user("alice")
        assert not await store.forget_user("alice")
    assert await _rows_of_alice(pg_schema) == 0


@pytest.mark.parametrize("name", ["eve", "e\x00ve"], ids=["name", "name holding NUL"])
async def test_forget_user_erases_cleared_chat_lines_no_read_returns(
    pg_schema: str, name: str
) -> None:
    async with EventStore(pg_schema) as store:
        await busy_history(store, 1)
        await store.save_message(name, "eve-private-555-0100", timestamp=20_000)
        await store.save_message("bob", "bob was here", timestamp=20_001)
        await store.clear_old_messages(1)
        assert not store.knows_user(name)
        assert await store.erasure_unfinished(name)
        assert not await store.erasure_unfinished("e\x00other")
        assert await store.forget_user(name)
        assert not await store.erasure_unfinished(name)
        assert not await store.forget_user(name)
        assert [m["message"] for m in await store.get_recent_messages()] == ["bob was here"]
    assert not [row for row in (await rows(pg_schema)).values() if b"eve-private" in row[1]]


async def test_forget_user_of_a_name_holding_nul(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Such a name has no username column, and cannot be a text parameter
    either: asking whether its erasure is unfinished must still work."""
    name = "nul\x00name"

    class Crash(BaseException):
        pass

    async def crash(self: EventStore, **kwargs: Any) -> Any:
        raise Crash

    async with EventStore(pg_schema) as store:
        assert not await store.forget_user(name)  # never written
        await store.save_message(name, "nul-private-chat-line", timestamp=20_000)
        await store.save_message("nul", "another user's line", timestamp=20_001)
        monkeypatch.setattr(EventStore, "compact", crash)
        with pytest.raises(Crash):
            await store.forget_user(name)
        monkeypatch.undo()
        assert not store.knows_user(name)
        assert await store.erasure_unfinished(name)
        assert not await store.erasure_unfinished("nul\x00other")
        assert await store.forget_user(name)  # finishes the erasure
        assert not await store.erasure_unfinished(name)
        assert not await store.forget_user(name)
        assert [m["username"] for m in await store.get_recent_messages()] == ["nul"]
    conn = await asyncpg.connect(pg_schema)
    try:
        assert not await conn.fetchval(
            "SELECT count(*) FROM eventstore_events "
            "WHERE position(convert_to('nul-private', 'UTF8') IN payload) > 0"
        )
    finally:
        await conn.close()


async def _rows_of_alice(pg_schema: str) -> int:
    """Rows that name alice, or hold her private chat line."""
    conn = await asyncpg.connect(pg_schema)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM eventstore_events WHERE username = 'alice' "
                "OR position(convert_to('alice-private', 'UTF8') IN payload) > 0"
            )
        )
    finally:
        await conn.close()


async def test_forget_user_finishes_a_forget_appended_while_a_compaction_ran(
    pg_schema: str,
) -> None:
    """A compaction records the head when it commits; a UserForgotten another
    process appended between its plan and its commit sits below that head,
    uncompacted.  Asking again must still find it."""
    from eventstore.events import UserForgotten
    from eventstore.pglog import BOOKKEEPING_DDL

    async with EventStore(pg_schema) as store:
        await store.save_message("alice", "alice-private-chat-line", timestamp=20_000)
        await store.append([UserForgotten("alice", 20_001)])  # its process died here
        head = store.position
    conn = await asyncpg.connect(pg_schema)
    try:
        # The books of a compaction that planned before that row and
        # committed after it.
        await conn.execute(BOOKKEEPING_DDL)
        await conn.execute(
            "INSERT INTO eventstore_compactions (id, through, deleted, rewritten) "
            "VALUES (1, $1, 0, 0)",
            head,
        )
        async with EventStore(pg_schema) as store:
            assert not store.knows_user("alice")
            assert await store.erasure_unfinished("alice")
            assert await store.forget_user("alice")
            assert not await store.erasure_unfinished("alice")
            assert not await store.forget_user("alice")
    finally:
        await conn.close()
    assert await _rows_of_alice(pg_schema) == 0


async def test_forget_user_leaves_no_row_with_the_name(pg_schema: str) -> None:
    name = "zebra_unicorn_42"
    async with EventStore(pg_schema) as store:
        await busy_history(store, 1)
        await store.save_user_stats(name, chat_lines=3, session_start=5)
        await store.save_message(name, "my secret words", timestamp=20_000)
        await store.log_user_action(name, "pm", details="!stats", timestamp=20_001)
        await store.end_session(name, timestamp=20_002)
        await store.save_message("other", "nothing about anyone", timestamp=20_003)
        before = await reads(store)
        assert await store.forget_user(name)
        assert await store.get_user_stats(name) is None
        assert not await store.forget_user(name)
        after = await reads(store)
    assert after["messages"] == [m for m in before["messages"] if m["username"] != name]
    conn = await asyncpg.connect(pg_schema)
    try:
        hits = await conn.fetchval(
            "SELECT count(*) FROM eventstore_events WHERE username = $1 "
            "OR position(convert_to($1, 'UTF8') IN payload) > 0",
            name,
        )
    finally:
        await conn.close()
    assert hits == 0
    assert (await verify_postgres(pg_schema)).ok


async def test_a_user_forgotten_then_back_keeps_only_the_new_rows(pg_schema: str) -> None:
    async with EventStore(pg_schema) as store:
        await store.save_message("ada", "old", timestamp=1)
        await store.save_user_stats("ada", chat_lines=1, last_seen=1)
        await store.forget_user("ada", timestamp=2)
        await store.save_user_stats("ada", chat_lines=1, last_seen=3)
        await store.save_message("ada", "new", timestamp=3)
        before = await reads(store)
        await store.compact()
        assert await reads(store) == before
    left = await rows(pg_schema)
    assert sorted(left) == [4, 5]  # the new stats (now absolute) and the new message
    assert left[4][0] == 2
    assert b"new" in left[5][1]


async def test_followers_keep_reading_across_a_compaction(pg_schema: str) -> None:
    """Another store that follows the log sees deleted rows vanish, and nothing else change."""
    async with EventStore(pg_schema) as store:
        await busy_history(store, 2)
        async with EventStore(pg_schema, read_only=True) as follower:
            assert await reads(follower) == await reads(store)
            position = follower.position
            await store.compact()
            await busy_history(store, 1)  # more history, and another clear
            await store.compact()
            await follower.refresh()
            assert follower.position > position  # only ever forward
            assert await reads(follower) == await reads(store)
            assert follower.projections.state() == store.projections.state()


async def test_a_follower_behind_a_compaction_reads_rows_it_had_not_seen_deleted(
    pg_schema: str,
) -> None:
    """A follower still naming rows a compaction deleted answers from the log, not QueryError.

    Two ways to get there: it has not read the clear yet (a busy process, or
    the export's store, which holds still); or it had read a user's rows but
    not the ``UserForgotten`` that the same compaction deleted, so that no
    amount of reading on brings the forget in.
    """
    async with EventStore(pg_schema) as bot:
        for i in range(6):
            await bot.save_message("alice", f"alice {i}", timestamp=100 + i)
            await bot.save_message("bob", f"bob {i}", timestamp=200 + i)
            await bot.log_user_action("alice", "pm", details="x" * 200, timestamp=100 + i)
        async with EventStore(pg_schema, read_only=True) as follower:
            assert follower._follower is not None
            follower._follower.cancel()  # busy: it reads nothing until asked
            await bot.clear_old_messages(keep_count=8)
            await bot.compact()
            assert [m["message"] for m in await follower.get_recent_messages(limit=3)] == [
                "bob 5",
                "bob 4",
                "bob 3",
            ]
            assert len(await follower.get_recent_messages()) == 8
            await bot.forget_user("alice")
            assert [m["username"] for m in await follower.get_recent_messages()] == ["bob"] * 6
            assert await follower.get_user_actions() == []
            assert await follower.get_user_actions(username="alice") == []
            assert not follower.knows_user("alice")
            assert follower.projections.state() == bot.projections.state()


async def test_concurrent_reads_that_miss_rows_rebuild_once(
    pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Several reads find the rows of a user forgotten behind them: one
    rebuild (a full replay, on PostgreSQL) serves them all."""
    async with EventStore(pg_schema) as bot:
        for i in range(6):
            await bot.save_message("alice", f"alice {i}", timestamp=100 + i)
            await bot.save_message("bob", f"bob {i}", timestamp=200 + i)
        async with EventStore(pg_schema, read_only=True) as follower:
            assert follower._follower is not None
            follower._follower.cancel()  # busy: it reads nothing until asked
            await bot.forget_user("alice")
            answers = await asyncio.gather(*(follower.get_recent_messages() for _ in range(4)))
            assert all([m["username"] for m in a] == ["bob"] * 6 for a in answers)
    assert caplog.text.count("were built again") == 1, caplog.text


async def test_a_replay_whose_rows_a_compaction_removed_says_so(pg_schema: str) -> None:
    """A replay fetches chat lines by position after it has folded the log;
    a compaction committed in between removed some: the error says why and
    what to do, not only "no event at position N"."""
    async with EventStore(pg_schema) as bot:
        for i in range(6):
            await bot.save_message("alice", f"alice {i}", timestamp=100 + i)
        async with await replay(pg_schema) as result:
            assert len(await result.recent_messages(limit=6)) == 6
            await bot.clear_old_messages(keep_count=2)
            await bot.compact()
            with pytest.raises(
                QueryError,
                match=r"position 4 \(and 3 more\): a compaction removed rows .* replay again",
            ):
                await result.recent_messages(limit=6)


async def test_a_replay_during_another_process_compaction_is_refused(
    pg_schema: str,
) -> None:
    """A forget_user committed between two pages of a replay deleted the
    user's rows and its UserForgotten: the replay would show a user the
    store had erased, so it says to replay again instead."""
    async with EventStore(pg_schema) as bot:
        await bot.save_user_stats("victim", chat_lines=42, last_seen=1)
        # Two pages of PAGE_ROWS.
        await bot.append([MessageSaved(2, "other", f"m{i}") for i in range(PAGE_ROWS)])

    def forget_elsewhere() -> None:
        async def forget() -> None:
            async with EventStore(pg_schema) as other:
                assert await other.forget_user("victim")

        thread = threading.Thread(target=asyncio.run, args=(forget(),))
        thread.start()
        thread.join()

    calls: list[int] = []

    def progress(done: int, total: int) -> None:
        if not calls:  # after the first page was folded
            forget_elsewhere()
        calls.append(done)

    with pytest.raises(QueryError, match=r"committed during the replay.*replay again"):
        await replay(pg_schema, progress=progress)
    assert len(calls) > 1  # it read on after the compaction, then refused
    async with await replay(pg_schema) as again:
        assert "victim" not in again.projections.user_stats.users


async def test_concurrent_compactions_take_turns(pg_schema: str) -> None:
    async with EventStore(pg_schema) as one, EventStore(pg_schema) as two:
        await busy_history(one, 2)
        await two.refresh()
        before = await reads(one)
        first, second = await asyncio.gather(one.compact(), two.compact())
        assert await reads(one) == before
        await two.refresh()
        assert await reads(two) == before
    # Between them every row went exactly once; whichever came second planned
    # again on the compacted log (or found nothing left).
    assert first.events_dropped + second.events_dropped == (
        first.events_dropped or second.events_dropped
    )
    report = await verify_postgres(pg_schema)
    assert report.ok, report.problems
    assert report.deleted == max(first.events_dropped, second.events_dropped)


# -- refusal ---------------------------------------------------------------------------------


async def test_refuses_when_the_new_log_would_read_differently(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with EventStore(pg_schema) as store:
        await busy_history(store, 2)
        old_rows = await rows(pg_schema)
        real = pgc._Planner.decide
        lost: dict[str, int] = {}

        def lossy(self: Any, position: int, event: Any) -> Any:
            keep = real(self, position, event)
            if keep is not None and isinstance(event, MessageSaved) and not lost:
                lost["position"] = position  # a bug that loses one visible message
                return None
            return keep

        monkeypatch.setattr(pgc._Planner, "decide", lossy)
        with pytest.raises(IntegrityError, match="compaction refused"):
            await store.compact()
        assert lost
        assert await rows(pg_schema) == old_rows
    conn = await asyncpg.connect(pg_schema)
    try:
        assert await conn.fetchval("SELECT to_regclass('eventstore_compactions')") is None
    finally:
        await conn.close()


async def test_the_proof_is_made_again_under_the_lock_over_rows_appended_meanwhile(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan that reads the same at its head but folds a later row differently is refused."""
    async with EventStore(pg_schema) as store:
        await busy_history(store, 1)
        other = EventStore(pg_schema)
        await other.connect()
        real_plan = pgc._plan

        async def plan_then_append(*args: Any) -> Any:
            plan = await real_plan(*args)
            # A planning bug invisible at the plan's head: two users' message
            # codes swapped in the new log's projections ...
            codes = plan.after.messages.users.codes
            codes["user0"], codes["user1"] = codes["user1"], codes["user0"]
            assert plan.after.state() == plan.before.state()
            # ... which a row appended before the lock is taken exposes.
            await other.append([UserForgotten("user0", 1)])
            return plan

        monkeypatch.setattr(pgc, "_plan", plan_then_append)
        old_rows = await rows(pg_schema)
        with pytest.raises(IntegrityError, match="compaction refused"):
            await store.compact()
        await other.close()
    new_rows = await rows(pg_schema)
    assert len(new_rows) == len(old_rows) + 1  # the UserForgotten, nothing deleted


def _another_bot(dsn: str, when: threading.Event, waited: list[float]) -> threading.Thread:
    """A bot in a thread of its own (its own loop and connection) that appends
    one chat line once ``when`` is set, and records how long that took."""

    def run() -> None:
        async def append() -> None:
            async with EventStore(dsn) as other:
                assert when.wait(10)
                start = time.monotonic()
                await other.save_message("bob", "still here", timestamp=1)
                waited.append(time.monotonic() - start)

        asyncio.run(append())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize(
    "where", ["before it took the append lock", "while it held the append lock"]
)
async def test_a_compaction_whose_process_stalls_does_not_stall_the_other_writers(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The compaction's transaction spans several round trips; a stalled client lets it go.

    A bot whose event loop is blocked (or whose host hangs, or whose network
    drops) between two of the compaction's statements held its locks for as
    long, and under the append lock every process's appends; the server now
    ends the session after LOCK_IDLE_TIMEOUT idle in it, which rolls the
    compaction back.
    """
    monkeypatch.setattr(pgc, "LOCK_IDLE_TIMEOUT", 0.3)
    stalled = threading.Event()
    waited: list[float] = []
    real_count = pgc.count_compactions
    real_same = Projections.same_state
    calls = 0

    def stall() -> None:
        stalled.set()
        time.sleep(3)  # the compacting process's loop is blocked

    async def stalled_count(fetchval: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # the second look at the epoch, under the compaction lock
            stall()
        return await real_count(fetchval)

    def stalled_same(self: Projections, other: Projections) -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:  # the proof under the append lock
            stall()
        return real_same(self, other)

    async with EventStore(pg_schema) as store:
        await busy_history(store, 1)
        before = await rows(pg_schema)
        if where == "before it took the append lock":
            monkeypatch.setattr(pgc, "count_compactions", stalled_count)
        else:
            monkeypatch.setattr(Projections, "same_state", stalled_same)
        thread = _another_bot(pg_schema, stalled, waited)
        with pytest.raises(ConnectionError) as raised:
            await store.compact()
        message = str(raised.value)
        assert where in message and "idle in its transaction for over 0.3 s" in message, message
        await asyncio.to_thread(thread.join, 20)
        assert waited and waited[0] < 2, waited
        monkeypatch.undo()
        after = await rows(pg_schema)
        assert len(after) == len(before) + 1  # bob's line; nothing deleted or rewritten
        assert {p: after[p] for p in before} == before
        assert (await store.compact()).events_dropped > 0  # the next one goes through


async def test_the_rows_are_deleted_before_the_append_lock(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compaction lock keeps other compactions out while the rows are
    deleted and the books written, and appends go on: at a million events
    those took 1.9 s, which every writer waited out under the append lock."""
    deleting = threading.Event()
    waited: list[float] = []
    statements: list[str] = []
    real = asyncpg.Connection.execute

    async def execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        words = query.split()
        statements.append(" ".join(words[:1] + words[2:3]))
        if query.startswith("LOCK TABLE eventstore_head"):
            # Everything before it is done, uncommitted; a bot appends now.
            deleting.set()
            await asyncio.sleep(1.5)
        return await real(self, query, *args, **kwargs)

    async with EventStore(pg_schema) as store:
        await busy_history(store, 1)
        before = await reads(store)
        thread = _another_bot(pg_schema, deleting, waited)
        monkeypatch.setattr(asyncpg.Connection, "execute", execute)
        report = await store.compact()
        monkeypatch.undo()
        await asyncio.to_thread(thread.join, 20)
        assert report.events_dropped > 0
        assert waited and waited[0] < 0.75, waited
        order = [q for q in statements if q.split()[0] in ("DELETE", "INSERT", "LOCK")]
        assert order.index("LOCK eventstore_head") > order.index("DELETE eventstore_events")
        assert order.index("LOCK eventstore_head") > order.index("INSERT eventstore_deleted")
        await store.refresh()
        after = await reads(store)
    assert len(after["messages"]) == len(before["messages"]) + 1  # bob's line
    assert {k: after[k] for k in before if k != "messages"} == {
        k: v for k, v in before.items() if k != "messages"
    }
    report_v = await verify_postgres(pg_schema)
    assert report_v.ok, report_v.problems


async def test_a_compaction_ended_while_it_waits_for_the_lock_says_what_happened(
    pg_schema: str,
) -> None:
    """Its session ended (by an operator, a server restart) before it had the
    append lock: the error is the server's reason, not "cannot call
    Transaction.__aexit__()" from the rollback after it, nor a claim that it
    held the lock and stalled."""
    async with EventStore(pg_schema) as store:
        for i in range(50):
            await store.save_user_stats("u", chat_lines=1, last_seen=i)
        blocker = await asyncpg.connect(pg_schema)  # an append that takes its time
        admin = await asyncpg.connect(pg_schema)
        try:
            await blocker.execute("BEGIN; UPDATE eventstore_head SET position = position")

            async def end_the_waiter() -> None:
                for _ in range(500):
                    ended = await admin.fetch(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE wait_event_type = 'Lock' AND query LIKE 'LOCK TABLE%'"
                    )
                    if ended:
                        return
                    await asyncio.sleep(0.02)
                raise AssertionError("the compaction never waited for the lock")

            ender = asyncio.create_task(end_the_waiter())
            with pytest.raises(ConnectionError) as raised:
                await store.compact()
            await ender
        finally:
            await blocker.close()
            await admin.close()
        message = str(raised.value)
        assert "terminating connection due to administrator command" in message, message
        assert "__aexit__" not in message and "held the append lock" not in message, message
        assert (await store.compact()).events_dropped > 0  # the next one goes through


def _record_plans(monkeypatch: pytest.MonkeyPatch, planned: list[int]) -> None:
    """Note the first position each plan of a compaction deletes, as it commits."""
    real = pgc._commit

    async def commit(conn: Any, log: Any, plan: Any, *args: Any) -> Any:
        planned.append(plan.delete[0])
        return await real(conn, log, plan, *args)

    monkeypatch.setattr(pgc, "_commit", commit)


@pytest.mark.parametrize("moment", ["before our DELETE", "before our append lock"])
async def test_an_older_version_s_compaction_committing_meanwhile_means_planning_again(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, moment: str
) -> None:
    """A compaction of a version without the compaction lock takes the append
    lock alone, so it can commit while this one deletes.  Before our DELETE,
    it deletes a row ours was to delete too: ours finds one row short.
    After it, it changes nothing ours touched.  Either way this one sees the
    epoch change under the append lock, rolls back and plans again."""
    async with EventStore(pg_schema) as store:
        await busy_history(store, 1)
        assert (await store.compact()).events_dropped > 0  # the books exist
        await busy_history(store, 1)
        before = await reads(store)
        real = asyncpg.Connection.execute
        other = await asyncpg.connect(pg_schema)
        planned: list[int] = []
        interleaved: list[int] = []
        hook = (
            "DELETE FROM eventstore_events"
            if moment == "before our DELETE"
            else "LOCK TABLE eventstore_head"
        )

        async def execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            if query.startswith(hook) and self is not other and not interleaved:
                # The old version's compaction commits now.
                async with other.transaction():
                    await other.execute("LOCK TABLE eventstore_head IN SHARE ROW EXCLUSIVE MODE")
                    if moment == "before our DELETE":
                        await other.execute(
                            "DELETE FROM eventstore_events WHERE position = $1", planned[0]
                        )
                    interleaved.append(
                        await other.fetchval(
                            "INSERT INTO eventstore_compactions (id, through, deleted, rewritten) "
                            "SELECT max(id) + 1, (SELECT position FROM eventstore_head), 0, 0 "
                            "FROM eventstore_compactions RETURNING id"
                        )
                    )
            return await real(self, query, *args, **kwargs)

        monkeypatch.setattr(asyncpg.Connection, "execute", execute)
        _record_plans(monkeypatch, planned)
        try:
            with caplog.at_level(logging.INFO, logger="eventstore"):
                report = await store.compact()
        finally:
            monkeypatch.undo()
            await other.close()
        assert interleaved == [2] and len(planned) == 2
        assert "another compaction committed or ran meanwhile; planning again" in caplog.text
        assert report.events_dropped > 0
        assert await reads(store) == before
    conn = await asyncpg.connect(pg_schema)
    try:
        ids = [r[0] for r in await conn.fetch("SELECT id FROM eventstore_compactions ORDER BY id")]
    finally:
        await conn.close()
    assert ids == [1, 2, 3]  # ours came after the other one, planned again
    if moment == "before our append lock":
        verified = await verify_postgres(pg_schema)
        assert verified.ok, verified.problems
    else:  # the old one's row is gone without a range in the books
        assert planned[0] not in await rows(pg_schema) and planned[1] != planned[0]


async def test_a_deadlock_with_an_older_version_s_compaction_means_planning_again(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An older version's compaction holds the append lock and waits for a row
    this one deleted, while this one waits for the append lock: the server
    rolls one back.  If it is this one, it plans again instead of failing."""
    async with EventStore(pg_schema) as store:
        await busy_history(store, 1)
        assert (await store.compact()).events_dropped > 0  # the books exist
        await busy_history(store, 1)
        before = await reads(store)
        real_execute = asyncpg.Connection.execute
        other = await asyncpg.connect(pg_schema)
        planned: list[int] = []
        locked = asyncio.Event()
        tasks: list[asyncio.Task[Any]] = []

        async def old_compaction(position: int) -> None:
            async with other.transaction():
                await real_execute(other, "LOCK TABLE eventstore_head IN SHARE ROW EXCLUSIVE MODE")
                locked.set()
                await asyncio.sleep(0.3)  # the new one is waiting for the append lock by now
                await real_execute(
                    other, "DELETE FROM eventstore_events WHERE position = $1", position
                )
                await real_execute(
                    other,
                    "INSERT INTO eventstore_compactions (id, through, deleted, rewritten) "
                    "SELECT max(id) + 1, (SELECT position FROM eventstore_head), 1, 0 "
                    "FROM eventstore_compactions",
                )

        async def execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            if query.startswith("LOCK TABLE eventstore_head") and self is not other and not tasks:
                tasks.append(asyncio.create_task(old_compaction(planned[0])))
                await locked.wait()
            return await real_execute(self, query, *args, **kwargs)

        monkeypatch.setattr(asyncpg.Connection, "execute", execute)
        _record_plans(monkeypatch, planned)
        try:
            with caplog.at_level(logging.INFO, logger="eventstore"):
                report = await store.compact()
            await tasks[0]  # the old one went through once this one rolled back
        finally:
            monkeypatch.undo()
            await other.close()
        assert "planning again" in caplog.text
        # A plan made before the old one's commit still has that row: its
        # DELETE then finds it gone, and that too means planning again.
        assert len(planned) >= 2 and planned[-1] != planned[0]  # the last plan lacks it
        assert report.events_dropped > 0
        assert await reads(store) == before
    assert planned[0] not in await rows(pg_schema)


async def test_the_books_are_merged_before_the_append_lock(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Merging the deleted ranges into the books grows with every range ever
    recorded (0.23 s at a year of the busy channel): done under the append
    lock, every bot's appends waited it out."""
    merging = threading.Event()
    waited: list[float] = []

    def slow_merge(*args: Any) -> Any:
        merging.set()
        time.sleep(1.5)  # a merge of many ranges, on this process's loop
        return merge_ranges(*args)

    async with EventStore(pg_schema) as store:
        await busy_history(store, 1)
        monkeypatch.setattr(pgc, "merge_ranges", slow_merge)
        thread = _another_bot(pg_schema, merging, waited)
        report = await store.compact()
        await asyncio.to_thread(thread.join, 20)
        assert report.events_dropped > 0
        assert waited and waited[0] < 0.75, waited


async def test_the_books_are_read_once_and_not_under_the_append_lock(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the lock the commit checks only the epoch: the books (a range per
    run of deleted positions, hundreds of thousands after a first compaction)
    were read with the plan, and reading them again kept every writer waiting."""
    real_books = pgc._books
    reads: list[int] = []

    async def books(conn: Any) -> Any:
        reads.append(1)
        return await real_books(conn)

    async with EventStore(pg_schema) as store:
        await busy_history(store, 1)
        monkeypatch.setattr(pgc, "_books", books)
        assert (await store.compact()).events_dropped > 0
        assert len(reads) == 1
        await busy_history(store, 1)
        assert (await store.compact()).events_dropped > 0
        assert len(reads) == 2


async def test_the_books_are_merged_off_the_event_loop(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge of the deleted ranges runs in a worker thread: on the event
    loop, the first compaction of a million events held it for up to 0.8 s."""
    threads: list[int] = []

    def merge(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return merge_ranges(*args)

    async with EventStore(pg_schema) as store:
        await busy_history(store, 1)
        monkeypatch.setattr(pgc, "merge_ranges", merge)
        assert (await store.compact()).events_dropped > 0
    assert threads and threading.get_ident() not in threads


async def test_the_books_read_for_a_plan_become_arrays_off_the_event_loop(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a first compaction the books hold a range per run of deleted
    positions (half a million after a million events): their rows become two
    arrays in a worker thread, not on the loop, so that no object per range
    is left for the garbage collector to walk until the commit."""
    threads: list[int] = []
    books: list[Any] = []
    real = pgc._as_columns

    def as_columns(rows: Any) -> Any:
        threads.append(threading.get_ident())
        books.append(real(rows))
        return books[-1]

    async with EventStore(pg_schema) as store:
        await busy_history(store, 1)
        assert (await store.compact()).events_dropped > 0
        monkeypatch.setattr(pgc, "_as_columns", as_columns)
        await busy_history(store, 1)
        assert (await store.compact()).events_dropped > 0
        conn = await asyncpg.connect(pg_schema)
        try:
            recorded = await conn.fetch(
                "SELECT first_position, last_position FROM eventstore_deleted "
                "ORDER BY first_position"
            )
        finally:
            await conn.close()
    assert threads and threading.get_ident() not in threads
    firsts, lasts = books[0]
    assert type(firsts) is array and type(lasts) is array and len(firsts) == len(lasts) > 0
    # The garbage collector finds no object inside an array (its type, at most).
    assert all(type(r) is type for r in gc.get_referents(firsts, lasts))
    # The books as the second compaction read them were the first one's; its
    # own ranges, merged in, are what the table holds now.
    _, made = merge_ranges([], sorted({p for a, b in recorded for p in range(a, b + 1)}))
    assert made == [(r[0], r[1]) for r in recorded]
    assert all(a <= b for a, b in zip(firsts, lasts, strict=True))
    assert (await verify_postgres(pg_schema)).ok


async def test_the_positions_are_written_into_the_sql_off_the_event_loop(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compaction's positions (up to a million in one statement) become SQL
    constants in a worker thread: passed as lists, asyncpg encoded them on the
    loop, with the append lock held.  No statement gets a list any more."""
    threads: list[int] = []
    sizes: list[int] = []
    real = pgc.bigint_array
    lists: list[int] = []

    def bigint_array(values: Any) -> str:
        threads.append(threading.get_ident())
        sizes.append(len(values))
        return real(values)

    for method in ("execute", "fetch", "fetchval"):
        original = getattr(asyncpg.Connection, method)

        def recorder(original: Any) -> Any:
            async def call(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
                lists.extend(len(a) for a in args if isinstance(a, list) and "DELETE" in query)
                lists.extend(len(a) for a in args if isinstance(a, list) and "sum(" in query)
                return await original(self, query, *args, **kwargs)

            return call

        monkeypatch.setattr(asyncpg.Connection, method, recorder(original))

    async with EventStore(pg_schema) as store:
        await busy_history(store, 1)
        monkeypatch.setattr(pgc, "bigint_array", bigint_array)
        report = await store.compact()
        await busy_history(store, 1)
        second = await store.compact()  # merges ranges into the books
    assert report.events_dropped > 0 and second.events_dropped > 0
    # Each: _measure's positions, then the commit's (the deleted ones, the books' change).
    assert len(threads) == 10 and threading.get_ident() not in threads
    assert sizes[1] == report.events_dropped and sizes[6] == second.events_dropped
    assert sizes[7] > 0  # the second compaction merged ranges away
    assert lists == []  # no DELETE and no sum was given a list to encode
    assert (await verify_postgres(pg_schema)).ok


# -- the books -------------------------------------------------------------------------------


def _parse_array(sql: str) -> list[int]:
    assert sql.startswith("'{") and sql.endswith("}'::bigint[]"), sql
    text = sql[2 : -len("}'::bigint[]")]
    return [int(item) for item in text.split(",")] if text else []


@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=50), st.integers(1, 7))
def test_bigint_array_writes_every_value_once_in_order(values: list[int], step: int) -> None:
    real = pgc._JOIN_SLICE
    pgc._JOIN_SLICE = step  # slices of every size, and a list over many of them
    try:
        sql = pgc.bigint_array(values)
    finally:
        pgc._JOIN_SLICE = real
    assert _parse_array(sql) == values
    assert " " not in sql and "{," not in sql and ",}" not in sql and ",," not in sql


def test_bigint_array_writes_nothing_but_integers_into_the_sql() -> None:
    class Sneaky(int):
        def __str__(self) -> str:
            return "1}'::bigint[]); DROP TABLE eventstore_events; --"

        __repr__ = __str__

    assert pgc.bigint_array([Sneaky(1), True, 2]) == "'{1,1,2}'::bigint[]"
    with pytest.raises(TypeError):
        pgc.bigint_array(["1); DROP TABLE eventstore_events; --"])  # type: ignore[list-item]


async def test_postgresql_reads_a_bigint_array_back_as_written(pg_schema: str) -> None:
    values = [-(2**63), -1, 0, 1, 2**63 - 1, *range(5, 5 + 2 * pgc._JOIN_SLICE + 3)]
    conn = await asyncpg.connect(pg_schema)
    try:
        for given_values in ([], [7], values):
            got = await conn.fetchval(f"SELECT {pgc.bigint_array(given_values)}")
            assert list(got) == given_values
    finally:
        await conn.close()


def test_merge_ranges() -> None:
    assert merge_ranges([], []) == ([], [])
    assert merge_ranges([], [1, 2, 3, 7]) == ([], [(1, 3), (7, 7)])
    assert merge_ranges([(1, 3)], [5]) == ([], [(5, 5)])
    assert merge_ranges([(1, 3)], [4]) == ([1], [(1, 4)])
    assert merge_ranges([(1, 3), (5, 6)], [4]) == ([1, 5], [(1, 6)])
    assert merge_ranges([(2, 3), (9, 9)], [1, 10, 11]) == ([2, 9], [(1, 3), (9, 11)])


@given(
    old=st.sets(st.integers(1, 60)),
    new=st.sets(st.integers(1, 60)),
)
def test_merged_ranges_cover_exactly_the_union(old: set[int], new: set[int]) -> None:
    def ranges(positions: set[int]) -> list[tuple[int, int]]:
        _, made = merge_ranges([], sorted(positions))
        return made

    before = ranges(old)
    remove, insert = merge_ranges(before, sorted(new - old))
    after = sorted([r for r in before if r[0] not in remove] + insert)
    covered = [p for a, b in after for p in range(a, b + 1)]
    assert covered == sorted(old | new)  # every position once, nothing else
    assert all(b + 1 < c for (_, b), (c, _) in pairwise(after))  # never adjacent


# -- random histories --------------------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("chat"), st.integers(0, 4), st.integers(0, 50)),
        st.tuples(st.just("join"), st.integers(0, 4), st.integers(0, 50)),
        st.tuples(st.just("leave"), st.integers(0, 4), st.integers(0, 50)),
        st.tuples(st.just("count"), st.integers(0, 9), st.integers(0, 50)),
        st.tuples(st.just("peak"), st.integers(0, 30), st.integers(0, 50)),
        st.tuples(st.just("clear"), st.integers(0, 10), st.integers(0, 0)),
        st.tuples(st.just("forget"), st.integers(0, 4), st.integers(0, 50)),
        st.tuples(st.just("trim"), st.integers(0, 50), st.integers(0, 0)),
        st.tuples(st.just("compact"), st.integers(0, 0), st.integers(0, 0)),
    ),
    min_size=1,
    max_size=50,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
async def test_random_histories_compact_to_the_same_reads(pg_schema: str, ops: Any) -> None:
    # One schema for every example: each example starts by emptying it.
    conn = await asyncpg.connect(pg_schema)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS eventstore_events, eventstore_head, eventstore_schema, "
            "eventstore_compactions, eventstore_deleted"
        )
    finally:
        await conn.close()
    clock = {"now": 1}
    async with EventStore(pg_schema, clock=lambda: clock["now"]) as store:
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
            elif op == "trim":
                clock["now"] = a + 86_400
                await store.compact(keep_history_days=1)
            else:
                before = await reads(store)
                await store.compact()
                assert await reads(store) == before
        before = await reads(store)
        state = store.projections.state()
        positions = {p: v for p, v in (await rows(pg_schema)).items()}
        await store.compact()
        assert await reads(store) == before
        assert store.projections.state() == state
        after = await rows(pg_schema)
        assert set(after) <= set(positions)  # nothing moved, nothing new
        for position, (tag, payload, user) in after.items():
            assert user == positions[position][2]
            if payload != positions[position][1]:
                assert tag in (2, 6)
    async with EventStore(pg_schema) as fresh:
        assert await reads(fresh) == before
    report = await verify_postgres(pg_schema)
    assert report.ok, report.problems


# -- followers caught in the middle ---------------------------------------------------------------

FOLLOWER_EVENTS = st.lists(
    st.one_of(
        st.builds(MessageSaved, st.integers(0, 30), st.sampled_from(["a", "b", "c"]), st.just("x")),
        st.builds(MessagesCleared, st.integers(0, 6), st.just(0), st.just(1)),
        st.builds(
            UserStatsSaved,
            st.sampled_from(["a", "b", "c"]),
            st.just(1),
            st.none(),
            st.none() | st.integers(0, 50),
            st.integers(0, 3),
            st.integers(0, 3),
            st.none() | st.integers(0, 50),
        ),
        st.builds(SessionEnded, st.sampled_from(["a", "b"]), st.integers(0, 50), st.integers(0, 9)),
        st.builds(UserCountLogged, st.integers(0, 30), st.just(1), st.just(2)),
        st.builds(UserCountsTrimmed, st.integers(0, 30), st.just(1)),
        st.builds(ChannelPeakRaised, st.integers(0, 30), st.none() | st.integers(0, 9)),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(events=FOLLOWER_EVENTS)
async def test_a_follower_caught_mid_log_ends_in_the_same_state(events: list[Any]) -> None:
    """Without forgotten users, old rows up to any cut then the compacted rest read the same.

    That is what a follower in another process folds when a compaction
    commits while it is part-way through the log (see "Followers" in
    pgcompaction.py): deleted rows past its position never come up, and
    rewritten ones come up absolute.
    """
    store = EventStore(":memory:")
    await store.connect()
    await store.append(events)

    class Pages:
        """The memory log's events as PostgresLog.read_pages gives them."""

        async def read_pages(self, first: int, last: int) -> Any:
            async for start, run in store.log.read_runs(first, last):
                yield list(range(start, start + len(run))), list(run)

    plan = await pgc._plan(Pages(), store.position, 0, None, lambda n: None)  # type: ignore[arg-type]
    final = plan.before.state()
    assert plan.after.state() == final
    deleted = set(plan.delete)
    for cut in range(len(events) + 1):
        mixed = Projections()
        mixed.apply_all((p, e) for p, e in enumerate(events, 1) if p <= cut)
        mixed.apply_all(
            (p, plan.rewrite.get(p, e))
            for p, e in enumerate(events, 1)
            if p > cut and p not in deleted
        )
        assert mixed.state() == final, cut
    await store.close()


# -- a writer in another process ---------------------------------------------------------------


def _writer(dsn: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "pg_writer.py"), dsn, "0", "3", str(count), "4"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=HERE.parent,
    )


async def test_a_writer_appending_during_compaction_loses_nothing(pg_database: str) -> None:
    async with EventStore(pg_database) as store:
        await busy_history(store, 2)
        proc = _writer(pg_database, 60)
        lines: list[str] = []
        assert proc.stdout is not None and proc.stdin is not None
        ready = proc.stdout.readline().strip()
        assert ready == "ready", proc.stderr.read() if proc.stderr else ""

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.strip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        compactions = 0
        now = 1_000_000
        while "done" not in lines and proc.poll() is None:
            # Material for every round: old user counts trimmed away, stats folded.
            await store.log_user_count(1, 2, timestamp=compactions)
            store.clock = lambda: now
            report = await store.compact(keep_history_days=1)
            compactions += report.events_dropped > 0
            await asyncio.sleep(0.01)
        assert "done" in lines, (lines[-5:], proc.stderr.read() if proc.stderr else "")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert await asyncio.to_thread(proc.wait, 60) == 0
        reader.join(10)
        await store.compact()
        state = store.projections.state()
    assert compactions >= 2
    acks = [line.split()[1:] for line in lines if line.startswith("ack")]
    assert len(acks) == 3 * 60
    left = await rows(pg_database)
    async with EventStore(pg_database) as fresh:
        assert fresh.projections.state() == state
        for _writer_id, task, n, first, size in acks:
            first_i, size_i = int(first), int(size)
            events = await fresh.log.fetch(range(first_i, first_i + size_i))
            assert [e.message for e in events] == [  # type: ignore[union-attr]
                f"w0-t{task}-{n}-{i}/{size_i}" for i in range(size_i)
            ]
            assert all(p in left for p in range(first_i, first_i + size_i))
    # The writer followed the compactions as they happened and ended in the same state.
    [line] = [line for line in lines if line.startswith("state")]
    _, _position, data = line.split()
    assert pickle.loads(base64.b64decode(data)) == state
    report = await verify_postgres(pg_database)
    assert report.ok, report.problems
    assert any(isinstance(e, UserStatsSet) for e in await _all_events(pg_database))


async def _all_events(dsn: str) -> list[Any]:
    log = PostgresLog(dsn, read_only=True)
    await log.open()
    try:
        return [event async for _, event in log.read()]
    finally:
        await log.close()


@pytest.mark.parametrize("form", ["sqlite", "jsonl"])
async def test_an_export_across_another_process_s_compaction_fails(
    pg_schema: str, tmp_path: Path, form: str
) -> None:
    """The export reads the log pinned at its head, but a compaction deletes
    rows under it (and folds statistics into rows past the head): what it
    read is no one state of the store, so it must not pass for a backup."""
    import io

    from cli.output import open_reader
    from eventstore.legacy import export_jsonl, export_sqlite

    async with EventStore(pg_schema) as writer:
        for i in range(50):
            await writer.save_user_stats(f"user{i % 5}", chat_lines=1, last_seen=1000 + i)
            await writer.save_message(f"user{i % 5}", f"msg{i}", timestamp=1000 + i)
        reader = open_reader(pg_schema)
        await reader.connect()
        try:
            assert len(await reader.get_recent_messages(limit=1000)) == 50
            await writer.clear_old_messages(keep_count=10)
            await writer.compact()
            out = tmp_path / "backup.db"
            with pytest.raises(QueryError, match="a compaction in another process committed"):
                if form == "sqlite":
                    await export_sqlite(reader, out)
                else:
                    await export_jsonl(reader, io.BytesIO())
            assert not out.exists() and list(tmp_path.iterdir()) == []
        finally:
            await reader.close()
        # With no compaction meanwhile, the same export goes through.
        reader = open_reader(pg_schema)
        await reader.connect()
        try:
            if form == "sqlite":
                counts = await export_sqlite(reader, tmp_path / "again.db")
                assert counts["recent_chat"] == 10
            else:
                assert await export_jsonl(reader, io.BytesIO()) == len(await rows(pg_schema))
        finally:
            await reader.close()


async def test_a_forget_whose_compaction_fails_says_the_user_is_forgotten(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The UserForgotten has committed: the compaction's own error ("nothing
    was changed") would read as a forget that did not happen."""

    async def fails(self: EventStore, **kwargs: Any) -> Any:
        raise QueryError("connection lost; nothing was changed")

    async with EventStore(pg_schema) as store:
        await store.save_message("finn", "finn-private-line", timestamp=20_000)
        monkeypatch.setattr(EventStore, "compact", fails)
        with pytest.raises(QueryError) as failed:
            await store.forget_user("finn")
        monkeypatch.undo()
        assert str(failed.value).startswith(
            "'finn' is forgotten in every read, but erasing them from the rows may be "
            "unfinished: connection lost; nothing was changed; call forget_user('finn') again"
        )
        assert not store.knows_user("finn")
        assert await store.erasure_unfinished("finn")
        assert await store.forget_user("finn")
        assert not await store.erasure_unfinished("finn")
