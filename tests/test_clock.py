"""The store's clock: what it returns goes into events, so it is checked first.

A clock returning a float (``time.time`` where ``int(time.time())`` was
meant) or a negative number used to be recorded as it was; the float then
failed every replay of the log.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from eventstore import EventStore, ValidationError

WRITES: dict[str, Callable[[EventStore], Awaitable[Any]]] = {
    "save_user_stats": lambda s: s.save_user_stats("bob", chat_lines=1),
    "save_message": lambda s: s.save_message("bob", "hi"),
    "log_user_action": lambda s: s.log_user_action("bob", "join"),
    "log_user_count": lambda s: s.log_user_count(3, 4),
    "update_channel_stats": lambda s: s.update_channel_stats(max_users=99),
    "end_session": lambda s: s.end_session("alice"),
    "clear_old_messages": lambda s: s.clear_old_messages(keep_count=0),
}


class SwitchClock:
    """Returns 1000 until told to return something else."""

    def __init__(self) -> None:
        self.value: Any = 1000

    def __call__(self) -> Any:
        return self.value


@pytest.mark.parametrize("bad", [1_700_000_000.5, -1, 2**63, None, "1700000000", True])
@pytest.mark.parametrize("write", sorted(WRITES))
async def test_a_bad_clock_reading_is_refused_and_nothing_is_written(
    tmp_path: Path, write: str, bad: object
) -> None:
    clock = SwitchClock()
    async with EventStore(tmp_path, clock=clock) as store:
        await store.save_user_stats("alice", session_start=900)
        await store.save_message("alice", "first")
        before = [e async for e in store.read()]
        clock.value = bad
        with pytest.raises(ValidationError, match=r"clock returned .*int >= 0"):
            await WRITES[write](store)
        assert [e async for e in store.read()] == before
        clock.value = 1000
        await store.save_message("alice", "still writing")
    async with EventStore(tmp_path, read_only=True) as again:
        assert len([e async for e in again.read()]) == len(before) + 1


async def test_time_time_is_named_in_the_error(tmp_path: Path) -> None:
    async with EventStore(tmp_path, clock=time.time) as store:  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match=r"int\(time.time\(\)\), not time.time\(\)"):
            await store.save_message("a", "b")


def test_a_clock_that_is_not_callable_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="clock must be a callable"):
        EventStore(tmp_path, clock=1_700_000_000)  # type: ignore[arg-type]
