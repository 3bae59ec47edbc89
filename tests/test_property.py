"""Random sequences of operations against EventStore and a plain reference model.

The model below is the issue's rules written as directly as Python allows:
dicts and lists, sorted on every read.  Hypothesis drives both with the same
writes (every write method, bad input now and then, reconnects, clock jumps)
and after every step every read method must agree with the model, ids
included: a row's id is the position of its event, and the model counts the
events a write should append (none for a write that changes nothing).

Runs on its own event loop because Hypothesis' state machines are synchronous.
A second machine runs the same rules on the segment log.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from eventstore import EventStore, ValidationError
from eventstore.testing import FakeClock

USERS = st.sampled_from(["alice", "bob", "carol", "Alice", "😀"])
TYPES = st.sampled_from(["join", "leave", "pm"])
TIMES = st.integers(min_value=0, max_value=40)
OPT_TIMES = st.none() | TIMES
OPT_SMALL = st.none() | st.integers(min_value=0, max_value=50)
TEXT = st.text(max_size=6)
LIMITS = st.integers(min_value=0, max_value=8)
MIB = 1_048_576
HAS_SEGMENTLOG = importlib.util.find_spec("eventstore.segmentlog") is not None

BadCall = Callable[[EventStore], Coroutine[Any, Any, Any]]

# Each would change the store if its bad argument were accepted.
BAD_CALLS: list[BadCall] = [
    lambda s: s.save_user_stats("alice", first_seen=-1, chat_lines=1),
    lambda s: s.save_user_stats("", chat_lines=1),
    lambda s: s.save_user_stats("alice", time_connected=True),
    lambda s: s.end_session("alice", timestamp=-1),
    lambda s: s.log_user_action("alice", "", "x"),
    lambda s: s.log_user_action("alice", "join", "\ud800"),
    lambda s: s.update_channel_stats(10**6, 10**6, timestamp=1.5),
    lambda s: s.update_channel_stats(max_users="9"),
    lambda s: s.log_user_count(True, 1),
    lambda s: s.log_user_count(1, 1, timestamp=-3),
    lambda s: s.save_message("alice", "x" * (MIB + 1)),
    lambda s: s.save_message(b"alice", "hi"),
    lambda s: s.clear_old_messages(-1),
    lambda s: s.clear_old_messages(0.0),
    lambda s: s.forget_user("alice", timestamp=False),
    lambda s: s.get_recent_messages(limit=-1),
    lambda s: s.get_user_count_history(start_time=True),
]


class Model:
    """The rules of the issue, with no cleverness."""

    def __init__(self) -> None:
        self.position = 0
        # name -> [first_seen, last_seen, chat_lines, time_connected, session_start]
        self.users: dict[str, list[Any]] = {}
        self.actions: list[dict[str, Any]] = []
        self.counts: list[dict[str, Any]] = []
        self.messages: list[dict[str, Any]] = []
        self.channel: dict[str, Any] = {
            "max_users": 0,
            "max_users_timestamp": None,
            "max_connected": 0,
            "max_connected_timestamp": None,
            "last_updated": None,
        }
        # A store on disk keeps cleared chat lines until a compaction (which
        # forget_user runs): forget_user erases those of a user no read returns.
        self.keeps_cleared = False
        self.cleared_on_disk: set[str] = set()

    def _append(self) -> int:
        self.position += 1
        return self.position

    # -- writes -----------------------------------------------------------------
    def save_user_stats(
        self,
        now: int,
        name: str,
        first: int | None,
        last: int | None,
        lines: int | None,
        seconds: int | None,
        session: int | None,
    ) -> None:
        old = self.users.get(name)
        if old is None:
            new = [
                now if first is None else first,
                now if last is None else last,
                lines or 0,
                seconds or 0,
                session,
            ]
        else:
            new = [
                old[0] if first is None else min(old[0], first),
                old[1] if last is None else max(old[1], last),
                old[2] + (lines or 0),
                old[3] + (seconds or 0),
                old[4] if session is None else session,
            ]
        if new != old:
            self.users[name] = new
            self._append()

    def end_session(self, name: str, ts: int) -> int:
        rec = self.users.get(name)
        if rec is None or rec[4] is None:
            return 0
        added = max(0, ts - rec[4])
        rec[3] += added
        rec[1] = max(rec[1], ts)
        rec[4] = None
        self._append()
        return added

    def log_user_action(self, ts: int, name: str, kind: str, details: str | None) -> None:
        row = {"timestamp": ts, "username": name, "action_type": kind, "details": details}
        self.actions.append({"id": self._append(), **row})

    def update_channel_stats(self, ts: int, users: int | None, connected: int | None) -> None:
        ch = self.channel
        raised = False
        if users is not None and users > ch["max_users"]:
            ch["max_users"], ch["max_users_timestamp"], raised = users, ts, True
        if connected is not None and connected > ch["max_connected"]:
            ch["max_connected"], ch["max_connected_timestamp"], raised = connected, ts, True
        if raised:
            ch["last_updated"] = ts
            self._append()

    def log_user_count(self, ts: int, chat: int, connected: int) -> None:
        row = {"timestamp": ts, "chat_users": chat, "connected_users": connected}
        self.counts.append({"id": self._append(), **row})

    def save_message(self, ts: int, name: str, text: str) -> None:
        row = {"timestamp": ts, "username": name, "message": text}
        self.messages.append({"id": self._append(), **row})

    def clear_old_messages(self, keep: int) -> int:
        newest = self.recent_messages(None, 0)
        deleted = newest[keep:]
        if deleted:
            if self.keeps_cleared:
                self.cleared_on_disk |= {m["username"] for m in deleted}
            gone = {m["id"] for m in deleted}
            self.messages = [m for m in self.messages if m["id"] not in gone]
            self._append()
        return len(deleted)

    def forget_user(self, name: str) -> bool:
        known = (
            name in self.users
            or any(a["username"] == name for a in self.actions)
            or any(m["username"] == name for m in self.messages)
        )
        if known:
            self.users.pop(name, None)
            self.actions = [a for a in self.actions if a["username"] != name]
            self.messages = [m for m in self.messages if m["username"] != name]
            self._append()
        if known or name in self.cleared_on_disk:
            self.cleared_on_disk.clear()  # the compaction dropped every cleared line
            return True
        return False

    # -- reads ----------------------------------------------------------------------
    def user_stats(self, name: str) -> dict[str, Any] | None:
        rec = self.users.get(name)
        if rec is None:
            return None
        return {
            "username": name,
            "first_seen": rec[0],
            "last_seen": rec[1],
            "total_chat_lines": rec[2],
            "total_time_connected": rec[3],
            "current_session_start": rec[4],
        }

    def all_user_stats(self, limit: int | None, offset: int) -> list[dict[str, Any]]:
        names = sorted(self.users, key=lambda n: (-self.users[n][1], n))
        rows = [self.user_stats(n) for n in names]
        return [r for r in _page(rows, limit, offset) if r is not None]

    def user_actions(
        self, name: str | None, kind: str | None, limit: int, offset: int
    ) -> list[dict[str, Any]]:
        rows = [
            a
            for a in self.actions
            if (name is None or a["username"] == name)
            and (kind is None or a["action_type"] == kind)
        ]
        rows.sort(key=lambda a: (a["timestamp"], a["id"]), reverse=True)
        return _page(rows, limit, offset)

    def count_history(
        self, start: int | None, end: int | None, limit: int | None
    ) -> list[dict[str, Any]]:
        rows = [
            c
            for c in self.counts
            if (start is None or c["timestamp"] >= start) and (end is None or c["timestamp"] <= end)
        ]
        rows.sort(key=lambda c: (c["timestamp"], c["id"]))
        return _page(rows, limit, 0)

    def recent_messages(self, limit: int | None, offset: int) -> list[dict[str, Any]]:
        rows = sorted(self.messages, key=lambda m: (m["timestamp"], m["id"]), reverse=True)
        return _page(rows, limit, offset)


def _page(rows: list[Any], limit: int | None, offset: int) -> list[Any]:
    return rows[offset:] if limit is None else rows[offset : offset + limit]


class StoreMachine(RuleBasedStateMachine):
    #: See Model.keeps_cleared.
    keeps_cleared = False

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock(20)
        self.store = self.make_store(None)
        self.run(self.store.connect())
        self.model = Model()
        self.model.keeps_cleared = self.keeps_cleared

    def make_store(self, previous: EventStore | None) -> EventStore:
        """A new store object, on the same log as ``previous`` if given."""
        log = ":memory:" if previous is None else previous.log
        return EventStore(log, clock=self.clock)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
        finally:
            self.loop.close()
            self.cleanup()

    def cleanup(self) -> None:
        pass

    def _ts(self, ts: int | None) -> int:
        return self.clock.now if ts is None else ts

    # -- writes -------------------------------------------------------------------
    @rule(
        name=USERS,
        first=OPT_TIMES,
        last=OPT_TIMES,
        lines=OPT_SMALL,
        seconds=OPT_SMALL,
        session=OPT_TIMES,
    )
    def save_user_stats(
        self,
        name: str,
        first: int | None,
        last: int | None,
        lines: int | None,
        seconds: int | None,
        session: int | None,
    ) -> None:
        self.run(self.store.save_user_stats(name, first, last, lines, seconds, session))
        self.model.save_user_stats(self.clock.now, name, first, last, lines, seconds, session)

    @rule(name=USERS, ts=OPT_TIMES)
    def end_session(self, name: str, ts: int | None) -> None:
        got = self.run(self.store.end_session(name, ts))
        assert got == self.model.end_session(name, self._ts(ts))

    @rule(name=USERS, kind=TYPES, details=st.none() | TEXT, ts=OPT_TIMES)
    def log_user_action(self, name: str, kind: str, details: str | None, ts: int | None) -> None:
        self.run(self.store.log_user_action(name, kind, details, ts))
        self.model.log_user_action(self._ts(ts), name, kind, details)

    @rule(users=OPT_SMALL, connected=OPT_SMALL, ts=OPT_TIMES)
    def update_channel_stats(
        self, users: int | None, connected: int | None, ts: int | None
    ) -> None:
        self.run(self.store.update_channel_stats(users, connected, ts))
        self.model.update_channel_stats(self._ts(ts), users, connected)

    @rule(chat=st.integers(0, 50), connected=st.integers(0, 50), ts=OPT_TIMES)
    def log_user_count(self, chat: int, connected: int, ts: int | None) -> None:
        self.run(self.store.log_user_count(chat, connected, ts))
        self.model.log_user_count(self._ts(ts), chat, connected)

    @rule(name=USERS, text=TEXT, ts=OPT_TIMES)
    def save_message(self, name: str, text: str, ts: int | None) -> None:
        self.run(self.store.save_message(name, text, ts))
        self.model.save_message(self._ts(ts), name, text)

    @rule(keep=st.integers(0, 6))
    def clear_old_messages(self, keep: int) -> None:
        got = self.run(self.store.clear_old_messages(keep))
        assert got == self.model.clear_old_messages(keep)

    @precondition(lambda self: self.model.position > 0)
    @rule(name=USERS)
    def forget_user(self, name: str) -> None:
        got = self.run(self.store.forget_user(name))
        assert got is self.model.forget_user(name)

    @rule(call=st.sampled_from(BAD_CALLS))
    def bad_input(self, call: BadCall) -> None:
        with pytest.raises(ValidationError):
            self.run(call(self.store))

    @rule(seconds=st.integers(0, 10))
    def advance_clock(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @rule(jump=st.integers(0, 10**6))
    def reconnect(self, jump: int) -> None:
        # The clock moves while closed: replay must not notice.
        self.run(self.store.close())
        saved = self.clock.now
        self.clock.set(jump)
        self.run(self.store.connect())
        self.clock.set(saved)

    @rule()
    def restart_on_the_same_log(self) -> None:
        self.run(self.store.close())
        self.store = self.make_store(self.store)
        self.run(self.store.connect())

    # -- reads --------------------------------------------------------------------
    @rule(
        name=st.none() | USERS,
        kind=st.none() | TYPES,
        limit=LIMITS,
        offset=st.integers(0, 6),
        start=st.none() | TIMES,
        end=st.none() | TIMES,
        opt_limit=st.none() | LIMITS,
    )
    def paginated_reads_agree(
        self,
        name: str | None,
        kind: str | None,
        limit: int,
        offset: int,
        start: int | None,
        end: int | None,
        opt_limit: int | None,
    ) -> None:
        store, model = self.store, self.model
        got = self.run(store.get_user_actions(name, kind, limit, offset))
        assert got == model.user_actions(name, kind, limit, offset)
        got = self.run(store.get_all_user_stats(opt_limit, offset))
        assert got == model.all_user_stats(opt_limit, offset)
        got = self.run(store.get_user_count_history(start, end, opt_limit))
        assert got == model.count_history(start, end, opt_limit)
        got = self.run(store.get_recent_messages(limit, offset))
        assert got == model.recent_messages(limit, offset)

    @invariant()
    def every_read_agrees(self) -> None:
        store, model = self.store, self.model
        for name in ["alice", "bob", "carol", "Alice", "😀", "nobody"]:
            assert self.run(store.get_user_stats(name)) == model.user_stats(name), name
        assert self.run(store.get_all_user_stats()) == model.all_user_stats(None, 0)
        assert self.run(store.get_user_actions(limit=10**6)) == model.user_actions(
            None, None, 10**6, 0
        )
        assert self.run(store.get_channel_stats()) == model.channel
        assert self.run(store.get_user_count_history()) == model.count_history(None, None, None)
        assert self.run(store.get_recent_messages(limit=10**6)) == model.recent_messages(None, 0)
        assert store.position == model.position


class DiskStoreMachine(StoreMachine):
    """The same, on the segment log: tiny segments and frequent snapshots, so
    reconnects cross segment rolls and load snapshots (ids must not move)."""

    keeps_cleared = True

    def make_store(self, previous: EventStore | None) -> EventStore:
        if previous is None:
            self.dir = tempfile.mkdtemp(prefix="eventstore-prop-")
        return EventStore(
            Path(self.dir) / "store",
            clock=self.clock,
            durability="none",
            segment_size=1024,
            snapshot_every=5,
        )

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def test_random_operation_sequences_match_the_model() -> None:
    run_state_machine_as_test(StoreMachine, settings=_settings(100))


@pytest.mark.skipif(not HAS_SEGMENTLOG, reason="eventstore.segmentlog is not available")
def test_random_operation_sequences_match_the_model_on_disk() -> None:
    run_state_machine_as_test(DiskStoreMachine, settings=_settings(40))
