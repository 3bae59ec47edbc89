"""The event schema: every fact the store records, as typed msgspec Structs.

Each write through the adapter becomes one of these events.  They record facts
with values already resolved (``timestamp=None`` became the clock's reading when
the write was accepted), so replaying them never consults the clock.

Rules for changing this module (they keep old logs readable):

* Every event has an explicit integer tag.  The tag, not the class name, is
  what is written to disk, so classes may be renamed freely; a tag is never
  reused for another meaning.
* Events are encoded ``array_like``: fields are written by position, not by
  name, which makes records about a third smaller and decoding faster.  The
  price is that field order *is* the format: new fields go last and must have a
  default; fields are never reordered, removed or retyped.  Nor is a default
  changed: events written before their field existed decode with it, and the
  schema fingerprint does not cover defaults (nor ``array_like`` itself), so
  old snapshots would still be loaded beside a replay that now differs.
* A change that those rules cannot express (a rename with a new meaning, a
  split) gets a new tag and a new ``version``; the old class stays, and an
  upcaster turns its events into current ones while reading.

The table of tags is documented in ``docs/format.md``.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import msgspec

__all__ = [
    "EVENT_TYPES",
    "READABLE_FINGERPRINTS",
    "SCHEMA_FINGERPRINT",
    "ChannelPeakRaised",
    "ChannelStatsSet",
    "Event",
    "MessageSaved",
    "MessagesCleared",
    "SessionEnded",
    "UserActionLogged",
    "UserCountLogged",
    "UserCountsTrimmed",
    "UserForgotten",
    "UserStatsSaved",
    "UserStatsSet",
    "event_name",
    "event_time",
]


class BaseEvent(msgspec.Struct, array_like=True, tag_field="t", frozen=True, gc=False):
    """Base of all events.  ``version`` counts changes of one event's meaning.

    ``gc=False``: events hold only str, int and None, so they cannot be part
    of a reference cycle, and a replay makes millions of them; left to the
    garbage collector, each one counts towards its next collection.
    """

    version: ClassVar[int] = 1


class UserStatsSaved(BaseEvent, tag=1, frozen=True):
    """``save_user_stats`` was called.

    ``now`` is when the write was accepted: a user seen for the first time gets
    it as ``first_seen``/``last_seen`` where those were not given.
    ``chat_lines`` and ``time_connected`` are increments (0 when not given).
    """

    username: str
    now: int
    first_seen: int | None = None
    last_seen: int | None = None
    chat_lines: int = 0
    time_connected: int = 0
    session_start: int | None = None


class UserStatsSet(BaseEvent, tag=2, frozen=True):
    """A user's statistics as absolute values (imports and compaction write these)."""

    username: str
    first_seen: int
    last_seen: int
    total_chat_lines: int
    total_time_connected: int
    current_session_start: int | None = None


class SessionEnded(BaseEvent, tag=3, frozen=True):
    """An open session closed at ``timestamp``; ``seconds`` were added to the total."""

    username: str
    timestamp: int
    seconds: int


class UserActionLogged(BaseEvent, tag=4, frozen=True):
    """A user action (join, leave, a PM command).  Its id is its log position."""

    timestamp: int
    username: str
    action_type: str
    details: str | None = None


class ChannelPeakRaised(BaseEvent, tag=5, frozen=True):
    """One or both channel maxima rose at ``timestamp``; ``None`` means not raised."""

    timestamp: int
    max_users: int | None = None
    max_connected: int | None = None


class ChannelStatsSet(BaseEvent, tag=6, frozen=True):
    """The channel statistics as absolute values (imports and compaction)."""

    max_users: int
    max_users_timestamp: int | None
    max_connected: int
    max_connected_timestamp: int | None
    last_updated: int | None


class UserCountLogged(BaseEvent, tag=7, frozen=True):
    """A sample of how many users were in chat and connected.  Id = position."""

    timestamp: int
    chat_users: int
    connected_users: int


class MessageSaved(BaseEvent, tag=8, frozen=True):
    """A chat line.  Its id is its log position."""

    timestamp: int
    username: str
    message: str


