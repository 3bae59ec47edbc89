"""The storage contract as one test suite, written once and run against every backend.

Every rule stated in :mod:`eventstore.adapter` has a test here.  A backend runs
the whole suite by subclassing :class:`StorageContract` and giving it one
factory::

    class TestMemoryStore(StorageContract):
        def make_store(self, clock: FakeClock, tmp_path: Path) -> StorageAdapter:
            return EventStore(":memory:", clock=clock)

The class name does not start with ``Test``, so pytest collects only the
subclasses.  The suite connects the adapter itself, closes it afterwards, and
reconnects it with ``close()`` then ``connect()`` on the same object (see
:meth:`StorageContract.reopen`).  Tests of the extensions ``end_session`` and
``forget_user`` skip, with a reason, on an adapter that lacks them.

Nothing here knows which backend runs: no test looks at files, events or
positions, only at what the adapter's methods return.  Tests on the event
stream itself live beside the backend that has one.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest
import pytest_asyncio

from ..adapter import StorageAdapter
from ..errors import ConnectionError, ValidationError
from .clock import DEFAULT_START, FakeClock

__all__ = ["MIB", "StorageContract", "read_state"]

#: The size limit of messages and details, in UTF-8 bytes (inclusive).
MIB = 1_048_576
#: A limit that means "every row" for methods whose limit must be an int.
ALL = 1_000_000
#: The largest total_chat_lines or total_time_connected (inclusive): a signed
#: 64-bit int, what the stores, their snapshots and exports can hold.
MAX_TOTAL = 2**63 - 1

DEFAULT_CHANNEL: dict[str, Any] = {
    "max_users": 0,
    "max_users_timestamp": None,
    "max_connected": 0,
    "max_connected_timestamp": None,
    "last_updated": None,
}

AsyncMethod = Callable[..., Awaitable[Any]]


async def read_state(store: StorageAdapter) -> dict[str, Any]:
    """Everything the contract's reads return, in one comparable value."""
    return {
        "users": await store.get_all_user_stats(),
        "actions": await store.get_user_actions(limit=ALL),
        "channel": await store.get_channel_stats(),
        "counts": await store.get_user_count_history(),
        "messages": await store.get_recent_messages(limit=ALL),
    }


async def _seed(store: StorageAdapter, clock: FakeClock) -> None:
    """A little of everything, so that "nothing changed" means something.

    alice has an open session; there are two of each kind of row and peaks.
    """
    t = clock.now
    await store.save_user_stats(
        "alice",
        first_seen=t - 1000,
        last_seen=t - 10,
        chat_lines=5,
        time_connected=60,
        session_start=t - 100,
    )
    await store.save_user_stats("bob")
    await store.log_user_action("alice", "join", "from web")
    await store.log_user_action("bob", "pm", None, timestamp=t - 5)
    await store.update_channel_stats(max_users=10, max_connected=7)
    await store.log_user_count(4, 9)
    await store.log_user_count(5, 8, timestamp=t - 20)
    await store.save_message("alice", "hello")
    await store.save_message("bob", "hi\nthere", timestamp=t - 30)


def _method(store: StorageAdapter, name: str) -> AsyncMethod:
    """The adapter's method ``name``; skips the test for a missing extension."""
    method = getattr(store, name, None)
    if method is None:
        pytest.skip(f"{type(store).__name__} has no {name}(): an optional extension")
    return cast(AsyncMethod, method)


def _without_ids(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "id"} for row in rows]


def _labels(rows: list[dict[str, Any]], key: str) -> list[Any]:
    return [row[key] for row in rows]


# -- argument tables -------------------------------------------------------------------
# Each data method with one valid call.  The lifecycle tests call them on a
# closed adapter; the validation tests swap one argument for a bad value.  On
# a seeded store every valid write here would change something, so a bad
# variant that leaves the store unchanged really was rejected whole.

_VALID: dict[str, dict[str, Any]] = {
    "save_user_stats": {"username": "alice", "chat_lines": 1, "time_connected": 1},
    "get_user_stats": {"username": "alice"},
    "get_all_user_stats": {"limit": 10, "offset": 0},
    "end_session": {"username": "alice", "timestamp": None},
    "log_user_action": {
        "username": "alice",
        "action_type": "join",
        "details": "x",
        "timestamp": None,
    },
    "get_user_actions": {"username": "alice", "action_type": "join", "limit": 10, "offset": 0},
    "update_channel_stats": {"max_users": 10**6, "max_connected": 10**6, "timestamp": None},
    "get_channel_stats": {},
    "log_user_count": {"chat_users": 1, "connected_users": 1, "timestamp": None},
    "get_user_count_history": {"start_time": 0, "end_time": None, "limit": None},
    "save_message": {"username": "alice", "message": "x", "timestamp": None},
    "get_recent_messages": {"limit": 10, "offset": 0},
    "clear_old_messages": {"keep_count": 0},
    "forget_user": {"username": "alice", "timestamp": None},
}

_WRITES = (
    "save_user_stats",
    "end_session",
    "log_user_action",
    "update_channel_stats",
    "log_user_count",
    "save_message",
    "clear_old_messages",
    "forget_user",
)

# Integer arguments; those in _OPTIONAL accept None.
_INT_ARGS: dict[str, tuple[str, ...]] = {
    "save_user_stats": (
        "first_seen",
        "last_seen",
        "chat_lines",
        "time_connected",
        "session_start",
    ),
    "end_session": ("timestamp",),
    "get_all_user_stats": ("limit", "offset"),
    "log_user_action": ("timestamp",),
    "get_user_actions": ("limit", "offset"),
    "update_channel_stats": ("max_users", "max_connected", "timestamp"),
    "log_user_count": ("chat_users", "connected_users", "timestamp"),
    "get_user_count_history": ("start_time", "end_time", "limit"),
    "save_message": ("timestamp",),
    "get_recent_messages": ("limit", "offset"),
    "clear_old_messages": ("keep_count",),
    "forget_user": ("timestamp",),
}
_OPTIONAL = {
    "first_seen",
    "last_seen",
    "chat_lines",
    "time_connected",
    "session_start",
    "timestamp",
    "max_users",
    "max_connected",
    "start_time",
    "end_time",
    ("get_all_user_stats", "limit"),
    ("get_user_count_history", "limit"),
}
_BAD_INTS: tuple[tuple[str, Any], ...] = (
    ("negative", -1),
    ("float", 1.5),
    ("whole-float", 2.0),
    ("True", True),
    ("False", False),
    ("str", "7"),
)

# Name arguments (non-empty str); None is only a bad value where required.
_NAME_ARGS: dict[str, tuple[str, ...]] = {
    "save_user_stats": ("username",),
    "get_user_stats": ("username",),
    "end_session": ("username",),
    "log_user_action": ("username", "action_type"),
    "get_user_actions": ("username", "action_type"),
    "save_message": ("username",),
    "forget_user": ("username",),
}
_BAD_NAMES: tuple[tuple[str, Any], ...] = (
    ("empty", ""),
    ("int", 1),
    ("bytes", b"alice"),
    ("lone-high-surrogate", "\ud800"),
    ("lone-low-surrogate-inside", "al\udfffice"),
)

