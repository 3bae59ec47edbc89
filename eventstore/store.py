"""``EventStore``: the StorageAdapter on an append-only event log.

Every write is validated, turned into one event with resolved values, given a
position by the log, applied to the in-memory projections and then awaited
until the log has made it as durable as promised.  Reads are answered by the
projections; history rows (actions, messages) are read back from the log by
position.

Applying before the bytes are durable keeps projections in exactly the log's
order even when many tasks write at once: positions are handed out, and
events applied, synchronously inside the calling task, so nothing can come in
between.  The alternative (apply after the write returns) lets concurrent
callers resume in any order.  A read in this process may therefore see a
write whose ``await`` has not returned yet; it never misses one that has.  If
the log then fails to write, the projections are ahead of the log, so the
store closes itself: the next ``connect()`` rebuilds them from what is on disk.

A log shared by many processes (PostgreSQL) is the exception: positions are
known only at commit, so the store applies nothing of its own and reads the
log forward after each append instead (``_append_shared``).  A failed append
leaves the projections as they were, and the store goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

from projections import Projections
from projections.user_actions import DETAILS_IN_LOG, DETAILS_NONE

from .adapter import StorageAdapter
from .allocator import release_free_memory
from .clock import Clock, system_clock
from .compaction import CompactReport, compact_log, refuse_newer_segments
from .errors import (
    ConnectionError,
    IntegrityError,
    MigrationError,
    StorageError,
    ValidationError,
)
from .events import (
    ChannelPeakRaised,
    Event,
    MessageSaved,
    MessagesCleared,
    SessionEnded,
    UserActionLogged,
    UserCountLogged,
    UserCountsTrimmed,
    UserForgotten,
    UserStatsSaved,
)
from .log import EventLog
from .logthread import outlive_cancels
from .memlog import MemoryLog
from .snapshot import encode_state, load_newest, write_snapshot
from .validation import (
    MAX_INT,
    check_event,
    check_int,
    check_name,
    check_opt_int,
    check_text,
)

__all__ = ["Durability", "EventStore"]

Durability = Literal["fsync", "flush", "none"]
DURABILITY_MODES: tuple[str, ...] = ("fsync", "flush", "none")

#: The path that selects a log held in memory.
MEMORY = ":memory:"


async def _wait_out(fut: asyncio.Future[None] | None) -> None:
    """Wait until ``fut`` is done, if it is pending on this loop (its outcome is not ours)."""
    if fut is not None and not fut.done() and fut.get_loop() is asyncio.get_running_loop():
        await asyncio.wait({fut})


class EventStore(StorageAdapter):
    """The event-sourced adapter.

    ``EventStore(path)`` keeps its log in the directory ``path`` (created on
    first ``connect()``); ``EventStore(":memory:")`` or
    ``EventStore(MemoryLog())`` keeps it in memory.

    Example::

        async with EventStore("data/bot") as store:
            await store.save_message("alice", "hello")
            print(await store.get_recent_messages(limit=10))
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | EventLog = "data",
        *,
        durability: Durability = "fsync",
        read_only: bool = False,
        logger: logging.Logger | None = None,
        clock: Clock | None = None,
        segment_size: int | None = None,
        follow: float | None = None,
        snapshot_every: int | None = 100_000,
    ) -> None:
        super().__init__(logger)
        if not isinstance(path, (str, os.PathLike, EventLog)) or isinstance(path, bytes):
            raise ValidationError(
                "path must be a directory (str or os.PathLike), ':memory:', a postgresql:// "
                f"URL or an EventLog; got {type(path).__name__} {path!r:.60}"
            )
        from .pglog import refuse_other_urls

        refuse_other_urls(path)
        if durability not in DURABILITY_MODES:
            raise ValidationError(
                f"durability must be one of {', '.join(DURABILITY_MODES)}; got {durability!r}"
            )
        self.durability: Durability = durability
        if type(read_only) is not bool:
            raise ValidationError(f"read_only must be True or False, got {read_only!r}")
        self.read_only = read_only
        if clock is not None and not callable(clock):
            raise ValidationError(f"clock must be a callable returning Unix seconds, got {clock!r}")
        self.clock: Clock = clock or system_clock
        self._log = self._make_log(path, segment_size)
        self._proj = Projections()
        self._connected = False
        self._failed: BaseException | None = None
        self._readable = self._writable = False
        if follow is not None and (
            type(follow) not in (int, float) or not 0 < follow < float("inf")
        ):
            raise ValidationError(f"follow must be a positive number of seconds, got {follow!r}")
        if follow is not None and not read_only and not self._log.shared:
            raise ValidationError(
                "follow is for read-only stores: the one writer of a store sees every "
                "event already (a store in PostgreSQL, written by many, is followed anyway)"
            )
        self.follow = follow
        if snapshot_every is not None and (type(snapshot_every) is not int or snapshot_every < 1):
            raise ValidationError(
                f"snapshot_every must be a positive int or None, got {snapshot_every!r}"
            )
        self.snapshot_every = snapshot_every
        self._snap_pos = 0
        self._snap_due: int | None = None
        self._snap_task: asyncio.Task[None] | None = None
        self._closing = False  # from the start of close() to the next connect()
        # Resolved when the close() in progress is over: connect() waits for it.
        self._closed_event: asyncio.Future[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        # The connect() in progress, shared by every caller (see connect()).
        self._opening: asyncio.Future[None] | None = None
        self._connect_waiters = 0
        self._catch_up_lock = asyncio.Lock()
        self._decide_lock = asyncio.Lock()
        self._snap_lock = asyncio.Lock()

    def _make_log(
        self, path: str | os.PathLike[str] | EventLog, segment_size: int | None
    ) -> EventLog:
        if isinstance(path, EventLog):
            self.path: str | None = None
            return path
        if path == MEMORY:
            self.path = None
            return MemoryLog()
        from .pglog import is_dsn

        if is_dsn(path):  # postgresql:// or postgres://, in any case
            from .pglog import PostgresLog  # asyncpg is imported only here

            self.path = None
            return PostgresLog(path, read_only=self.read_only, logger=self.logger)
        from .segmentlog import SegmentLog

        self.path = os.fspath(path)
        log: EventLog = SegmentLog(
            self.path,
            durability=self.durability,
            read_only=self.read_only,
            logger=self.logger,
            **({} if segment_size is None else {"segment_size": segment_size}),
        )
        return log

    # -- lifecycle -----------------------------------------------------------
    async def connect(self) -> None:
        """Open the log and rebuild the read models; on a connected store, nothing.

        Concurrent calls share one opening.  It runs in a task of its own,
        so a caller cancelled half-way (a timeout around connect()) does not
        cut it short: opening the log takes the writer lock, starts threads
        and recovers files, and none of that may be left half-done.  If
        every caller waiting for it is cancelled, the last one lets it
        finish and closes the store again before it raises CancelledError:
        nobody is left to close it, and a retry must find the lock free.
        """
        # A close() in progress goes on after its last await: it would
        # close the log, and drop the follow task, of this open.
        await _wait_out(self._closed_event)
        if self._connected:
            return
        opening = self._opening
        if (
            opening is None
            or opening.done()
            or opening.get_loop() is not asyncio.get_running_loop()
        ):
            opening = asyncio.ensure_future(self._connect())
            self._opening = opening
            opening.add_done_callback(self._opened)
        self._connect_waiters += 1
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            if self._connect_waiters == 1:
                await asyncio.wait({opening})
                # Again: another caller may have joined the opening meanwhile.
                if (
                    self._connect_waiters == 1
                    and not opening.cancelled()
                    and opening.exception() is None
                ):
                    await self.close()
            raise
        finally:
            self._connect_waiters -= 1

    def _opened(self, opening: asyncio.Future[None]) -> None:
        if self._opening is opening:
            self._opening = None
        if not opening.cancelled():
            opening.exception()  # retrieved: every caller may have been cancelled

    async def _connect(self) -> None:
        if self._connected:
            return
        self._set_state(False, None)
        self._closing = False
        await self._log.open()
        try:
            proj = await self._load_snapshot() or Projections()
            self._snap_pos = proj.position
            async for group in self._log.read_groups(proj.position + 1):
                proj.apply_runs(group)
            if not self._log.shared and proj.position < self._log.head:
                # Compaction dropped the last events before the head (a
                # forget_user's own UserForgotten goes with the user's
                # events): no event is left at those positions, so the read
                # models are those of the head.  Without this a reopen
                # without a snapshot reported a lower position than the
                # store had before, and its snapshot was taken there.  (A
                # shared log's head may include other processes' appends not
                # read yet.)
                proj.position = self._log.head
        except BaseException:
            await self._log.close()
            raise
        self._proj = proj
        if self._snapshots_enabled() and self.snapshot_every is not None:
            self._snap_due = self._snap_pos + self.snapshot_every
            if proj.position >= self._snap_due:
                # A long replay is worth saving at once, not one interval later.
                self._start_snapshot()
        self._set_state(True, None)
        self._log.index_in_background()
        self._catch_up_lock = asyncio.Lock()  # bound to this connection's loop
        self._decide_lock = asyncio.Lock()
        # One snapshot at a time, and none while compaction rewrites the
        # log: a snapshot of a moment inside the rewritten range, written
        # after the switch, would describe a log that no longer exists.
        self._snap_lock = asyncio.Lock()
        interval = self.follow if self.follow is not None else (1.0 if self._log.shared else None)
        if interval is not None:
            # A shared log is always followed: other processes write to it.
            self._follower = asyncio.get_running_loop().create_task(
                self._follow(interval), name="eventstore-follow"
            )

    async def close(self) -> None:
        """Write a snapshot if the newest is behind, flush the log and release the store.

        Cancelled before it has marked the store closed (a timeout around
        it), it leaves the store open and working as before: call it again.
        """
        # Closing what a connect() is still opening: let it finish first.
        await _wait_out(self._opening)
        if not self._connected and self._failed is None:
            # Closed, or a close() cancelled after it marked the store closed:
            # the log's close is idempotent and waits for one still running.
            await self._log.close()
            return
        closed = self._closed_event = asyncio.get_running_loop().create_future()
        try:
            await self._close_connected()
        except BaseException:
            if self._connected and self._failed is None:
                # Cancelled before it marked the store closed: the store goes
                # on open, so periodic snapshots go on too (run() and _write
                # start none while _closing is set and _snap_due is None).
                self._closing = False
                if (
                    self._snapshots_enabled()
                    and self.snapshot_every is not None
                    and (self._snap_task is None or self._snap_task.done())
                ):
                    self._snap_due = self._snap_pos + self.snapshot_every
            raise
        finally:
            closed.set_result(None)

    async def _close_connected(self) -> None:
        self._closing = True
        self._snap_due = None  # no periodic snapshot starts from here on (see run())
        snap = self._snap_task
        if snap is not None:
            # asyncio.wait, not await: a close() cancelled here (a timeout
            # around it) must not cancel the snapshot, whose task is then
            # left cancelled for the next close() to raise from.
            await asyncio.wait({snap})
            if not snap.cancelled():
                snap.exception()  # retrieved: run() logged what it could
        # A compaction in progress finishes first: closing the log under its
        # switch would leave it half-done until the next open.
        async with self._snap_lock:
            if (
                self._connected
                and self._failed is None
                and self._snapshots_enabled()
                and self._proj.position > self._snap_pos
            ):
                try:
                    await self._write_snapshot(keep=2)
                except (StorageError, OSError) as err:
                    self.logger.warning("no snapshot written on close: %s", err)
            self._set_state(False, None)
        if self._snap_task is not None:
            self._snap_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._snap_task
            self._snap_task = None
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        await self._log.close()

    @property
    def is_connected(self) -> bool:
        # The log's own failure too: in "none" mode the write that failed
        # has long returned, and the store hears of it at the next write.
        return self._connected and self._failed is None and self._log.stopped is None

    @property
    def log(self) -> EventLog:
        """The event log under this store."""
        return self._log

    @property
    def projections(self) -> Projections:
        """The read models (for tools and tests; the bot uses the methods)."""
        self._check()
        return self._proj

    @property
    def position(self) -> int:
        """The position of the last event applied (0 for an empty store)."""
        return self._proj.position

    def _check(self) -> None:
        if not self._readable:
            self._raise_closed()

    def _check_write(self) -> None:
        if not self._writable:
            self._raise_closed()
            raise ConnectionError("the store is read-only; open it without read_only to write")

    def _raise_closed(self) -> None:
        if self._failed is not None:
            raise ConnectionError(
                f"the store stopped after a failed write ({self._failed}); "
                "close() and connect() again to recover"
            )
        if not self._connected:
            raise ConnectionError("the store is not connected; call connect() first")

    def _set_state(self, connected: bool, failed: BaseException | None) -> None:
        # Every public method tests one of these two flags first.
        self._connected = connected
        self._failed = failed
        self._readable = connected and failed is None
        self._writable = self._readable and not self.read_only

    def _now(self, timestamp: Any, name: str = "timestamp") -> int:
        if timestamp is None:
            return self._clock_now()
        return check_int(name, timestamp)

    def _clock_now(self) -> int:
        """Read the clock, refusing what no timestamp may be.

        Its reading goes into the event as it is: a float (``time.time``
        passed where ``int(time.time())`` was meant) would reach the disk and
        fail every replay after it.
        """
        now = self.clock()
        if type(now) is int and 0 <= now <= MAX_INT:
            return now
        raise ValidationError(
            f"the store's clock returned {now!r} ({type(now).__name__}); a clock must return "
            "whole Unix seconds, an int >= 0 (int(time.time()), not time.time()); "
            "nothing was written"
        )

    async def _write(self, event: Event) -> None:
        """Append one event, apply it, and wait until it is durable."""
        if self._log.shared:
            await self._append_shared((event,))
            return
        position, done = self._log.submit((event,))
        self._proj.apply(position, event)
        if self._snap_due is not None and position >= self._snap_due:
            self._start_snapshot()
        if done.done() and done.exception() is None:
            return  # "none" mode: one coroutine call less per write
        await self._wait(done)

    async def _append_shared(self, events: Sequence[Event]) -> int:
        """Append to a log other processes write too, then catch up through it.

        Positions are known only once the log has committed, and other
        writers' events may come first; so this store applies nothing of its
        own directly, it reads the log forward, in log order, until its own
        events are in.  Decisions taken before the append (is this a new
        peak?) may be stale by then; the folds re-check them (see
        projections/channel_stats.py).

        A failed append does not stop the store, unlike a local log's failed
        write: nothing was applied before the commit, so the projections are
        never ahead of the log, and reads (and later writes, on a connection
        opened again) go on.  Whether an append lost with its connection
        during COMMIT is in the log, the follower finds out.

        Once the append has committed, the write has succeeded whatever
        follows: if catching up through it fails for a while (the connection
        lost just then, a lock timeout), this logs a warning and returns
        normally.  An error here
        would read as "not written" and a retrying caller would append the
        events a second time; instead the follower (or the next write that
        decides, or refresh()) catches up when the log answers again.  Until
        then a read in this process may not show the write yet.  A row this
        code cannot decode will not pass: the store stops (as the follower
        does), and the error says the write was committed.
        """
        first = await self._log.append(events)
        last = first + len(events) - 1
        try:
            await self._catch_up(last)
        except (IntegrityError, MigrationError) as err:
            # Not a passing loss: the log cannot be read on from here (a row
            # this code cannot decode), and the follower has stopped at the
            # same place.  Returning would pass for a write the store shows;
            # the plain error would pass for a write that failed.
            self._fail(err)
            raise StorageError(
                f"the events were committed at positions {first}..{last}, but reading the "
                f"log back failed ({err}); the store has stopped (close() and connect() "
                "again); do not retry the write: it is in the log"
            ) from err
        except StorageError as err:
            # A lost connection, or a query that failed for a while (a lock
            # timeout): the follower retries these too.
            self.logger.warning(
                "positions %d..%d were committed, but reading them back failed (%s); "
                "reads show them once the store catches up",
                first,
                last,
                err,
            )
        return first

    @contextlib.asynccontextmanager
    async def _deciding(self) -> AsyncIterator[None]:
        """Hold while a write whose result depends on the projections decides.

        Local logs apply a write before anything else can run, so callers
        always decide on the current state.  On a shared log the decision and
        its apply are a commit apart, and concurrent callers in this process
        would all decide on the same state (20 end_session calls would each
        report the whole session).  So these writes take turns here, after
        catching up.  Another process can still come in between; the folds
        re-check, but the value returned may then be stale.
        """
        if not self._log.shared:
            yield
            return
        async with self._decide_lock:
            await self._catch_up()
            yield

    async def _fetch_rows(
        self, positions_of: Callable[[], list[int]]
    ) -> tuple[list[int], list[Event]]:
        """The events at the positions the projections name for a read, fetched from the log.

        On a shared log a compaction in another process may have deleted
        rows these projections still name: rows a clear, a trim or a forget
        dropped that this process has not read yet (catching up brings it
        in), or the rows of a user forgotten while this process had read
        some of the user's rows but not the ``UserForgotten``, which the
        same compaction deleted (only building the read models again drops
        them).  Either way the read is answered from the log as it is now;
        left alone it would fail (QueryError) until a reconnect.
        """
        positions = positions_of()
        if not positions:
            return positions, []
        if not self._log.shared:
            return positions, await self._log.fetch(positions)
        from .pglog import RowsMissing

        try:
            return positions, await self._log.fetch(positions)
        except RowsMissing:
            await self._catch_up()
        positions = positions_of()
        proj = self._proj
        try:
            return positions, await self._log.fetch(positions)
        except RowsMissing:
            # Concurrent reads that all miss rows rebuild once, not each in turn.
            await self._rebuild(unless_replaced=proj)
        positions = positions_of()
        return positions, await self._log.fetch(positions)

    async def _catch_up(self, through: int | None = None) -> None:
        """Apply the log's events past our position (at least through ``through``)."""
        async with self._catch_up_lock:
            proj = self._proj
            if through is not None and proj.position >= through:
                return
            async for group in self._log.read_groups(proj.position + 1):
                proj.apply_runs(group)

    async def _wait(self, done: asyncio.Future[None]) -> None:
        if done.done() and done.exception() is None:
            return
        try:
            await done
        except StorageError as err:
            self._fail(err)
            raise
        except asyncio.CancelledError:
            # The event was accepted and applied; cancelling the wait does not
            # take it back, it only stops waiting for durability.
            raise

    def _fail(self, err: BaseException) -> None:
        if self._failed is None:
            self._set_state(self._connected, err)
            self.logger.error("write failed, store stopped until reconnect: %s", err)

    # -- user statistics ---------------------------------------------------------
    async def save_user_stats(
        self,
        username: str,
        first_seen: int | None = None,
        last_seen: int | None = None,
        chat_lines: int | None = None,
        time_connected: int | None = None,
        session_start: int | None = None,
    ) -> None:
        self._check_write()
        # The most frequent write (once per chat line): arguments left out
        # are None and skip their check without a call.
        event = UserStatsSaved(
            check_name("username", username),
            self._clock_now(),
            None if first_seen is None else check_int("first_seen", first_seen),
            None if last_seen is None else check_int("last_seen", last_seen),
            0 if chat_lines is None else check_int("chat_lines", chat_lines),
            0 if time_connected is None else check_int("time_connected", time_connected),
            None if session_start is None else check_int("session_start", session_start),
        )
        if self._proj.user_stats.would_change(event):
            await self._write(event)

    async def end_session(self, username: str, timestamp: int | None = None) -> int:
        """Close ``username``'s open session at ``timestamp`` (default now).

        Adds ``max(0, timestamp - session_start)`` to ``total_time_connected``,
        raises ``last_seen`` to ``timestamp`` if later, clears the session and
        returns the seconds added.  Without an open session it changes nothing
        and returns 0.
        """
        self._check_write()
        check_name("username", username)
        ts = self._now(timestamp)
        async with self._deciding():
            rec = self._proj.user_stats.users.get(username)
            if rec is None or rec[4] is None:
                return 0
            seconds = max(0, ts - int(rec[4]))
            self._proj.user_stats.check_session_end(username, seconds)
            await self._write(SessionEnded(username, ts, seconds))
        return seconds

    async def get_user_stats(self, username: str) -> dict[str, Any] | None:
        self._check()
        return self._proj.user_stats.get(check_name("username", username))

    async def get_all_user_stats(
        self, limit: int | None = None, offset: int = 0
    ) -> list[dict[str, Any]]:
        self._check()
        return self._proj.user_stats.all(check_opt_int("limit", limit), check_int("offset", offset))

    # -- user actions ---------------------------------------------------------------
    async def log_user_action(
        self,
        username: str,
        action_type: str,
        details: str | None = None,
        timestamp: int | None = None,
    ) -> None:
        self._check_write()
        event = UserActionLogged(
            self._now(timestamp),
            check_name("username", username),
            check_name("action_type", action_type),
            check_text("details", details, optional=True),
        )
        await self._write(event)

    async def get_user_actions(
        self,
        username: str | None = None,
        action_type: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        self._check()
        if username is not None:
            check_name("username", username)
        if action_type is not None:
            check_name("action_type", action_type)
        limit, offset = check_int("limit", limit), check_int("offset", offset)
        if username is not None:
            return await self._user_actions(username, action_type, limit, offset)
        positions, events = await self._fetch_rows(
            lambda: self._proj.actions.positions(username, action_type, limit, offset)
        )
        return [
            {
                "id": pos,
                "timestamp": ev.timestamp,
                "username": ev.username,
                "action_type": ev.action_type,
                "details": ev.details,
            }
            for pos, ev in zip(positions, events, strict=True)
            if isinstance(ev, UserActionLogged)
        ]

    async def _user_actions(
        self, username: str, action_type: str | None, limit: int, offset: int
    ) -> list[dict[str, Any]]:
        """One user's actions, answered from memory (long details from the log)."""
        rows: list[Any] = []
        # The details names of the read models the rows came from: their
        # codes mean nothing in others, and a rebuild (a follower's refresh,
        # or another read's, see _fetch_rows) may replace them during the fetch.
        names: list[str] = []

        def positions() -> list[int]:
            nonlocal rows, names
            actions = self._proj.actions
            rows = actions.user_rows(username, action_type, limit, offset)
            names = actions.details.names
            return [pos for pos, _, _, code in rows if code == DETAILS_IN_LOG]

        in_log, events = await self._fetch_rows(positions)
        fetched = dict(zip(in_log, events, strict=True)) if in_log else {}
        out = []
        for pos, ts, kind, code in rows:
            if code >= 0:
                details: str | None = names[code]
            elif code == DETAILS_NONE:
                details = None
            else:
                event = fetched[pos]
                assert isinstance(event, UserActionLogged)
                details = event.details
            out.append(
                {
                    "id": pos,
                    "timestamp": ts,
                    "username": username,
                    "action_type": kind,
                    "details": details,
                }
            )
        return out

    # -- channel peaks ----------------------------------------------------------------
    async def update_channel_stats(
        self,
        max_users: int | None = None,
        max_connected: int | None = None,
        timestamp: int | None = None,
    ) -> None:
        self._check_write()
        users, connected = self._proj.channel.raised(
            check_opt_int("max_users", max_users), check_opt_int("max_connected", max_connected)
        )
        ts = self._now(timestamp)
        if users is None and connected is None:
            return
        await self._write(ChannelPeakRaised(ts, users, connected))

    async def get_channel_stats(self) -> dict[str, Any]:
        self._check()
        return self._proj.channel.get()

    # -- user counts --------------------------------------------------------------------
    async def log_user_count(
        self, chat_users: int, connected_users: int, timestamp: int | None = None
    ) -> None:
        self._check_write()
        event = UserCountLogged(
            self._now(timestamp),
            check_int("chat_users", chat_users),
            check_int("connected_users", connected_users),
        )
        await self._write(event)

    async def get_user_count_history(
        self,
        start_time: int | None = None,
        end_time: int | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        self._check()
        return self._proj.counts.history(
            check_opt_int("start_time", start_time),
            check_opt_int("end_time", end_time),
            check_opt_int("limit", limit),
        )

    # -- recent chat ------------------------------------------------------------------------
    async def save_message(self, username: str, message: str, timestamp: int | None = None) -> None:
        self._check_write()
        event = MessageSaved(
            self._now(timestamp),
            check_name("username", username),
            check_text("message", message),  # type: ignore[arg-type]
        )
        await self._write(event)

    async def get_recent_messages(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        self._check()
        limit, offset = check_int("limit", limit), check_int("offset", offset)
        positions, events = await self._fetch_rows(
            lambda: self._proj.messages.positions(limit, offset)
        )
        return [
            {
                "id": pos,
                "timestamp": ev.timestamp,
                "username": ev.username,
                "message": ev.message,
            }
            for pos, ev in zip(positions, events, strict=True)
            if isinstance(ev, MessageSaved)
        ]

    async def clear_old_messages(self, keep_count: int = 1000) -> int:
        self._check_write()
        keep = check_int("keep_count", keep_count)
        async with self._deciding():
            deleted = max(0, len(self._proj.messages) - keep)
            if deleted:
                await self._write(MessagesCleared(keep, deleted, self._clock_now()))
        return deleted

    # -- beyond the contract ---------------------------------------------------------------
    async def forget_user(
        self,
        username: str,
        timestamp: int | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> bool:
        """Forget ``username``: stats, actions and messages, in every read and on disk.

        Appends a ``UserForgotten`` event, after which no read returns
        anything of that user.  On a store in a directory it then seals the
        active segment and compacts, so that no segment and no snapshot holds
        the user's data or the name as a username any more (a name other users
        typed in their own messages is theirs and stays).  On PostgreSQL it
        decides after reading the log to its end (a user another process has
        just written is forgotten too) and compacts, which deletes the user's
        rows (``eventstore/pgcompaction.py``).

        Returns False, and writes nothing, if the store keeps nothing of
        that user.  A user no read returns may still have events on disk
        (see ``erasure_unfinished``): an earlier forget whose compaction
        never ran, or chat lines ``clear_old_messages`` removed from the
        reads.  Then nothing is appended, the compaction erases them, and it
        returns True.  Telling this takes a read of the log: of its bytes,
        decoding only the frames that hold the name's.

        ``progress(done, total)`` is passed to the compaction (see ``compact``).
        """
        self._check_write()
        check_name("username", username)
        ts = self._now(timestamp)
        # On a shared log, decide on the log as it is now, not on what this
        # process last read: another process may just have written the user.
        async with self._deciding():
            if self.knows_user(username):
                await self._write(UserForgotten(username, ts))
            elif not await self.erasure_unfinished(username):
                return False
        if not (self._snapshots_enabled() or self._log.shared):
            return True  # in memory, or read-only: nothing stored to erase
        try:
            # On PostgreSQL this deletes the user's rows.
            await self.compact(progress=progress)
        except MigrationError as err:
            # Segments of a newer release: calling again cannot help here.
            raise MigrationError(
                f"{username!r} is forgotten in every read, but this release cannot erase "
                f"them from the files: {err}"
            ) from err
        except (StorageError, OSError) as err:
            # The UserForgotten is in the log: the error of the compaction
            # alone ("nothing was changed") would read as a forget that
            # did not happen, and one that did as nothing left to do.
            where = "rows" if self._log.shared else "files"
            why = (
                f"{username!r} is forgotten in every read, but erasing them from the "
                f"{where} may be unfinished: {err}; call forget_user({username!r}) again "
                "(once there is room on the disk, or after connect() if the store "
                "stopped) to finish"
            )
            cls = type(err) if isinstance(err, StorageError) else StorageError
            raise cls(why) from err
        if self._snapshots_enabled():
            # Keep only a fresh snapshot.  (The compaction already removed
            # every snapshot from before the forget, which held the user.)
            try:
                await self.write_snapshot(keep=1)
            except (StorageError, OSError) as err:
                self.logger.warning("forgot %r, but no snapshot written: %s", username, err)
        return True

    async def erasure_unfinished(self, username: str) -> bool:
        """True if the store keeps events of ``username`` that no read returns.

        ``forget_user`` then has something to erase although ``knows_user``
        says False: a forget whose compaction never ran (the process died,
        or close() came first), or chat lines ``clear_old_messages`` removed
        from the reads and no compaction has dropped yet.  The segment log
        reads its files to tell, decoding only the frames that hold the
        name's bytes; PostgreSQL looks for a row.  A store in memory says
        False.
        """
        self._check()
        check_name("username", username)
        return not self.knows_user(username) and await self._log.holds_user(username)

    async def compact(
        self,
        *,
        dry_run: bool = False,
        keep_history_days: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> CompactReport:
        """Rewrite sealed segments without what no read can see any more.

        Seals the active segment first, so everything written so far is
        compacted.  With ``keep_history_days`` it first records a retention
        decision (a ``UserCountsTrimmed`` event: user counts older than that
        many days are gone from every read) and then compacts.  Raises
        IntegrityError, changing nothing, if the rewritten log would not give
        exactly the same projections.  ``dry_run`` reports what would be
        reclaimed and changes nothing.  On PostgreSQL the same rows are
        deleted in one transaction instead (``eventstore/pgcompaction.py``).
        """
        # A dry run only reads: it works on a read-only store too (beside a
        # running bot, for one).
        if dry_run:
            self._check()
        else:
            self._check_write()
        from .pglog import PostgresLog
        from .segmentlog import SegmentLog

        log = self._log
        if not isinstance(log, (SegmentLog, PostgresLog)):
            raise StorageError("only stores in a directory or in PostgreSQL are compacted")
        if isinstance(log, SegmentLog) and not dry_run:
            # Before anything is written (the trim, the roll): refused, this
            # changes nothing.  (Only this writer appends from here on, in
            # its own schema: the segments it would find later are the same.)
            refuse_newer_segments(log.segments)
        trim_before = None
        if keep_history_days is not None:
            days = check_int("keep_history_days", keep_history_days)
            now = self._clock_now()
            trim_before = max(0, now - days * 86_400)
            would_trim = self._proj.counts.index.range(None, trim_before - 1)[1]
            if would_trim and not dry_run:
                await self._write(UserCountsTrimmed(trim_before, now))
        # Under the snapshot lock, which close() takes too: it waits for a
        # compaction to finish instead of closing the log under it.
        async with self._snap_lock:
            # Again: close() may have taken the lock first, and closed the log.
            self._check() if dry_run else self._check_write()
            options: dict[str, Any] = {
                "dry_run": dry_run,
                "trim_before": trim_before if dry_run else None,
                "progress": progress,
                "logger": self.logger,
            }
            report: CompactReport
            if isinstance(log, PostgresLog):  # a delete in one transaction: pgcompaction.py
                from .pgcompaction import compact_postgres

                report = await compact_postgres(log, **options)
            else:
                if not dry_run:
                    await log.roll()
                try:
                    report = await compact_log(log, **options)
                finally:
                    if log.switch_unfinished:
                        # Committed, but the files moved under this open's
                        # list of segments (an error, or a cancel, in the
                        # switch): stop until connect() finishes the switch.
                        self._fail(
                            StorageError(
                                f"{log.directory}: compaction committed but did not finish "
                                "moving its segments"
                            )
                        )
                if not dry_run and report.segments_rewritten:
                    # Frames moved: older snapshots name frames that are gone,
                    # and connect() and verify would only ignore or report them.
                    try:
                        await self._write_snapshot(keep=1)
                    except (StorageError, OSError) as err:
                        # The compaction is committed and done; a snapshot
                        # only saves replay time (on a full disk there may be
                        # no room for one).  Raising would report a rewrite
                        # that happened as one that failed.
                        self.logger.warning("compacted, but no snapshot written: %s", err)
            # Its replays' read models are gone: let the process's memory
            # go back to what the store holds (see eventstore/allocator.py).
            release_free_memory()
        report.trimmed_before = trim_before
        return report

    def knows_user(self, username: str) -> bool:
        """True if some read returns something of ``username`` (what forget_user erases)."""
        self._check()
        check_name("username", username)
        proj = self._proj
        return (
            username in proj.user_stats.users
            or proj.actions.has_user(username)
            or self._has_messages(username)
        )

    def _has_messages(self, username: str) -> bool:
        code = self._proj.messages.users.get(username)
        return code is not None and code in self._proj.messages.index.code

    # -- snapshots ---------------------------------------------------------------------
    def _snapshots_enabled(self) -> bool:
        from .segmentlog import SegmentLog

        return isinstance(self._log, SegmentLog) and not self.read_only

    async def _load_snapshot(self) -> Projections | None:
        from .segmentlog import SegmentLog

        if not isinstance(self._log, SegmentLog):
            return None
        return await load_newest(self._log.directory, self._log, self.logger)

    def _start_snapshot(self) -> None:
        self._snap_due = None  # until this one is done

        async def run() -> None:
            failed = True
            try:
                await self.write_snapshot()
                failed = False
            except (StorageError, OSError) as err:
                self.logger.warning("periodic snapshot failed: %s", err)
            finally:
                # After any failure (a full disk; no memory to serialise the
                # projections) the next try waits another snapshot_every
                # events: counted from the last snapshot that succeeded,
                # every following write would try again at once.
                base = self._snap_pos
                if failed:
                    base = max(base, self._proj.position)
                if self.snapshot_every is not None and not self._closing:
                    self._snap_due = base + self.snapshot_every

        self._snap_task = asyncio.get_running_loop().create_task(run(), name="eventstore-snapshot")

    async def write_snapshot(self, *, keep: int = 2) -> str:
        """Save the projections now, so the next connect() replays only what follows.

        Returns the snapshot's path.  Also done on ``close()`` and every
        ``snapshot_every`` events.  Only a writer of a store in a directory
        keeps snapshots: elsewhere this raises (StorageError in memory or on
        PostgreSQL, ConnectionError on a read-only store).
        """
        self._check_write()
        async with self._snap_lock:
            self._check_write()  # close() may have had the lock first
            return await self._write_snapshot(keep)

    async def _write_snapshot(self, keep: int) -> str:
        from .segmentlog import SegmentLog

        if type(keep) is not int or keep < 1:
            raise ValidationError(f"keep must be an int of at least 1, got {keep!r}")

        log = self._log
        if not isinstance(log, SegmentLog):
            raise StorageError("only stores in a directory keep snapshots")
        proj = self._proj
        position = proj.position
        if position == 0:
            raise StorageError("nothing to snapshot: the store is empty")
        # Serialise now, while the state is exactly ``position``; the log may
        # still be writing up to it, so wait for that before naming its frame.
        payload = encode_state(proj)
        await log.flush()
        # Right after a compaction the segment holding ``position`` is new,
        # and naming its frame would first walk it, here on the loop.
        await log.index_for([position])
        checksum = log.frame_checksum(position)
        if checksum is None:
            raise StorageError(f"position {position} is not in the log; no snapshot written")
        assert log.store_id is not None
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(
            None, write_snapshot, log.directory, log.store_id, position, payload, checksum, keep
        )
        try:
            path = await asyncio.shield(job)
        except asyncio.CancelledError:
            # The thread writes the file, and removes the other snapshots,
            # whatever the caller does: it keeps the snapshot lock until that
            # is done.  Let go early, and a compaction could run meanwhile
            # (a forget_user's, say): this snapshot of the old log would then
            # land after it and remove the compaction's own, newer one.
            await outlive_cancels(job)
            if not job.cancelled():
                job.exception()  # retrieved: the caller was cancelled, and hears that
            raise
        self._snap_pos = max(self._snap_pos, position)
        await log.save_tail_index()
        return path

    async def refresh(self) -> int:
        """Bring in events another process appended since; return how many.

        For read-only stores that watch a live writer (a dashboard, the CLI's
        ``tail -f``).  A writer sees all its own events already.
        """
        self._check()
        before = self._proj.position
        if self._log.refresh_pending:
            # A look stopped at the end of files a compaction replaced, and
            # its refresh was cancelled before it read up to there (the look
            # goes on without it).  Read that first: the next look takes up
            # the new files, which may no longer hold it (a UserForgotten),
            # and nothing would then tell that it was missed.
            await self._catch_up()
        await self._log.refresh()
        await self._catch_up()
        while self._log.refresh_pending:
            # The log stopped at the end of files a compaction replaced:
            # what they held last is read, now the new files.
            await self._log.refresh()
            await self._catch_up()
        if self._log.history_lost:
            await self._rebuild()  # if it fails, the next refresh() tries again
            self._log.history_rebuilt()
        return self._proj.position - before

    async def _rebuild(self, unless_replaced: Projections | None = None) -> None:
        """Build the read models again, as connect() does (a follower that missed history).

        With ``unless_replaced``: not if the read models are no longer those
        (another caller rebuilt them while this one waited for the lock).
        """
        async with self._catch_up_lock:
            if unless_replaced is not None and self._proj is not unless_replaced:
                return
            proj = await self._load_snapshot() or Projections()
            async for group in self._log.read_groups(proj.position + 1):
                proj.apply_runs(group)
            self._proj = proj
        self.logger.warning(
            "%s: a compaction dropped events this follower had not read; its read "
            "models were built again (up to position %d)",
            self.path if self.path is not None else getattr(self._log, "where", "the log"),
            proj.position,
        )

    async def _follow(self, interval: float) -> None:
        while True:
            # Shared logs wake this early when something was appended
            # (PostgreSQL: LISTEN/NOTIFY); others just sleep.
            await self._log.wait_for_appends(interval)
            try:
                await self.refresh()
            except IntegrityError as err:
                # The log does not continue what this store has read (damage,
                # or frames taken back): looking again would fail the same
                # way every interval.  Reads go on answering from what was read.
                self.logger.error("follow stopped: %s", err)
                return
            except StorageError as err:
                self.logger.warning("follow: refresh failed: %s", err)

    async def append(self, events: Sequence[Event]) -> int:
        """Append ready-made events as one batch, apply them, wait until durable.

        For tools that write history directly (the legacy import, the test
        kit's "given").  The events are taken as facts: no write rule is
        applied, but each field is checked as the write methods check their
        arguments (ValidationError, and nothing is appended).  Returns the
        position of the first event.
        """
        self._check_write()
        events = list(events)
        if not events:
            return self._log.head + 1
        for event in events:
            check_event(event)
        if self._log.shared:
            # Checked on the log as it is now, not on what this process last
            # read (another process may have raised a total since).
            async with self._deciding():
                self._proj.user_stats.check_batch(events)
                return await self._append_shared(events)
        self._proj.user_stats.check_batch(events)
        first, done = self._log.submit(events)
        self._proj.apply_run(first, events)
        await self._wait(done)
        return first

    async def read(
        self, from_position: int = 0, to_position: int | None = None
    ) -> AsyncIterator[tuple[int, Event]]:
        """Yield (position, event) for every event in the log, oldest first."""
        self._check()
        check_int("from_position", from_position)
        check_opt_int("to_position", to_position)
        async for item in self._log.read(from_position, to_position):
            yield item