class MessagesCleared(BaseEvent, tag=9, frozen=True):
    """At ``timestamp`` all but the newest ``keep_count`` messages were deleted
    (``deleted`` of them)."""

    keep_count: int
    deleted: int
    timestamp: int


class UserForgotten(BaseEvent, tag=10, frozen=True):
    """Everything of ``username`` (stats, actions, messages) is gone from every read."""

    username: str
    timestamp: int


class UserCountsTrimmed(BaseEvent, tag=11, frozen=True):
    """User counts older than ``before`` (a timestamp) are gone from every read."""

    before: int
    timestamp: int


Event = (
    UserStatsSaved
    | UserStatsSet
    | SessionEnded
    | UserActionLogged
    | ChannelPeakRaised
    | ChannelStatsSet
    | UserCountLogged
    | MessageSaved
    | MessagesCleared
    | UserForgotten
    | UserCountsTrimmed
)

#: Every current event type, in tag order.
EVENT_TYPES: tuple[type[BaseEvent], ...] = (
    UserStatsSaved,
    UserStatsSet,
    SessionEnded,
    UserActionLogged,
    ChannelPeakRaised,
    ChannelStatsSet,
    UserCountLogged,
    MessageSaved,
    MessagesCleared,
    UserForgotten,
    UserCountsTrimmed,
)

_NAMES: dict[type[BaseEvent], str] = {}


def _snake(name: str) -> str:
    out = [name[0].lower()]
    for ch in name[1:]:
        if ch.isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


for _cls in EVENT_TYPES:
    _NAMES[_cls] = _snake(_cls.__name__)

#: snake_case name -> type, as used by ``--type`` filters and JSON output.
TYPES_BY_NAME: dict[str, type[BaseEvent]] = {v: k for k, v in _NAMES.items()}


def event_name(event: BaseEvent) -> str:
    """The stable snake_case name of an event's type, e.g. ``message_saved``."""
    return _NAMES[type(event)]


def event_tag(cls: type[BaseEvent]) -> int:
    tag = cls.__struct_config__.tag
    assert isinstance(tag, int)
    return tag


def event_time(event: BaseEvent) -> int:
    """The moment an event describes, in Unix seconds (for point-in-time replay).

    Most events carry a ``timestamp``.  A stats update describes ``last_seen``
    when the caller gave one (the bot passes the time of the chat line), else
    the moment it was accepted; absolute records describe their latest moment
    (a user's open session may have started after they were last seen: a
    rejoin without a chat line).
    """
    if isinstance(event, UserStatsSaved):
        return event.last_seen if event.last_seen is not None else event.now
    if isinstance(event, UserStatsSet):
        return max(event.last_seen, event.current_session_start or 0)
    if isinstance(event, ChannelStatsSet):
        moments = (event.last_updated, event.max_users_timestamp, event.max_connected_timestamp)
        return max((t for t in moments if t is not None), default=0)
    ts = getattr(event, "timestamp", None)
    assert isinstance(ts, int), f"{type(event).__name__} has no time"
    return ts


def _fingerprint() -> bytes:
    """8 bytes that change whenever a tag, version, field or field type changes.

    Written into every segment header and snapshot so that a reader can tell
    at once whether it understands the events that follow.
    """
    parts = []
    for cls in EVENT_TYPES:
        fields = ",".join(f"{f.encode_name}:{f.type!r}" for f in msgspec.structs.fields(cls))
        parts.append(f"{event_tag(cls)}/{cls.version}/{fields}")
    return hashlib.blake2b(";".join(parts).encode(), digest_size=8).digest()


SCHEMA_FINGERPRINT: bytes = _fingerprint()

#: Fingerprints of every event schema this code can read.  When an event
#: changes, the old fingerprint stays here (with an upcaster for what changed),
#: so old segments still open; an unknown fingerprint means the log was written
#: by newer code.
READABLE_FINGERPRINTS: frozenset[bytes] = frozenset({SCHEMA_FINGERPRINT})
