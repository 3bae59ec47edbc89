"""The test kit: a fake clock, the storage contract suite and event-stream assertions.

``pip install eventstore[test]`` brings what it needs (pytest, pytest-asyncio).
The pytest plugin in :mod:`eventstore.testing.plugin` is registered as an
entry point and adds the fixtures ``fake_clock``, ``memory_store`` and
``disk_store``.
"""

from .clock import DEFAULT_START, FakeClock
from .contract import StorageContract, read_state
from .streams import EventSource, Expected, Match, Scenario, assert_events, recorded_events

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
