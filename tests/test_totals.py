"""Totals stay within the 64-bit integers the encoding, snapshots and exports hold.

Increments are each at most MAX_INT, so two of them could make a total that
was applied in memory but could not be written to a snapshot (msgpack) or a
SQLite export afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from eventstore import EventStore, ValidationError
from eventstore.events import SessionEnded, UserForgotten, UserStatsSaved, UserStatsSet
from eventstore.validation import MAX_INT


@pytest.fixture(params=["memory", "disk"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return ":memory:" if request.param == "memory" else str(tmp_path / "s")


async def test_an_increment_past_the_largest_total_is_refused(where: str) -> None:
    async with EventStore(where, clock=lambda: 100) as store:
        await store.append([UserStatsSet("ann", 1, 2, MAX_INT - 1, MAX_INT, 50)])
        await store.save_user_stats("ann", chat_lines=1)  # exactly MAX_INT: fine
        before = store.position
        with pytest.raises(ValidationError, match=r"chat_lines: 'ann' has .* would pass"):
            await store.save_user_stats("ann", chat_lines=1)
        with pytest.raises(ValidationError, match=r"time_connected: 'ann' has .* would pass"):
            await store.save_user_stats("ann", time_connected=1)
        with pytest.raises(ValidationError, match="time_connected"):
            await store.end_session("ann", timestamp=60)
        assert store.position == before
        stats = await store.get_user_stats("ann")
        assert stats is not None
        assert stats["total_chat_lines"] == MAX_INT
        assert stats["current_session_start"] == 50
        await store.save_user_stats("ann", last_seen=99)  # a change of no total still works
        assert store.position == before + 1
        if where != ":memory:":
            await store.write_snapshot()


async def test_an_end_session_adding_nothing_is_allowed(where: str) -> None:
    async with EventStore(where, clock=lambda: 100) as store:
        await store.append([UserStatsSet("ann", 1, 2, 0, MAX_INT, 50)])
        assert await store.end_session("ann", timestamp=50) == 0


async def test_append_refuses_events_that_add_past_the_largest_total(where: str) -> None:
    async with EventStore(where, clock=lambda: 100) as store:
        await store.append([UserStatsSaved("ann", 1, chat_lines=MAX_INT)])
        before = store.position
        with pytest.raises(ValidationError, match=r"chat_lines: 'ann' has"):
            await store.append([UserStatsSaved("ann", 2, chat_lines=1)])
        # Within one batch too, and for a session's seconds.
        with pytest.raises(ValidationError, match=r"time_connected: 'bo' has"):
            await store.append(
                [
                    UserStatsSaved("bo", 1, time_connected=MAX_INT - 5, session_start=1),
                    SessionEnded("bo", 10, 9),
                ]
            )
        assert store.position == before
        # A batch that resets the total first fits.
        await store.append(
            [
                UserStatsSet("ann", 1, 2, 0, 0),
                UserStatsSaved("ann", 3, chat_lines=7),
                UserForgotten("ann", 4),
                UserStatsSaved("ann", 5, chat_lines=MAX_INT),
            ]
        )
        stats = await store.get_user_stats("ann")
        assert stats is not None and stats["total_chat_lines"] == MAX_INT


async def test_a_total_already_past_the_limit_does_not_block_other_updates(where: str) -> None:
    async with EventStore(where, clock=lambda: 100) as store:
        # As a store written before the check could hold it.
        first = await store.append([UserStatsSet("ann", 1, 2, MAX_INT, MAX_INT, 50)])
        assert first == 1
        store.projections.user_stats.users["ann"][2] = MAX_INT + 10
        await store.save_user_stats("ann", last_seen=99)
        assert await store.end_session("ann", timestamp=50) == 0
        with pytest.raises(ValidationError, match="chat_lines"):
            await store.save_user_stats("ann", chat_lines=1)
        with pytest.raises(ValidationError, match="chat_lines"):
            await store.append([UserStatsSaved("ann", 3, chat_lines=1)])


async def test_a_session_end_the_fold_ignores_does_not_count(where: str) -> None:
    """No session open: the fold adds nothing, so neither does the check."""
    async with EventStore(where, clock=lambda: 100) as store:
        await store.append([UserStatsSet("ann", 1, 2, 0, MAX_INT - 5, None)])
        await store.append([SessionEnded("ann", 10, 9)])  # no session: ignored
        # Opened and ended in one batch: counted.
        opened = UserStatsSaved("ann", 11, session_start=11)
        with pytest.raises(ValidationError, match="time_connected"):
            await store.append([opened, SessionEnded("ann", 20, 9)])
        await store.append([opened, SessionEnded("ann", 12, 1)])
        stats = await store.get_user_stats("ann")
        assert stats is not None and stats["total_time_connected"] == MAX_INT - 4
