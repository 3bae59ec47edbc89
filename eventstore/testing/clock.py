"""A clock the test decides: ``FakeClock`` stands in for ``system_clock``.

The store reads its clock once per accepted write and records the reading in
the event.  A test that owns the clock can therefore say exactly what "now"
was, move it between calls, and count how often the store asked: replay on
``connect()`` must not ask at all.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_START", "FakeClock"]

#: 2023-11-14 22:13:20 UTC: a round, recent, obviously fake instant.
DEFAULT_START = 1_700_000_000


def _check_ts(name: str, value: Any) -> int:
    # The store only ever sees what the clock returns, so a bad value here
    # would surface far from its cause; reject it where it is set.
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


class FakeClock:
    """A callable returning whole Unix seconds that only moves when told to.

    ``clock()`` returns :attr:`now` and counts the call in :attr:`calls`;
    ``clock.now = ts`` or ``clock.set(ts)`` jumps, ``clock.advance(s)`` moves on.
    With ``tick=n`` every read also moves the clock ``n`` seconds on, after
    returning: a store that reads the clock twice for one write then records
    two different "nows", which a test can see.

    Example::

        clock = FakeClock(1_000)
        store = EventStore(":memory:", clock=clock)
        ...
        clock.advance(60)
    """

    __slots__ = ("_now", "_tick", "calls")

    def __init__(self, start: int = DEFAULT_START, *, tick: int = 0) -> None:
        self._now = _check_ts("start", start)
        self._tick = _check_ts("tick", tick)
        #: How many times the clock was read (by the store or anyone else).
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        now = self._now
        self._now += self._tick
        return now

    @property
    def tick(self) -> int:
        """Seconds every read moves the clock on (after returning)."""
        return self._tick

    @tick.setter
    def tick(self, value: int) -> None:
        self._tick = _check_ts("tick", value)

    @property
    def now(self) -> int:
        """The time the clock returns; setting it does not count as a read."""
        return self._now

    @now.setter
    def now(self, value: int) -> None:
        self._now = _check_ts("now", value)

    def set(self, ts: int) -> None:
        """Jump to ``ts`` (backwards too: clocks do that)."""
        self.now = ts

    def advance(self, seconds: int = 1) -> int:
        """Move forward by ``seconds`` (>= 0) and return the new time."""
        self._now += _check_ts("seconds", seconds)
        return self._now

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now}, tick={self._tick}, calls={self.calls})"
