"""The storage contract, run against the store with its log in memory."""

from __future__ import annotations

from pathlib import Path

from eventstore import EventStore, StorageAdapter
from eventstore.testing import FakeClock, StorageContract


class TestMemoryStore(StorageContract):
    # The MemoryLog lives in the EventStore object and keeps its events across
    # close() and connect(), so the contract's reopen (same object) replays it.
    def make_store(self, clock: FakeClock, tmp_path: Path) -> StorageAdapter:
        return EventStore(":memory:", clock=clock)
