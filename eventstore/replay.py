"""Point-in-time replay: the read models as they were at a past position or moment.

The log is the history, so any earlier state can be rebuilt by folding a
prefix of it.  Two ways to name the point:

* ``until=P``: every event up to and including position ``P`` -- the store as
  it was right after that write.
* ``at=T``: every event whose :func:`~eventstore.events.event_time` is at or
  before ``T`` (Unix seconds), applied in log order -- the state by the times
  the events record.  Imported history is back-dated (its events carry the
  legacy timestamps but sit at the end of the log), and ``at`` still answers
  for it; ``until`` would not.

Answers are exact for the history the log holds.  Compaction rewrites the
part it covers (superseded statistics folded into absolute values, cleared,
forgotten and trimmed rows dropped): a point inside or before that part sees
what compaction kept, not the past as it was.  ``compacted_through`` says how
far that part reaches, so a caller can say so.

Replay always reads the log from its first event and never a snapshot: a
snapshot holds one state, not the history before it.  That also makes
replay an independent check of what ``connect()`` (which starts from a
snapshot) builds.

The result keeps the read-only log open, because history rows (chat lines,
actions) live in the log and are fetched by position; close it, or use it as
an async context manager.

A store in PostgreSQL (``replay("postgresql://...")``) replays the same way,
through a read-only PostgresLog: ``head`` is the last position committed
when the replay opened the log, and ``compacted_through`` the head the last
compaction covered (see ``eventstore/pgcompaction.py``).  A compaction
that another process commits while the log is read raises QueryError
saying to replay again: it deleted rows below the head between two pages
(a ``forget_user``'s would leave the user's statistics read before it, and
its ``UserForgotten`` gone after).  One committed while the result is open
may delete rows it shows: fetching them raises the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from projections import Projections

from .errors import QueryError, ValidationError
from .events import (
    ChannelStatsSet,
    Event,
    MessageSaved,
    UserActionLogged,
    UserStatsSet,
    event_time,
)
from .inspect import open_log
from .log import EventLog
from .pglog import PostgresLog, RowsMissing, is_dsn, redact_dsn
from .segmentlog import SegmentLog

__all__ = ["ReplayResult", "replay"]

#: Events that hold a whole history's statistics (see ReplayResult.records_skipped).
_RECORDS = (UserStatsSet, ChannelStatsSet)

#: Called with (positions read, the log's last position).
Progress = Callable[[int, int], None]


@dataclass
class ReplayResult:
    """The read models rebuilt up to a point, and the log to read rows from."""

    #: The store directory, or the store's URL with its password hidden.
    directory: str
    projections: Projections
    #: The point asked for (at most one of them is set).
    until: int | None
    at: int | None
    #: The log's last position when the replay ran.
    head: int
    #: Events folded into the projections, and events read but left out (``at``).
    applied: int
    skipped: int
    log: EventLog
    #: The last position covered by a compacted segment (PostgreSQL: the
    #: head the last compaction covered), None if nothing was compacted.
    compacted_through: int | None = None
    #: ``at``: how many of the skipped events were absolute statistics
    #: (UserStatsSet, ChannelStatsSet: written by an import or a compaction
    #: for a whole history, and dated by its latest moment).  A user whose
    #: only record is one is unknown before that moment.
    records_skipped: int = 0

    @property
    def position(self) -> int:
        """The position the state is as of: the end of the range read for
        ``until`` (or the whole log), the last event applied for ``at``."""
        return self.projections.position

    async def close(self) -> None:
        await self.log.close()

    async def __aenter__(self) -> ReplayResult:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- what the projections answer ----------------------------------------------
    def top_chatters(self, limit: int | None = 10) -> list[dict[str, Any]]:
        """User statistics, most chat lines first (ties by username)."""
        stats = self.projections.user_stats
        rows = [stats.row(name, rec) for name, rec in stats.users.items()]
        rows.sort(key=lambda r: (-r["total_chat_lines"], r["username"]))
        return rows if limit is None else rows[:limit]

    def channel_peaks(self) -> dict[str, Any]:
        """What ``get_channel_stats()`` returned at that point."""
        return self.projections.channel.get()

    def user_counts(self) -> dict[str, Any]:
        """A summary of the user-count samples: how many, their span, the latest, the highs."""
        counts = self.projections.counts
        ts, chat, conn = counts.index.ts, counts.chat, counts.connected
        n = len(ts)
        if n == 0:
            return {"samples": 0}
        # Highs: the earliest sample that reached each maximum.
        top_chat = max(range(n), key=lambda i: (chat[i], -i))
        top_conn = max(range(n), key=lambda i: (conn[i], -i))
        return {
            "samples": n,
            "first_timestamp": ts[0],
            "last_timestamp": ts[-1],
            "latest": {"timestamp": ts[-1], "chat_users": chat[-1], "connected_users": conn[-1]},
            "max_chat_users": {"value": chat[top_chat], "timestamp": ts[top_chat]},
            "max_connected_users": {"value": conn[top_conn], "timestamp": ts[top_conn]},
            "mean_chat_users": round(sum(chat) / n, 2),
            "mean_connected_users": round(sum(conn) / n, 2),
        }

    async def _fetch(self, positions: list[int]) -> list[Event]:
        try:
            return await self.log.fetch(positions)
        except RowsMissing as err:
            # PostgreSQL: another process compacted after this replay read
            # the rows' positions.  (A directory's read-only log keeps the
            # files it opened, so it still reads them.)
            raise QueryError(
                f"{err}: a compaction removed rows while this replay ran; replay again"
            ) from err

    async def recent_messages(self, limit: int = 10) -> list[dict[str, Any]]:
        """What ``get_recent_messages(limit)`` returned at that point, newest first."""
        positions = self.projections.messages.positions(limit, 0)
        events = await self._fetch(positions)
        return [
            {"id": p, "timestamp": ev.timestamp, "username": ev.username, "message": ev.message}
            for p, ev in zip(positions, events, strict=True)
            if isinstance(ev, MessageSaved)
        ]

    async def recent_actions(self, limit: int = 10) -> list[dict[str, Any]]:
        """What ``get_user_actions(limit=limit)`` returned at that point, newest first."""
        positions = self.projections.actions.positions(None, None, limit, 0)
        events = await self._fetch(positions)
        return [
            {
                "id": p,
                "timestamp": ev.timestamp,
                "username": ev.username,
                "action_type": ev.action_type,
                "details": ev.details,
            }
            for p, ev in zip(positions, events, strict=True)
            if isinstance(ev, UserActionLogged)
        ]

    async def summary(self, limit: int = 10) -> dict[str, Any]:
        """Everything ``eventstore replay`` prints, as plain data."""
        return {
            "directory": self.directory,
            "until": self.until,
            "at": self.at,
            "position": self.position,
            "head": self.head,
            "events_applied": self.applied,
            "events_skipped": self.skipped,
            "compacted_through": self.compacted_through,
            "records_skipped": self.records_skipped,
            "users": len(self.projections.user_stats.users),
            "top_chatters": self.top_chatters(limit),
            "channel_peaks": self.channel_peaks(),
            "recent_chat": await self.recent_messages(limit),
            "recent_actions": await self.recent_actions(limit),
            "user_counts": self.user_counts(),
        }


async def replay(
    target: str | os.PathLike[str],
    *,
    until: int | None = None,
    at: int | None = None,
    progress: Progress | None = None,
) -> ReplayResult:
    """Rebuild the projections of the store in ``target`` up to a point.

    ``target`` is a store directory or a ``postgresql://`` URL.

    With neither ``until`` nor ``at`` the whole log is replayed (the state a
    ``connect()`` would build now).  ``until`` is a position (inclusive);
    ``at`` is a Unix timestamp (inclusive): every event whose ``event_time``
    is at most ``at`` is applied, in log order, and the others are skipped.
    Giving both raises :class:`~eventstore.errors.ValidationError`.

    Reads through a read-only log (no lock, nothing written), so it works
    beside a running bot.  ``progress(done, total)`` is called in positions.

    Example::

        async with await replay("data/demo", at=1_762_000_000) as past:
            print(past.top_chatters(5), await past.recent_messages(5))
    """
    if until is not None and at is not None:
        raise ValidationError("give until (a position) or at (a time), not both")
    for name, value in (("until", until), ("at", at)):
        if value is not None and (type(value) is not int or value < 0):
            raise ValidationError(f"{name} must be an int >= 0, got {value!r}")
    d = redact_dsn(str(target)) if is_dsn(target) else os.fspath(target)
    log = await open_log(target, pin_head=True)
    try:
        proj = Projections()
        head = log.head
        stop = head if until is None else min(until, head)
        applied = skipped = records = 0
        async for group in log.read_groups(1, stop):
            if at is None:
                proj.apply_runs(group)
                applied += sum(len(events) - events.count(None) for _, events in group)
            else:
                for first, events in group:
                    for position, event in enumerate(events, first):
                        if event is None:
                            continue  # a hole of a compacted frame
                        if event_time(event) <= at:
                            proj.apply(position, event)
                            applied += 1
                        else:
                            skipped += 1
                            if type(event) in _RECORDS:
                                records += 1
            if progress is not None:
                first, events = group[-1]
                progress(first + len(events) - 1, stop)
        compacted = None
        if isinstance(log, PostgresLog):
            if await log.compactions() != log.pinned_compactions:
                # It deleted rows below the head while they were paged
                # through: a forgotten user's statistics read before it,
                # their UserForgotten gone after it.  No one state.
                raise QueryError(
                    f"{d}: a compaction in another process committed during the replay, "
                    "so what was read is no one state of the store; replay again"
                )
            compacted = await log.compacted_through()
        elif isinstance(log, SegmentLog):
            compacted = log.compacted_through()
        if at is None:
            # The state as of ``stop``, even if compaction dropped the events
            # just before it (they changed no read).
            proj.position = stop
    except BaseException:
        await log.close()
        raise
    return ReplayResult(d, proj, until, at, head, applied, skipped, log, compacted, records)
