"""The test kit: a fake clock, the storage contract suite and event-stream assertions.

The ``test`` extra (``pip install 'eventstore[test]'``, or ``pip install -e
'.[test]'`` in a checkout) brings what it needs (pytest, pytest-asyncio).
The clock and the stream assertions need neither: the contract suite, which
does, is imported only when asked for.
The pytest plugin in :mod:`eventstore.testing.plugin` is registered as an
entry point and adds the fixtures ``fake_clock``, ``memory_store`` and
``disk_store``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .clock import DEFAULT_START, FakeClock
from .streams import EventSource, Expected, Match, Scenario, assert_events, recorded_events

if TYPE_CHECKING:
    from .contract import StorageContract, read_state

__all__ = [
    "DEFAULT_START",
    "EventSource",
    "Expected",
    "FakeClock",
    "Match",
    "Scenario",
    "StorageContract",
    "assert_events",
    "read_state",
    "recorded_events",
]


def __getattr__(name: str) -> Any:
    if name in ("StorageContract", "read_state"):
        from . import contract

        return getattr(contract, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
