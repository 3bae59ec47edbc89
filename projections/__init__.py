"""Read models of the store, each a pure fold over events (no I/O, no clock).

:class:`Projections` bundles them and dispatches each event to the folds that
care about it.  The adapter appends an event, then applies it here; replay on
``connect()`` applies the log from a snapshot's position onwards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from eventstore.events import (
    ChannelPeakRaised,
    ChannelStatsSet,
    Event,
    MessageSaved,
    MessagesCleared,
    SessionEnded,
    UserActionLogged,
    UserCountLogged,
    UserCountsTrimmed,
    UserForgotten,
    UserStatsSaved,
    UserStatsSet,
)

from .channel_stats import ChannelStatsProjection
from .messages import MessagesProjection
from .sorted_index import to_le
from .user_actions import UserActionsProjection
from .user_counts import UserCountsProjection
from .user_stats import UserStatsProjection

__all__ = [
    "LOADABLE_PROJECTION_VERSIONS",
    "PROJECTION_VERSION",
    "ChannelStatsProjection",
    "MessagesProjection",
    "Projections",
    "UserActionsProjection",
    "UserCountsProjection",
    "UserStatsProjection",
]

Handler = Callable[[int, Any], None]

#: Bump whenever a fold changes what it computes from the same events, or the
#: shape of ``dump()`` changes: snapshots of another version are not loaded,
#: but for those in LOADABLE_PROJECTION_VERSIONS.
PROJECTION_VERSION = 8
#: The versions whose snapshots this code loads.  Version 7's are version 8's
#: without tombstones (a forget removed its user's action slots at once).
LOADABLE_PROJECTION_VERSIONS = frozenset({7, PROJECTION_VERSION})

_encode = msgspec.msgpack.Encoder().encode


def _nothing(position: int, event: None) -> None:
    return None


def _forget_in(
    user_stats: UserStatsProjection, actions: UserActionsProjection, messages: MessagesProjection
) -> Handler:
    """The fold of a UserForgotten, bound to the models it changes.

    Not a method of Projections: a bound method in its own handler table
    made every Projections a reference cycle, freed only when the cyclic
    garbage collector ran; a replay's read models (compaction's, a
    snapshot check's, a follower's rebuild, hundreds of megabytes at years
    of history) then outlived their use by that long.
    """

    def fold(position: int, event: UserForgotten) -> None:
        user_stats.on_forgotten(position, event)
        actions.on_forgotten(position, event)
        messages.on_forgotten(position, event)

    return fold


class Projections:
    """Every read model, plus the position of the last event applied."""

    def __init__(self) -> None:
        self.position = 0
        self.user_stats = UserStatsProjection()
        self.channel = ChannelStatsProjection()
        self.actions = UserActionsProjection()
        self.counts = UserCountsProjection()
        self.messages = MessagesProjection()
        self._bind()

    def _bind(self) -> None:
        # One callable per event type: apply_all runs once per event of a
        # replay, so even a loop over a one-element list shows up there.
        self._handlers: dict[type, Handler] = {
            UserStatsSaved: self.user_stats.on_saved,
            UserStatsSet: self.user_stats.on_set,
            SessionEnded: self.user_stats.on_session_ended,
            UserActionLogged: self.actions.on_logged,
            ChannelPeakRaised: self.channel.on_raised,
            ChannelStatsSet: self.channel.on_set,
            UserCountLogged: self.counts.on_logged,
            UserCountsTrimmed: self.counts.on_trimmed,
            MessageSaved: self.messages.on_saved,
            MessagesCleared: self.messages.on_cleared,
            UserForgotten: _forget_in(self.user_stats, self.actions, self.messages),
            # A position without an event inside a compacted frame (see
            # EventLog.read_groups): nothing to fold.
            type(None): _nothing,
        }

    def apply(self, position: int, event: Event) -> None:
        """Fold one event.  Positions must increase."""
        self._handlers[type(event)](position, event)
        self.position = position

    def apply_run(self, first: int, events: list[Event]) -> None:
        """Fold events at consecutive positions from ``first`` (one frame's worth)."""
        handlers = self._handlers
        for position, event in enumerate(events, first):
            handlers[type(event)](position, event)
        if events:
            self.position = first + len(events) - 1

    def apply_runs(self, runs: Iterable[tuple[int, Sequence[Event | None]]]) -> None:
        """Fold runs of events, each (first position, events), as ``apply_run`` each.

        A run may hold None at a position without an event (a hole of a
        compacted frame, see ``EventLog.read_groups``): it is passed over.
        """
        # A hole costs a handler call (_nothing).  Passing over holes in C
        # (itertools.compress, as compaction's planner does) made the replay
        # of a year-old compacted log 5% faster but that of a log without
        # holes, the common one, 3% slower (A/B, alternating): not taken.
        handlers = self._handlers
        position = self.position
        for first, events in runs:
            for position, event in enumerate(events, first):
                handlers[type(event)](position, event)
        self.position = position

    def apply_all(self, items: Iterable[tuple[int, Event]]) -> None:
        handlers = self._handlers
        position = self.position
        for position, event in items:
            handlers[type(event)](position, event)
        self.position = position

    def dump(self) -> dict[str, Any]:
        """Everything needed to rebuild these projections (for snapshots).

        It holds views of the history arrays, not copies (see
        ``sorted_index.to_le``): encode it at once, before another event is
        folded.
        """
        return {
            "position": self.position,
            "user_stats": self.user_stats.dump(),
            "channel": self.channel.dump(),
            "actions": self.actions.dump(),
            "counts": self.counts.dump(),
            "messages": self.messages.dump(),
        }

    @classmethod
    def load(cls, data: dict[str, Any]) -> Projections:
        """The inverse of ``dump``; raises ValueError/KeyError/TypeError on bad data."""
        proj = cls.__new__(cls)
        proj.position = int(data["position"])
        proj.user_stats = UserStatsProjection.load(data["user_stats"])
        proj.channel = ChannelStatsProjection.load(data["channel"])
        proj.actions = UserActionsProjection.load(data["actions"])
        proj.counts = UserCountsProjection.load(data["counts"])
        proj.messages = MessagesProjection.load(data["messages"])
        proj._bind()
        return proj

    def same_state(self, other: Projections) -> bool:
        """``self.state() == other.state()``, without building either.

        ``state()`` makes an object per history row (a dict per user count,
        a tuple per action and message).  Compaction proves each rewrite by
        such a comparison, of the old and the new log's models: after years
        of history that took several times the memory of the models
        themselves (643 MiB at peak for models of 153 MiB, in a soak) and
        over a second, on PostgreSQL under the append lock.  This compares
        the same things (each view's rows as timestamp and position, the
        user counts' values, the statistics and the channel) on the arrays
        and dicts the models hold, a memcmp for the arrays.
        """
        return (
            self.user_stats.same_state(other.user_stats)
            and self.channel.get() == other.channel.get()
            and self.actions.all.same_rows(other.actions.all)
            and self.counts.same_state(other.counts)
            and self.messages.index.same_rows(other.messages.index)
        )

    def digest(self) -> bytes:
        """A hash of what ``same_state`` compares: equal digests, equal states.

        Compaction keeps this of the state before, instead of the state
        itself, while it replays the rewritten log: holding both took the
        memory of two sets of read models besides the store's own (at 10M
        events about 330 MB more than the store, and the allocator kept much
        of it after).  BLAKE2b-256 over the arrays' bytes and an encoding of
        the dicts, each part with its length first.
        """
        h = hashlib.blake2b(digest_size=32)

        def part(data: bytes | memoryview) -> None:
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)

        part(_encode(sorted(self.user_stats.users.items())))
        part(_encode(sorted(self.channel.get().items())))
        for arr in (
            self.actions.all.ts,
            self.actions.all.pos,
            self.counts.index.ts,
            self.counts.index.pos,
            self.counts.chat,
            self.counts.connected,
            self.messages.index.ts,
            self.messages.index.pos,
        ):
            part(to_le(arr))
        return h.digest()

    def state(self) -> dict[str, Any]:
        """A canonical, comparable picture of every read model.

        History rows appear as (timestamp, position): their content is the
        event at that position, which no operation ever rewrites.
        """
        return {
            "user_stats": self.user_stats.state(),
            "channel": self.channel.state(),
            **self.actions.state(),
            **self.counts.state(),
            **self.messages.state(),
        }
