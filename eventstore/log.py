"""The log seam: what the adapter needs from an event log.

Three implementations plug in here: :class:`~eventstore.memlog.MemoryLog`
(tests, the test kit), the segment-file log (the embedded default) and
the PostgreSQL log, which many processes share.  The seam is deliberately narrow: append a batch,
read from a position, fetch a few positions, close.

Positions start at 1 and increase by one per event in append order.  They
never change, even when compaction drops events, and they double as the ids of
rows (actions, user counts, messages), so an id is stable for ever.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence

from .events import Event

__all__ = ["EventLog", "Group"]

#: What ``EventLog.read_groups`` yields: runs of (first position, events), in
#: order, the events of a run at consecutive positions; None in a run stands
#: for a position without an event.
Group = list[tuple[int, Sequence[Event | None]]]


class EventLog(ABC):
    """An append-only sequence of events addressed by position."""

    #: True if other processes may append to the same log (PostgreSQL): the
    #: adapter then applies events only in the order the log returns them.
    shared: bool = False

    @abstractmethod
    async def open(self) -> None:
        """Open (and recover) the log.  Raises ConnectionError if it cannot."""

    @abstractmethod
    async def close(self) -> None:
        """Flush what was accepted and release every resource.  Idempotent."""

    @property
    def stopped(self) -> BaseException | None:
        """The failed write that stopped this log, or None.

        A local log that writes in the background ("none" mode) learns of a
        failure after the call that caused it returned.
        """
        return None

    @property
    @abstractmethod
    def head(self) -> int:
        """The position of the last event accepted (0 for an empty log)."""

    async def append(self, events: Sequence[Event]) -> int:
        """Append ``events`` durably; return the position of the first.

        Shared logs implement this (positions are known only at commit);
        local logs get it from ``submit``.
        """
        first, done = self.submit(events)
        await done
        return first

    async def wait_for_appends(self, timeout: float) -> None:
        """Return when new events may have been appended, or after ``timeout``."""
        await asyncio.sleep(timeout)

    @abstractmethod
    def submit(self, events: Sequence[Event]) -> tuple[int, asyncio.Future[None]]:
        """Accept ``events`` now and return (first position, durability future).

        Positions are assigned at once and in call order, so the caller can
        apply the events to its projections before the bytes are written.  The
        future resolves when the events are as durable as the log's mode
        promises, or fails with StorageError.  Only non-shared logs implement it.
        """

    @abstractmethod
    def read_runs(
        self, from_position: int = 0, to_position: int | None = None
    ) -> AsyncIterator[tuple[int, list[Event]]]:
        """Yield (first position, events) runs covering the range, in order.

        The events of one run have consecutive positions.  ``to_position`` is
        inclusive.  Events dropped by compaction are skipped.  Replay uses this
        form: one iteration step per run instead of per event.
        """

    async def read_groups(
        self, from_position: int = 0, to_position: int | None = None
    ) -> AsyncIterator[Group]:
        """Yield the runs of ``read_runs``, several at a time, as lists.

        Replay folds a group per async step.  Where runs are short (after a
        compaction, whose kept events are rarely neighbours), a step per
        run took more time than folding its events.

        A run here may also hold None at a position without an event: the
        segment log's compacted frames hold their events with such holes
        between them, as a PostgreSQL page does its rows after a
        compaction, and splitting the runs at every hole would make them
        short again.  ``read_runs`` never yields a None.

        This default yields one run per group; logs that decode many runs
        at once yield them together.
        """
        async for first, events in self.read_runs(from_position, to_position):
            yield [(first, events)]

    async def read(
        self, from_position: int = 0, to_position: int | None = None
    ) -> AsyncIterator[tuple[int, Event]]:
        """Yield (position, event) for every stored event in the range, in order."""
        async for first, events in self.read_runs(from_position, to_position):
            for i, event in enumerate(events):
                yield first + i, event

    #: A log pinned at a head (a PostgreSQL reader for an export): how many
    #: compactions had committed when it was pinned; None otherwise.
    pinned_compactions: int | None = None

    async def compactions(self) -> int | None:
        """How many compactions have committed, for a reader that must notice a new one.

        On a log other processes compact (PostgreSQL), a compaction deletes
        rows while a reader pages through them, and an export read across
        it would be no one state of the log.  None where readers are not
        affected: a directory's read-only log keeps reading the files it
        opened.
        """
        return None

    async def holds_user(self, username: str) -> bool:
        """Does the log still store an event whose user is ``username``?

        For ``forget_user`` of a name no read knows: events of that user may
        still be stored where no read returns them (chat lines
        ``clear_old_messages`` removed from the reads, or a forget whose
        compaction never ran), until a compaction drops them.  Logs that
        keep nothing on disk, and so have nothing to erase, say False.
        """
        return False

    def index_in_background(self) -> None:
        """Start whatever makes the first reads after connect() faster (optional).

        The adapter calls it once its projections are rebuilt.  Logs with
        nothing to prepare do nothing.
        """
        return None

    async def refresh(self) -> int:
        """Pick up events other processes appended since; return the new head.

        Logs written only by this process have nothing to pick up.  A log
        may stop short of the writer's head (``refresh_pending``): read up
        to the head it returned, then refresh again.
        """
        return self.head

    @property
    def refresh_pending(self) -> bool:
        """True if the last refresh() stopped short; see refresh()."""
        return False

    @property
    def history_lost(self) -> bool:
        """True if refresh() found that events this reader never read were dropped.

        A reader's state built from what it read is then not to be trusted:
        build it again, then call history_rebuilt().  Logs that drop
        nothing under a reader say False.
        """
        return False

    def history_rebuilt(self) -> None:
        """The reader built its state again (see history_lost)."""
        return None

    @abstractmethod
    async def fetch(self, positions: Sequence[int]) -> list[Event]:
        """Return the events at ``positions`` (any order), in the order asked.

        Raises QueryError if a position holds no event, and IntegrityError
        if the log is known to have lost the events there.
        """
