"""An event log held in memory: for tests and the test kit (``EventStore(":memory:")``).

It keeps its events across ``close()`` and ``open()``, so a test can reconnect
an adapter and watch it rebuild its projections, exactly as with a log on disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from .errors import ConnectionError, QueryError
from .events import Event
from .log import EventLog

__all__ = ["MemoryLog"]


class MemoryLog(EventLog):
    """Events in a list, gone with the process; what ``EventStore(":memory:")`` opens."""

    def __init__(self) -> None:
        # events[i] is at position i + 1; None marks an event compacted away.
        self.events: list[Event | None] = []
        self._open = False
        self._done: asyncio.Future[None] | None = None

    async def open(self) -> None:
        self._open = True
        # Every append is complete at once, so one resolved future serves all.
        self._done = asyncio.get_running_loop().create_future()
        self._done.set_result(None)

    async def close(self) -> None:
        self._open = False

    @property
    def head(self) -> int:
        return len(self.events)

    def submit(self, events: Sequence[Event]) -> tuple[int, asyncio.Future[None]]:
        if not self._open or self._done is None:
            raise ConnectionError("the memory log is not open")
        first = len(self.events) + 1
        self.events.extend(events)
        return first, self._done

    async def read_runs(
        self, from_position: int = 0, to_position: int | None = None
    ) -> AsyncIterator[tuple[int, list[Event]]]:
        start = max(from_position, 1)
        end = len(self.events) if to_position is None else min(to_position, len(self.events))
        run: list[Event] = []
        run_first = start
        for pos in range(start, end + 1):
            event = self.events[pos - 1]
            if event is None:
                if run:
                    yield run_first, run
                run = []
                run_first = pos + 1
                continue
            run.append(event)
        if run:
            yield run_first, run

    async def fetch(self, positions: Sequence[int]) -> list[Event]:
        out: list[Event] = []
        events = self.events
        for pos in positions:
            event = events[pos - 1] if 0 < pos <= len(events) else None
            if event is None:
                raise QueryError(f"no event at position {pos}")
            out.append(event)
        return out

    def drop(self, positions: Any) -> None:
        """Forget the events at ``positions`` (what compaction does on disk)."""
        for pos in positions:
            self.events[pos - 1] = None