# Free text: any str of at most 1 MiB of UTF-8, empty included.
_TEXT_ARGS: dict[str, tuple[str, ...]] = {
    "log_user_action": ("details",),
    "save_message": ("message",),
}
_BAD_TEXTS: tuple[tuple[str, Any], ...] = (
    ("int", 1),
    ("bytes", b"hi"),
    ("lone-surrogate", "\ud800"),
    ("surrogate-after-text", "hello \udc00"),
    ("ascii-1MiB+1", "x" * (MIB + 1)),
    # 2-byte characters: fewer than 1 Mi code points, yet over 1 MiB of UTF-8.
    ("utf8-1MiB+1", "é" * (MIB // 2) + "x"),
)


def _bad_calls() -> list[Any]:
    params = []

    def add(method: str, arg: str, label: str, value: Any) -> None:
        kwargs = {**_VALID[method], arg: value}
        params.append(pytest.param(method, kwargs, id=f"{method}-{arg}-{label}"))

    for method, args in _INT_ARGS.items():
        for arg in args:
            for label, value in _BAD_INTS:
                add(method, arg, label, value)
            if arg not in _OPTIONAL and (method, arg) not in _OPTIONAL:
                add(method, arg, "None", None)
    for method, args in _NAME_ARGS.items():
        for arg in args:
            for label, value in _BAD_NAMES:
                add(method, arg, label, value)
            if method != "get_user_actions":
                add(method, arg, "None", None)
    for method, args in _TEXT_ARGS.items():
        for arg in args:
            for label, value in _BAD_TEXTS:
                add(method, arg, label, value)
    add("save_message", "message", "None", None)
    return params


_DATA_METHODS = [pytest.param(name, id=name) for name in _VALID]

# Strs that are not bad input and must come back exactly as given.
_EXACT_TEXTS = [
    pytest.param("", id="empty"),
    pytest.param("\x00", id="nul"),
    pytest.param("a\x00b", id="nul-inside"),
    pytest.param("line one\nline two\r\n", id="newlines"),
    pytest.param("  padded\t", id="whitespace"),
    pytest.param("😀👍🏽🇫🇷", id="emoji"),
    pytest.param("e\u0301 é", id="unnormalised"),
    pytest.param("\u202eright-to-left\u200b", id="format-chars"),
    pytest.param("'; DROP TABLE messages; --", id="sql"),
    pytest.param("\\x00 %s {0} \\u0000", id="escapes"),
    pytest.param("\U0010ffff", id="last-code-point"),
]

# Exactly 1 MiB of UTF-8, built from 1-, 2-, 3- and 4-byte characters.
_ONE_MIB_TEXTS = [
    pytest.param(("x", MIB), id="ascii"),
    pytest.param(("é", MIB // 2), id="2-byte"),
    pytest.param(("€", (MIB - 1) // 3, "x"), id="3-byte"),
    pytest.param(("😀", MIB // 4), id="4-byte"),
]


def _one_mib(spec: tuple[Any, ...]) -> str:
    text = spec[0] * spec[1] + (spec[2] if len(spec) > 2 else "")
    assert len(text.encode("utf-8")) == MIB
    return str(text)


class StorageContract:
    """Every rule of :class:`~eventstore.adapter.StorageAdapter`, as tests.

    Subclass it as ``Test...`` and implement :meth:`make_store`.  Override
    :meth:`reopen` only if the backend cannot reconnect the same object.
    """

    # Explicit, so the suite also runs under pytest-asyncio's strict mode.
    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.asyncio]

    # -- what a backend provides -------------------------------------------------------
    def make_store(self, clock: FakeClock, tmp_path: Path) -> StorageAdapter:
        """Return a new, unconnected adapter that reads ``clock`` for "now".

        Files, if any, go under ``tmp_path``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement make_store()")

    async def reopen(self, store: StorageAdapter) -> StorageAdapter:
        """Close ``store`` and connect it again, returning the adapter to use."""
        await store.close()
        await store.connect()
        return store

    # -- fixtures ----------------------------------------------------------------------
    @pytest.fixture
    def clock(self) -> FakeClock:
        """The adapter's clock, at a fixed start."""
        return FakeClock(DEFAULT_START)

    @pytest_asyncio.fixture
    async def unconnected_store(
        self, clock: FakeClock, tmp_path: Path
    ) -> AsyncIterator[StorageAdapter]:
        store = self.make_store(clock, tmp_path)
        try:
            yield store
        finally:
            await store.close()

    @pytest_asyncio.fixture
    async def store(self, unconnected_store: StorageAdapter) -> AsyncIterator[StorageAdapter]:
        """A connected, empty adapter; closed after the test."""
        await unconnected_store.connect()
        yield unconnected_store

    # -- lifecycle ---------------------------------------------------------------------
    @pytest.mark.parametrize("method", _DATA_METHODS)
    async def test_data_method_before_connect_raises_connection_error(
        self, unconnected_store: StorageAdapter, method: str
    ) -> None:
        call = _method(unconnected_store, method)
        assert not unconnected_store.is_connected
        with pytest.raises(ConnectionError):
            await call(**_VALID[method])

    @pytest.mark.parametrize("method", _DATA_METHODS)
    async def test_data_method_after_close_raises_connection_error(
        self, store: StorageAdapter, clock: FakeClock, method: str
    ) -> None:
        call = _method(store, method)
        await _seed(store, clock)
        await store.close()
        assert not store.is_connected
        with pytest.raises(ConnectionError):
            await call(**_VALID[method])

    async def test_connect_sets_is_connected_and_close_clears_it(
        self, unconnected_store: StorageAdapter
    ) -> None:
        assert not unconnected_store.is_connected
        await unconnected_store.connect()
        assert unconnected_store.is_connected
        await unconnected_store.close()
        assert not unconnected_store.is_connected

    async def test_close_twice_is_harmless(self, store: StorageAdapter) -> None:
        await store.save_message("alice", "hi")
        await store.close()
        await store.close()
        assert not store.is_connected
        await store.connect()
        assert _labels(await store.get_recent_messages(), "message") == ["hi"]

    async def test_close_before_connect_is_harmless(
        self, unconnected_store: StorageAdapter
    ) -> None:
        await unconnected_store.close()
        assert not unconnected_store.is_connected
        await unconnected_store.connect()
        assert unconnected_store.is_connected
        assert await unconnected_store.get_channel_stats() == DEFAULT_CHANNEL

    async def test_connect_twice_is_harmless(self, store: StorageAdapter) -> None:
        await store.save_message("alice", "hi")
        await store.connect()
        assert store.is_connected
        await store.save_message("bob", "yo")
        assert _labels(await store.get_recent_messages(), "message") == ["yo", "hi"]

    async def test_connect_after_close_works(self, store: StorageAdapter) -> None:
        await store.save_message("alice", "before")
        await store.close()
        await store.connect()
        assert store.is_connected
        await store.save_message("alice", "after")
        assert _labels(await store.get_recent_messages(), "message") == ["after", "before"]

    async def test_async_with_connects_then_closes(self, unconnected_store: StorageAdapter) -> None:
        async with unconnected_store as entered:
            assert entered is unconnected_store
            assert entered.is_connected
            await entered.save_message("alice", "inside")
        assert not unconnected_store.is_connected
        with pytest.raises(ConnectionError):
            await unconnected_store.get_recent_messages()
        await unconnected_store.connect()
        assert _labels(await unconnected_store.get_recent_messages(), "message") == ["inside"]

    async def test_async_with_closes_when_the_body_raises(
        self, unconnected_store: StorageAdapter
    ) -> None:
        with pytest.raises(RuntimeError, match="boom"):
            async with unconnected_store:
                await unconnected_store.save_message("alice", "kept")
                raise RuntimeError("boom")
        assert not unconnected_store.is_connected
        await unconnected_store.connect()
        assert _labels(await unconnected_store.get_recent_messages(), "message") == ["kept"]

    # -- time: None is now, once, at accept time; 0 is a time --------------------------
    async def test_none_timestamp_is_the_clock_when_the_write_is_accepted(
        self, store: StorageAdapter, clock: FakeClock
    ) -> None:
        t = clock.now
        await store.save_user_stats("bob")
        await store.log_user_action("alice", "join")
        await store.update_channel_stats(max_users=5, max_connected=3)
        await store.log_user_count(3, 2)
        await store.save_message("alice", "hi")
        # Reads come later: they report when each write was accepted.
        clock.advance(500)
        for _ in range(2):
            bob = await store.get_user_stats("bob")
            assert bob is not None
            assert (bob["first_seen"], bob["last_seen"]) == (t, t)
            assert _labels(await store.get_user_actions(), "timestamp") == [t]
            assert await store.get_channel_stats() == {
                "max_users": 5,
                "max_users_timestamp": t,
                "max_connected": 3,
                "max_connected_timestamp": t,
                "last_updated": t,
            }
            assert _labels(await store.get_user_count_history(), "timestamp") == [t]
            assert _labels(await store.get_recent_messages(), "timestamp") == [t]
            # Replay must restore the recorded time, not read the clock again.
            clock.advance(500)
            store = await self.reopen(store)

    async def test_now_is_read_once_per_write(
        self, store: StorageAdapter, clock: FakeClock
    ) -> None:
        # A clock that moves on every read: a write that read it twice would
        # record two different "nows".
        clock.tick = 7
        await store.save_user_stats("alice")
        await store.update_channel_stats(max_users=5, max_connected=5)
        alice = await store.get_user_stats("alice")
        assert alice is not None
        assert alice["first_seen"] == alice["last_seen"]
        channel = await store.get_channel_stats()
        assert (
            channel["max_users_timestamp"]
            == channel["max_connected_timestamp"]
            == channel["last_updated"]
        )

    async def test_end_session_without_timestamp_ends_now(
        self, store: StorageAdapter, clock: FakeClock
    ) -> None:
        end_session = _method(store, "end_session")
        t = clock.now
        await store.save_user_stats("alice", first_seen=t - 500, last_seen=t - 400)
        await store.save_user_stats("alice", session_start=t - 300)
        clock.advance(20)
        assert await end_session("alice") == 320
        clock.advance(1000)
        alice = await store.get_user_stats("alice")
        assert alice is not None
        assert alice["last_seen"] == t + 20
        assert alice["total_time_connected"] == 320

    async def test_zero_is_a_timestamp_not_now(self, store: StorageAdapter) -> None:
        await store.save_user_stats("bob", first_seen=0, last_seen=0, session_start=0)
        await store.log_user_action("alice", "join", timestamp=0)
        await store.update_channel_stats(max_users=1, max_connected=1, timestamp=0)
        await store.log_user_count(1, 1, timestamp=0)
        await store.save_message("alice", "hi", timestamp=0)
        for _ in range(2):
            assert await store.get_user_stats("bob") == {
                "username": "bob",
                "first_seen": 0,
                "last_seen": 0,
                "total_chat_lines": 0,
                "total_time_connected": 0,
                "current_session_start": 0,
            }
            assert _labels(await store.get_user_actions(), "timestamp") == [0]
            assert await store.get_channel_stats() == {
                "max_users": 1,
                "max_users_timestamp": 0,
                "max_connected": 1,
                "max_connected_timestamp": 0,
                "last_updated": 0,
            }
            rows = await store.get_user_count_history(start_time=0, end_time=0)
            assert _labels(rows, "timestamp") == [0]
            assert _labels(await store.get_recent_messages(), "timestamp") == [0]
            store = await self.reopen(store)

    async def test_end_session_at_zero(self, store: StorageAdapter) -> None:
        end_session = _method(store, "end_session")
        await store.save_user_stats("bob", first_seen=0, last_seen=0, session_start=0)
        # Ending "now" would add years; ending at 0 adds nothing.
        assert await end_session("bob", timestamp=0) == 0
        assert await store.get_user_stats("bob") == {
            "username": "bob",
            "first_seen": 0,
            "last_seen": 0,
            "total_chat_lines": 0,
            "total_time_connected": 0,
            "current_session_start": None,
        }

    # -- user statistics ---------------------------------------------------------------
    async def test_new_user_gets_the_defaults(
        self, store: StorageAdapter, clock: FakeClock
    ) -> None:
        await store.save_user_stats("alice")
        assert await store.get_user_stats("alice") == {
            "username": "alice",
            "first_seen": clock.now,
            "last_seen": clock.now,
            "total_chat_lines": 0,
            "total_time_connected": 0,
            "current_session_start": None,
        }

    async def test_new_user_takes_the_given_values(self, store: StorageAdapter) -> None:
        await store.save_user_stats(
            "alice",
            first_seen=100,
            last_seen=200,
            chat_lines=3,
            time_connected=40,
            session_start=150,
        )
        assert await store.get_user_stats("alice") == {
            "username": "alice",
            "first_seen": 100,
            "last_seen": 200,
            "total_chat_lines": 3,
            "total_time_connected": 40,
            "current_session_start": 150,
        }

    async def test_new_user_defaults_each_missing_field_on_its_own(
        self, store: StorageAdapter, clock: FakeClock
    ) -> None:
        now = clock.now
        await store.save_user_stats("alice", last_seen=50)
        await store.save_user_stats("bob", first_seen=50)
        await store.save_user_stats("carol", chat_lines=2)
        await store.save_user_stats("dave", session_start=now - 5)
        stats = {row["username"]: row for row in await store.get_all_user_stats()}
        assert (stats["alice"]["first_seen"], stats["alice"]["last_seen"]) == (now, 50)
        assert (stats["bob"]["first_seen"], stats["bob"]["last_seen"]) == (50, now)
        assert (stats["carol"]["first_seen"], stats["carol"]["last_seen"]) == (now, now)
        assert stats["carol"]["total_chat_lines"] == 2
        assert stats["dave"]["current_session_start"] == now - 5
        assert stats["dave"]["total_time_connected"] == 0

    async def test_get_user_stats_of_an_unknown_user_is_none(self, store: StorageAdapter) -> None:
        assert await store.get_user_stats("nobody") is None
        await store.save_user_stats("alice")
        assert await store.get_user_stats("nobody") is None
        assert await store.get_user_stats("Alice") is None

    async def test_none_leaves_an_existing_user_unchanged(
        self, store: StorageAdapter, clock: FakeClock
    ) -> None:
        await store.save_user_stats(
            "alice",
            first_seen=100,
            last_seen=200,
            chat_lines=3,
            time_connected=40,
            session_start=150,
        )
        before = await store.get_user_stats("alice")
        clock.advance(1000)
        # In particular last_seen does not become "now".
        await store.save_user_stats("alice")
        await store.save_user_stats("alice", None, None, None, None, None)
        assert await store.get_user_stats("alice") == before

    async def test_first_seen_keeps_the_earlier(self, store: StorageAdapter) -> None:
        await store.save_user_stats("alice", first_seen=1000, last_seen=5000)
        for given, expected in [(2000, 1000), (1000, 1000), (500, 500), (700, 500), (0, 0)]:
            await store.save_user_stats("alice", first_seen=given)
            alice = await store.get_user_stats("alice")
            assert alice is not None
            assert (alice["first_seen"], alice["last_seen"]) == (expected, 5000), given

    async def test_last_seen_keeps_the_later(self, store: StorageAdapter) -> None:
        await store.save_user_stats("alice", first_seen=10, last_seen=1000)
        for given, expected in [(500, 1000), (1000, 1000), (2000, 2000), (0, 2000)]:
            await store.save_user_stats("alice", last_seen=given)
            alice = await store.get_user_stats("alice")
            assert alice is not None
            assert (alice["first_seen"], alice["last_seen"]) == (10, expected), given

    async def test_chat_lines_and_time_connected_are_increments(
        self, store: StorageAdapter
    ) -> None:
        await store.save_user_stats("alice", chat_lines=3, time_connected=10)
        steps = [
            ({"chat_lines": 4}, (7, 10)),
            ({"time_connected": 5}, (7, 15)),
            ({"chat_lines": 0, "time_connected": 0}, (7, 15)),
            ({"chat_lines": 1, "time_connected": 1}, (8, 16)),
        ]
        for kwargs, (lines, seconds) in steps:
            await store.save_user_stats("alice", **kwargs)
            alice = await store.get_user_stats("alice")
            assert alice is not None
            assert (alice["total_chat_lines"], alice["total_time_connected"]) == (lines, seconds)

    async def test_session_start_sets_the_open_session(self, store: StorageAdapter) -> None:
        await store.save_user_stats("alice", first_seen=1, last_seen=1)
        for given, expected in [(None, None), (100, 100), (None, 100), (50, 50), (0, 0)]:
            await store.save_user_stats("alice", session_start=given)
            alice = await store.get_user_stats("alice")
            assert alice is not None
            assert alice["current_session_start"] == expected, given

    async def test_users_are_told_apart_by_their_exact_name(self, store: StorageAdapter) -> None:
        names = ["alice", "Alice", "alice ", "al\x00ice", "😀", "line\nbreak"]
        for i, name in enumerate(names):
            await store.save_user_stats(name, first_seen=1, last_seen=1, chat_lines=i + 1)
        for i, name in enumerate(names):
            row = await store.get_user_stats(name)
            assert row is not None
            assert (row["username"], row["total_chat_lines"]) == (name, i + 1)
        assert sorted(_labels(await store.get_all_user_stats(), "username")) == sorted(names)

    # -- end_session (extension) -------------------------------------------------------
    async def test_end_session_adds_the_session_and_closes_it(self, store: StorageAdapter) -> None:
        end_session = _method(store, "end_session")
        await store.save_user_stats(
            "alice", first_seen=100, last_seen=1000, time_connected=30, session_start=1000
        )
        assert await end_session("alice", timestamp=1600) == 600
        assert await store.get_user_stats("alice") == {
            "username": "alice",
            "first_seen": 100,
            "last_seen": 1600,
            "total_chat_lines": 0,
            "total_time_connected": 630,
            "current_session_start": None,
        }

    async def test_end_session_keeps_a_later_last_seen(self, store: StorageAdapter) -> None:
        end_session = _method(store, "end_session")
        await store.save_user_stats("alice", first_seen=1, last_seen=5000, session_start=1000)
        assert await end_session("alice", timestamp=2000) == 1000
        alice = await store.get_user_stats("alice")
        assert alice is not None
        assert (alice["last_seen"], alice["total_time_connected"]) == (5000, 1000)

    async def test_end_session_before_its_start_adds_nothing_but_closes_it(
        self, store: StorageAdapter
    ) -> None:
        end_session = _method(store, "end_session")
        await store.save_user_stats(
            "alice", first_seen=500, last_seen=2000, time_connected=7, session_start=1000
        )
        assert await end_session("alice", timestamp=900) == 0
        assert await store.get_user_stats("alice") == {
            "username": "alice",
            "first_seen": 500,
            "last_seen": 2000,
            "total_chat_lines": 0,
            "total_time_connected": 7,
            "current_session_start": None,
        }

    async def test_end_session_without_an_open_session_changes_nothing(
        self, store: StorageAdapter, clock: FakeClock
    ) -> None:
        end_session = _method(store, "end_session")
        await _seed(store, clock)
        await store.save_user_stats("carol", first_seen=1, last_seen=2)
        before = await read_state(store)
        clock.advance(100)
        assert await end_session("carol") == 0
        assert await end_session("carol", timestamp=clock.now + 50) == 0
        assert await end_session("nobody") == 0
        assert await store.get_user_stats("nobody") is None
        assert await read_state(store) == before

    async def test_end_session_twice_adds_once(self, store: StorageAdapter) -> None:
        end_session = _method(store, "end_session")
        await store.save_user_stats("alice", first_seen=1, last_seen=1, session_start=100)
        assert await end_session("alice", timestamp=160) == 60
        assert await end_session("alice", timestamp=500) == 0
        alice = await store.get_user_stats("alice")
        assert alice is not None
        assert (alice["total_time_connected"], alice["last_seen"]) == (60, 160)
        # A new session counts again.
        await store.save_user_stats("alice", session_start=600)
        assert await end_session("alice", timestamp=610) == 10
        alice = await store.get_user_stats("alice")
        assert alice is not None
        assert alice["total_time_connected"] == 70

    # -- totals stay within 64 bits ----------------------------------------------------
    @pytest.mark.parametrize(
        ("field", "other"),
        [("chat_lines", "time_connected"), ("time_connected", "chat_lines")],
    )
    async def test_an_increment_past_the_largest_total_is_refused_whole(
        self, store: StorageAdapter, clock: FakeClock, field: str, other: str
    ) -> None:
        await _seed(store, clock)
        await store.save_user_stats("carol", first_seen=1, last_seen=2, **{field: MAX_TOTAL - 1})
        await store.save_user_stats("carol", **{field: 1})  # exactly the largest: kept
        before = await read_state(store)
        refused = [
            {field: 1},
            {field: MAX_TOTAL},
            # The whole call is refused, not just the total that would pass.
            {field: 1, other: 1, "last_seen": clock.now + 50, "session_start": clock.now},
        ]
        for kwargs in refused:
            with pytest.raises(ValidationError, match=field) as info:
                await store.save_user_stats("carol", **kwargs)
            # The field that would pass, not the one that fits.
            assert other not in str(info.value), kwargs
        assert await read_state(store) == before
        store = await self.reopen(store)
        assert await read_state(store) == before
        # Only a positive increment is checked: other changes of the user still work.
        await store.save_user_stats("carol", last_seen=clock.now, **{field: 0, other: 1})
        carol = await store.get_user_stats("carol")
        assert carol is not None
        assert (carol[f"total_{field}"], carol[f"total_{other}"]) == (MAX_TOTAL, 1)
        assert carol["last_seen"] == clock.now

    async def test_an_end_session_past_the_largest_total_is_refused(
        self, store: StorageAdapter, clock: FakeClock
    ) -> None:
        end_session = _method(store, "end_session")
        await _seed(store, clock)
        await store.save_user_stats(
            "carol", first_seen=1, last_seen=100, time_connected=MAX_TOTAL - 5, session_start=100
        )
        before = await read_state(store)
        # Would add 6 seconds, raise last_seen and close the session: none of it happens.
        with pytest.raises(ValidationError, match="time_connected"):
            await end_session("carol", timestamp=106)
        assert await read_state(store) == before
        store = await self.reopen(store)
        assert await read_state(store) == before
        carol = await store.get_user_stats("carol")
        assert carol is not None and carol["current_session_start"] == 100
        # The session is still open and can end within the limit.
        end_session = _method(store, "end_session")
        assert await end_session("carol", timestamp=105) == 5
        carol = await store.get_user_stats("carol")
        assert carol is not None
        assert (carol["total_time_connected"], carol["current_session_start"]) == (MAX_TOTAL, None)
        # At the limit, a session that adds nothing still ends.
        await store.save_user_stats("carol", session_start=200)
        assert await end_session("carol", timestamp=150) == 0
        carol = await store.get_user_stats("carol")
        assert carol is not None
        assert (carol["total_time_connected"], carol["current_session_start"]) == (MAX_TOTAL, None)

    async def test_totals_that_land_exactly_on_the_largest_are_kept(
        self, store: StorageAdapter
    ) -> None:
        end_session = getattr(store, "end_session", None)
        await store.save_user_stats("carol", first_seen=1, last_seen=1, chat_lines=MAX_TOTAL)
        await store.save_user_stats("dave", first_seen=1, last_seen=1, chat_lines=MAX_TOTAL - 2)
        await store.save_user_stats("dave", chat_lines=2, time_connected=MAX_TOTAL - 3)
        if end_session is None:
            await store.save_user_stats("dave", time_connected=3)
        else:
            await store.save_user_stats("dave", session_start=10)
            assert await end_session("dave", timestamp=13) == 3
        for _ in range(2):
            carol = await store.get_user_stats("carol")
            dave = await store.get_user_stats("dave")
            assert carol is not None and dave is not None
            totals = [
                carol["total_chat_lines"],
                dave["total_chat_lines"],
                dave["total_time_connected"],
            ]
            # An int, exactly: not a float that rounds to 2**63.
            assert all(type(t) is int for t in totals), totals
            assert totals == [MAX_TOTAL] * 3
            store = await self.reopen(store)

    # -- get_all_user_stats ------------------------------------------------------------
    async def test_all_user_stats_by_last_seen_desc_then_username(
        self, store: StorageAdapter
    ) -> None:
        for name, last in [
            ("dave", 100),
            ("bob", 300),
            ("carol", 300),
            ("alice", 100),
            ("erin", 200),
            ("ann", 300),
        ]:
            await store.save_user_stats(name, first_seen=1, last_seen=last)
        rows = await store.get_all_user_stats()
        assert _labels(rows, "username") == ["ann", "bob", "carol", "erin", "alice", "dave"]
        for row in rows:
            assert await store.get_user_stats(row["username"]) == row

    async def test_all_user_stats_follow_later_changes(self, store: StorageAdapter) -> None:
        for name in ["alice", "bob", "carol"]:
            await store.save_user_stats(name, first_seen=1, last_seen=100)
        assert _labels(await store.get_all_user_stats(), "username") == ["alice", "bob", "carol"]
        await store.save_user_stats("carol", last_seen=200)
        assert _labels(await store.get_all_user_stats(), "username") == ["carol", "alice", "bob"]
        if hasattr(store, "end_session"):
            await store.save_user_stats("bob", session_start=250)
            await _method(store, "end_session")("bob", timestamp=300)
            names = _labels(await store.get_all_user_stats(), "username")
            assert names == ["bob", "carol", "alice"]

    async def test_all_user_stats_pages(self, store: StorageAdapter) -> None:
        assert await store.get_all_user_stats() == []
        for i in range(10):
            await store.save_user_stats(f"user{i}", first_seen=1, last_seen=100 * (i % 4))
        full = await store.get_all_user_stats()
        assert len(full) == 10
        assert await store.get_all_user_stats(limit=None) == full
        assert await store.get_all_user_stats(limit=None, offset=3) == full[3:]
        for size in range(1, 12):
            pages = [
                await store.get_all_user_stats(limit=size, offset=start)
                for start in range(0, 10, size)
            ]
            assert all(len(page) <= size for page in pages)
            assert [row for page in pages for row in page] == full, size
        assert await store.get_all_user_stats(limit=0) == []
        assert await store.get_all_user_stats(limit=5, offset=10) == []
        assert await store.get_all_user_stats(offset=50) == []

    # -- user actions ------------------------------------------------------------------
    async def test_action_rows(self, store: StorageAdapter, clock: FakeClock) -> None:
        await store.log_user_action("alice", "join")
        await store.log_user_action("bob", "pm", "!help", timestamp=5)
        rows = await store.get_user_actions()
        assert _without_ids(rows) == [
            {"timestamp": clock.now, "username": "alice", "action_type": "join", "details": None},
            {"timestamp": 5, "username": "bob", "action_type": "pm", "details": "!help"},
        ]
        assert all(
            set(row) == {"id", "timestamp", "username", "action_type", "details"} for row in rows
        )
        assert rows[0]["id"] < rows[1]["id"]

    async def test_actions_newest_first_ties_by_id_desc(self, store: StorageAdapter) -> None:
        for label, ts in [("a1", 100), ("a2", 300), ("a3", 200), ("a4", 300), ("a5", 100)]:
            await store.log_user_action("alice", "join", label, timestamp=ts)
        rows = await store.get_user_actions()
        assert _labels(rows, "details") == ["a4", "a2", "a3", "a5", "a1"]

    async def test_action_filters_match_exactly(self, store: StorageAdapter) -> None:
        actions = [
            ("alice", "join"),
            ("bob", "join"),
            ("alice", "pm"),
            ("Alice", "join"),
            ("alice", "join "),
            ("carol", "leave"),
            ("alice", "join"),
        ]
        for i, (user, kind) in enumerate(actions):
            await store.log_user_action(user, kind, f"#{i}", timestamp=1000 + i % 3)
        full = await store.get_user_actions()
        assert len(full) == len(actions)

        def only(user: str | None, kind: str | None) -> list[dict[str, Any]]:
            return [
                r
                for r in full
                if (user is None or r["username"] == user)
                and (kind is None or r["action_type"] == kind)
            ]

        for who in [None, "alice", "Alice", "bob", "nobody"]:
            for what in [None, "join", "join ", "pm", "leave", "nothing"]:
                got = await store.get_user_actions(username=who, action_type=what)
                assert got == only(who, what), (who, what)
        assert len(only("alice", "join")) == 2
        assert await store.get_user_actions(username="nobody") == []
        assert await store.get_user_actions(action_type="nothing") == []

    async def test_action_pages(self, store: StorageAdapter) -> None:
        for i in range(12):
            await store.log_user_action(
                "alice" if i % 3 else "bob", "join", f"#{i}", timestamp=i // 2
            )
        full = await store.get_user_actions()
        assert len(full) == 12
        assert await store.get_user_actions(limit=ALL) == full
        for user in [None, "alice"]:
            everything = await store.get_user_actions(username=user)
            for size in [1, 5, 12]:
                pages = [
                    await store.get_user_actions(username=user, limit=size, offset=start)
                    for start in range(0, len(everything), size)
                ]
                assert [row for page in pages for row in page] == everything, (user, size)
        assert await store.get_user_actions(limit=0) == []
        assert await store.get_user_actions(offset=12) == []
        assert await store.get_user_actions(username="alice", offset=100) == []

    async def test_action_limit_defaults_to_100(self, store: StorageAdapter) -> None:
        await asyncio.gather(
            *(store.log_user_action("alice", "join", timestamp=i) for i in range(101))
        )
        rows = await store.get_user_actions()
        assert len(rows) == 100
        assert rows[-1]["timestamp"] == 1

    # -- channel peaks -----------------------------------------------------------------
    async def test_channel_stats_default(self, store: StorageAdapter) -> None:
        assert await store.get_channel_stats() == DEFAULT_CHANNEL

    async def test_channel_peaks_rise_only_when_strictly_greater(
        self, store: StorageAdapter
    ) -> None:
        steps: list[tuple[dict[str, Any], tuple[Any, ...]]] = [
            ({"max_users": 10, "max_connected": 5, "timestamp": 100}, (10, 100, 5, 100, 100)),
            # Equal is not greater: nothing changes, last_updated included.
            ({"max_users": 10, "max_connected": 5, "timestamp": 200}, (10, 100, 5, 100, 100)),
            ({"max_users": 11, "timestamp": 300}, (11, 300, 5, 100, 300)),
            ({"max_users": 3, "max_connected": 6, "timestamp": 400}, (11, 300, 6, 400, 400)),
            ({"max_users": 9, "max_connected": 2, "timestamp": 450}, (11, 300, 6, 400, 400)),
            # A peak raised at an earlier time still takes that time.
            ({"max_users": 20, "timestamp": 50}, (20, 50, 6, 400, 50)),
            ({}, (20, 50, 6, 400, 50)),
        ]
        keys = list(DEFAULT_CHANNEL)
        for kwargs, expected in steps:
            await store.update_channel_stats(**kwargs)
            assert await store.get_channel_stats() == dict(zip(keys, expected, strict=True)), kwargs

    async def test_channel_zero_is_no_peak(self, store: StorageAdapter) -> None:
        await store.update_channel_stats(max_users=0, max_connected=0, timestamp=5)
        assert await store.get_channel_stats() == DEFAULT_CHANNEL

    # -- user counts -------------------------------------------------------------------
    async def test_count_rows_oldest_first_ties_by_id(self, store: StorageAdapter) -> None:
        for chat, ts in [(1, 200), (2, 100), (3, 200), (4, 150), (5, 100)]:
            await store.log_user_count(chat, chat * 10, timestamp=ts)
        rows = await store.get_user_count_history()
        assert _without_ids(rows) == [
            {"timestamp": 100, "chat_users": 2, "connected_users": 20},
            {"timestamp": 100, "chat_users": 5, "connected_users": 50},
            {"timestamp": 150, "chat_users": 4, "connected_users": 40},
            {"timestamp": 200, "chat_users": 1, "connected_users": 10},
            {"timestamp": 200, "chat_users": 3, "connected_users": 30},
        ]
        assert all(set(row) == {"id", "timestamp", "chat_users", "connected_users"} for row in rows)
        ids = {row["chat_users"]: row["id"] for row in rows}
        assert ids[2] < ids[5] and ids[1] < ids[3]

    async def test_count_range_is_inclusive(self, store: StorageAdapter) -> None:
        assert await store.get_user_count_history() == []
        for ts in [100, 200, 300, 400, 500]:
            await store.log_user_count(ts // 100, 0, timestamp=ts)

        async def times(**kwargs: Any) -> list[int]:
            return _labels(await store.get_user_count_history(**kwargs), "timestamp")

        assert await times() == [100, 200, 300, 400, 500]
        assert await times(start_time=200, end_time=400) == [200, 300, 400]
        assert await times(start_time=201, end_time=399) == [300]
        assert await times(start_time=300) == [300, 400, 500]
        assert await times(end_time=300) == [100, 200, 300]
        assert await times(start_time=300, end_time=300) == [300]
        assert await times(start_time=400, end_time=200) == []
        assert await times(start_time=600) == []
        assert await times(end_time=99) == []
        assert await times(start_time=0, end_time=100) == [100]

    async def test_count_limit_takes_the_oldest(self, store: StorageAdapter) -> None:
        for ts in [500, 100, 300, 200, 400]:
            await store.log_user_count(ts // 100, 0, timestamp=ts)

        async def times(**kwargs: Any) -> list[int]:
            return _labels(await store.get_user_count_history(**kwargs), "timestamp")

        assert await times(limit=2) == [100, 200]
        assert await times(start_time=250, limit=2) == [300, 400]
        assert await times(end_time=300, limit=5) == [100, 200, 300]
        assert await times(limit=0) == []
        assert await times(limit=None) == [100, 200, 300, 400, 500]

    # -- recent chat -------------------------------------------------------------------
    async def test_message_rows(self, store: StorageAdapter, clock: FakeClock) -> None:
        await store.save_message("alice", "hello")
        await store.save_message("bob", "hi", timestamp=7)
        rows = await store.get_recent_messages()
        assert _without_ids(rows) == [
            {"timestamp": clock.now, "username": "alice", "message": "hello"},
            {"timestamp": 7, "username": "bob", "message": "hi"},
        ]
        assert all(set(row) == {"id", "timestamp", "username", "message"} for row in rows)
        assert rows[0]["id"] < rows[1]["id"]

    async def test_messages_newest_first_ties_by_id_desc(self, store: StorageAdapter) -> None:
        for text, ts in [("m1", 100), ("m2", 300), ("m3", 200), ("m4", 300), ("m5", 100)]:
            await store.save_message("alice", text, timestamp=ts)
        assert _labels(await store.get_recent_messages(), "message") == [
            "m4",
            "m2",
            "m3",
            "m5",
            "m1",
        ]

    async def test_message_pages(self, store: StorageAdapter) -> None:
        assert await store.get_recent_messages() == []
        for i in range(11):
            await store.save_message("alice", f"m{i}", timestamp=(i * 7) % 5)
        full = await store.get_recent_messages()
        assert len(full) == 11
        for size in [1, 3, 11]:
            pages = [
                await store.get_recent_messages(limit=size, offset=start)
                for start in range(0, 11, size)
            ]
            assert [row for page in pages for row in page] == full, size
        assert await store.get_recent_messages(limit=0) == []
        assert await store.get_recent_messages(offset=11) == []
        assert await store.get_recent_messages(limit=2, offset=9) == full[9:]

    @pytest.mark.parametrize("text", _EXACT_TEXTS)
    async def test_text_is_stored_exactly(self, store: StorageAdapter, text: str) -> None:
        await store.save_message("alice", text)
        await store.log_user_action("alice", "note", text)
        if text:
            await store.save_user_stats(text, chat_lines=1)
            await store.save_message(text, "by name")
            await store.log_user_action(text, text)
        for _ in range(2):
            messages = await store.get_recent_messages(limit=ALL)
            assert [m["message"] for m in messages if m["username"] == "alice"] == [text]
            notes = await store.get_user_actions(action_type="note")
            assert [a["details"] for a in notes] == [text]
            if text:
                row = await store.get_user_stats(text)
                assert row is not None and row["username"] == text
                assert [m["username"] for m in messages if m["message"] == "by name"] == [text]
                mine = await store.get_user_actions(username=text, action_type=text)
                assert [(a["username"], a["action_type"]) for a in mine] == [(text, text)]
            store = await self.reopen(store)

    @pytest.mark.parametrize("spec", _ONE_MIB_TEXTS)
    async def test_exactly_one_mib_of_text_is_accepted(
        self, store: StorageAdapter, spec: tuple[Any, ...]
    ) -> None:
        text = _one_mib(spec)
        await store.save_message("alice", text)
        await store.log_user_action("alice", "big", text)
        for _ in range(2):
            assert _labels(await store.get_recent_messages(), "message") == [text]
            assert _labels(await store.get_user_actions(), "details") == [text]
            store = await self.reopen(store)

    # -- clear_old_messages ------------------------------------------------------------
    async def test_clear_keeps_the_newest_in_read_order(self, store: StorageAdapter) -> None:
        for text, ts in [("m1", 100), ("m2", 50), ("m3", 100), ("m4", 200), ("m5", 10)]:
            await store.save_message("alice", text, timestamp=ts)
        full = await store.get_recent_messages()
        assert _labels(full, "message") == ["m4", "m3", "m1", "m2", "m5"]
        # The newest by (timestamp, id), not the last appended: m5 goes first.
        assert await store.clear_old_messages(3) == 2
        assert await store.get_recent_messages() == full[:3]
        assert await store.clear_old_messages(1) == 2
        assert await store.get_recent_messages() == full[:1]

    async def test_clear_with_room_to_spare_deletes_nothing(self, store: StorageAdapter) -> None:
        assert await store.clear_old_messages(0) == 0
        assert await store.clear_old_messages() == 0
        for i in range(3):
            await store.save_message("alice", f"m{i}")
        full = await store.get_recent_messages()
        assert await store.clear_old_messages(10) == 0
        assert await store.clear_old_messages(3) == 0
        assert await store.clear_old_messages() == 0
        assert await store.get_recent_messages() == full

    async def test_clear_zero_deletes_everything(self, store: StorageAdapter) -> None:
        for i in range(4):
            await store.save_message("alice", f"m{i}")
        assert await store.clear_old_messages(0) == 4
        assert await store.get_recent_messages() == []
        assert await store.clear_old_messages(0) == 0

    async def test_clear_keeps_1000_by_default(self, store: StorageAdapter) -> None:
        await asyncio.gather(
            *(store.save_message("alice", f"m{i}", timestamp=i) for i in range(1002))
        )
        assert await store.clear_old_messages() == 2
        rows = await store.get_recent_messages(limit=ALL)
        assert len(rows) == 1000
        assert rows[-1]["message"] == "m2"

    async def test_messages_after_a_clear_are_newest_with_new_ids(
        self, store: StorageAdapter
    ) -> None:
        for i in range(3):
            await store.save_message("alice", f"old{i}")
        old_ids = _labels(await store.get_recent_messages(), "id")
        assert await store.clear_old_messages(1) == 2
        await store.save_message("alice", "new")
        rows = await store.get_recent_messages()
        assert _labels(rows, "message") == ["new", "old2"]
        assert rows[0]["id"] > max(old_ids)
        assert rows[1]["id"] == old_ids[0]

    async def test_clear_leaves_other_kinds_alone(
        self, store: StorageAdapter, clock: FakeClock
    ) -> None:
        await _seed(store, clock)
        before = await read_state(store)
        assert await store.clear_old_messages(0) == 2
        after = await read_state(store)
        assert after["messages"] == []
        assert {**after, "messages": before["messages"]} == before

    # -- ids ---------------------------------------------------------------------------
    async def test_ids_are_positive_unique_and_increase_in_append_order(
        self, store: StorageAdapter
    ) -> None:
        # Increasing timestamps make the read order the append order, whatever the ids.
        for i in range(6):
            await store.log_user_action("alice", "join", timestamp=i)
            await store.log_user_count(i, i, timestamp=i)
            await store.save_user_stats("alice", chat_lines=1)
            await store.save_message("alice", f"m{i}", timestamp=i)
            await store.update_channel_stats(max_users=i + 1, timestamp=i)
        kinds = {
            "actions": list(reversed(await store.get_user_actions())),
            "counts": await store.get_user_count_history(),
            "messages": list(reversed(await store.get_recent_messages())),
        }
        for kind, rows in kinds.items():
            ids = _labels(rows, "id")
            assert len(ids) == 6, kind
            assert all(type(i) is int and i > 0 for i in ids), (kind, ids)
            assert ids == sorted(set(ids)), (kind, ids)

    # -- validation --------------------------------------------------------------------
    @pytest.mark.parametrize(("method", "kwargs"), _bad_calls())
    async def test_bad_input_raises_validation_error_and_changes_nothing(
        self, store: StorageAdapter, clock: FakeClock, method: str, kwargs: dict[str, Any]
    ) -> None:
        call = _method(store, method)
        await _seed(store, clock)
        before = await read_state(store)
        with pytest.raises(ValidationError):
            await call(**kwargs)
        assert await read_state(store) == before
        store = await self.reopen(store)
        assert await read_state(store) == before

    @pytest.mark.parametrize("method", [pytest.param(m, id=m) for m in _WRITES])
    async def test_the_valid_writes_of_the_bad_input_tests_change_the_store(
        self, store: StorageAdapter, clock: FakeClock, method: str
    ) -> None:
        # Guards the test above: its "nothing changed" would be vacuous if the
        # valid form of the call changed nothing either.
        call = _method(store, method)
        await _seed(store, clock)
        before = await read_state(store)
        await call(**_VALID[method])
        assert await read_state(store) != before

    async def test_validation_error_is_a_value_error(self, store: StorageAdapter) -> None:
        with pytest.raises(ValueError, match="username"):
            await store.save_message("", "hi")

    # -- concurrency -------------------------------------------------------------------
    async def test_concurrent_writes_are_all_applied(self, store: StorageAdapter) -> None:
        n = 40

        async def worker(i: int) -> None:
            user = f"user{i % 5}"
            await store.save_message(user, f"m{i}")
            await store.log_user_action(user, "join", f"a{i}")
            await store.log_user_count(i, i)
            await store.save_user_stats("shared", chat_lines=1, time_connected=i)
            # A read sees every write whose await has returned.
            texts = _labels(await store.get_recent_messages(limit=ALL), "message")
            assert f"m{i}" in texts

        await asyncio.gather(*(worker(i) for i in range(n)))
        messages = await store.get_recent_messages(limit=ALL)
        actions = await store.get_user_actions(limit=ALL)
        counts = await store.get_user_count_history()
        assert sorted(_labels(messages, "message")) == sorted(f"m{i}" for i in range(n))
        assert sorted(_labels(actions, "details")) == sorted(f"a{i}" for i in range(n))
        assert sorted(_labels(counts, "chat_users")) == list(range(n))
        for rows in (messages, actions, counts):
            assert len(set(_labels(rows, "id"))) == n
        shared = await store.get_user_stats("shared")
        assert shared is not None
        assert shared["total_chat_lines"] == n
        assert shared["total_time_connected"] == sum(range(n))

    async def test_concurrent_peaks_keep_the_maximum(self, store: StorageAdapter) -> None:
        values = list(range(1, 41))
        random.Random(7).shuffle(values)
        await asyncio.gather(
            *(
                store.update_channel_stats(max_users=v, max_connected=100 - v, timestamp=v)
                for v in values
            )
        )
        channel = await store.get_channel_stats()
        assert (channel["max_users"], channel["max_users_timestamp"]) == (40, 40)
        assert (channel["max_connected"], channel["max_connected_timestamp"]) == (99, 1)

    async def test_concurrent_end_sessions_count_the_session_once(
        self, store: StorageAdapter
    ) -> None:
        end_session = _method(store, "end_session")
        await store.save_user_stats("alice", first_seen=1, last_seen=1, session_start=1000)
        added = await asyncio.gather(*(end_session("alice", timestamp=1000 + i) for i in range(20)))
        alice = await store.get_user_stats("alice")
        assert alice is not None
        assert alice["current_session_start"] is None
        assert sum(added) == alice["total_time_connected"]
        assert sorted(added)[:-1] == [0] * 19

    async def test_concurrent_clears_delete_each_message_once(self, store: StorageAdapter) -> None:
        for i in range(10):
            await store.save_message("alice", f"m{i}", timestamp=i)
        deleted = await asyncio.gather(*(store.clear_old_messages(k) for k in [8, 5, 9, 2, 6]))
        assert sum(deleted) == 8
        assert _labels(await store.get_recent_messages(), "message") == ["m9", "m8"]

    # -- reconnect ---------------------------------------------------------------------
    async def test_reconnect_preserves_everything(
        self, store: StorageAdapter, clock: FakeClock
    ) -> None:
        await _seed(store, clock)
        await store.save_message("carol", "x" * 5000)
        await store.clear_old_messages(2)
        if hasattr(store, "end_session"):
            await _method(store, "end_session")("alice", timestamp=clock.now + 1)
        before = await read_state(store)
        users = {
            row["username"]: await store.get_user_stats(row["username"]) for row in before["users"]
        }
        # Replay must not consult the clock: move it far away meanwhile.
        clock.advance(10**6)
        store = await self.reopen(store)
        assert await read_state(store) == before
        for name, row in users.items():
            assert await store.get_user_stats(name) == row

    async def test_ids_are_stable_across_reconnect_and_new_ones_are_larger(
        self, store: StorageAdapter, clock: FakeClock
    ) -> None:
        await _seed(store, clock)
        before = await read_state(store)
        store = await self.reopen(store)
        await store.log_user_action("dave", "join", timestamp=0)
        await store.log_user_count(1, 1, timestamp=0)
        await store.save_message("dave", "late", timestamp=0)
        after = await read_state(store)
        for kind in ("actions", "counts", "messages"):
            old_ids = _labels(before[kind], "id")
            new_rows = [row for row in after[kind] if row["id"] not in old_ids]
            assert [row for row in after[kind] if row["id"] in old_ids] == before[kind], kind
            assert len(new_rows) == 1, kind
            assert new_rows[0]["id"] > max(old_ids), kind

    async def test_many_reconnects_accumulate(
        self, store: StorageAdapter, clock: FakeClock
    ) -> None:
        for round_ in range(5):
            clock.advance(60)
            await store.save_user_stats("alice", chat_lines=1, last_seen=clock.now)
            await store.save_message("alice", f"round {round_}")
            await store.log_user_count(round_, round_)
            store = await self.reopen(store)
        alice = await store.get_user_stats("alice")
        assert alice is not None
        assert (alice["total_chat_lines"], alice["last_seen"]) == (5, clock.now)
        assert _labels(await store.get_recent_messages(), "message") == [
            f"round {i}" for i in reversed(range(5))
        ]
        assert _labels(await store.get_user_count_history(), "chat_users") == list(range(5))

    async def test_an_open_session_survives_reconnect(self, store: StorageAdapter) -> None:
        end_session = _method(store, "end_session")
        await store.save_user_stats("alice", first_seen=1, last_seen=1, session_start=100)
        store = await self.reopen(store)
        assert await end_session("alice", timestamp=130) == 30
        store = await self.reopen(store)
        alice = await store.get_user_stats("alice")
        assert alice is not None
        assert (alice["total_time_connected"], alice["current_session_start"]) == (30, None)

    # -- forget_user (extension) -------------------------------------------------------
    async def test_forget_user_removes_every_trace_of_them(
        self, store: StorageAdapter, clock: FakeClock
    ) -> None:
        forget_user = _method(store, "forget_user")
        await _seed(store, clock)
        before = await read_state(store)
        assert await forget_user("alice") is True
        for _ in range(2):
            after = await read_state(store)
            assert await store.get_user_stats("alice") is None
            assert await store.get_user_actions(username="alice") == []
            assert "alice" not in _labels(after["users"], "username")
            assert "alice" not in _labels(after["actions"], "username")
            assert "alice" not in _labels(after["messages"], "username")
            # Everyone else, the peaks and the counts stay.
            assert after["channel"] == before["channel"]
            assert after["counts"] == before["counts"]
            assert after["users"] == [u for u in before["users"] if u["username"] != "alice"]
            assert after["actions"] == [a for a in before["actions"] if a["username"] != "alice"]
            assert after["messages"] == [m for m in before["messages"] if m["username"] != "alice"]
            store = await self.reopen(store)

    async def test_forget_an_unknown_user_changes_nothing(
        self, store: StorageAdapter, clock: FakeClock
    ) -> None:
        forget_user = _method(store, "forget_user")
        await _seed(store, clock)
        before = await read_state(store)
        assert await forget_user("nobody") is False
        assert await forget_user("Alice") is False
        assert await read_state(store) == before

    async def test_a_forgotten_user_can_come_back(self, store: StorageAdapter) -> None:
        forget_user = _method(store, "forget_user")
        await store.save_message("alice", "old")
        await store.log_user_action("alice", "join", "old")
        await store.save_user_stats("alice", chat_lines=9)
        assert await forget_user("alice") is True
        assert await forget_user("alice") is False
        await store.save_message("alice", "new")
        await store.log_user_action("alice", "join", "new")
        await store.save_user_stats("alice", chat_lines=1)
        for _ in range(2):
            assert _labels(await store.get_recent_messages(), "message") == ["new"]
            rows = await store.get_user_actions(username="alice", action_type="join")
            assert _labels(rows, "details") == ["new"]
            assert _labels(await store.get_user_actions(action_type="join"), "details") == ["new"]
            alice = await store.get_user_stats("alice")
            assert alice is not None and alice["total_chat_lines"] == 1
            store = await self.reopen(store)
