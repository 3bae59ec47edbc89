"""The contract suite against the segment-file log (tiny segments, so rolls happen)."""

from __future__ import annotations

from pathlib import Path

from eventstore import EventStore, StorageAdapter
from eventstore.testing import FakeClock, StorageContract


class TestSegmentLogContract(StorageContract):
    def make_store(self, clock: FakeClock, tmp_path: Path) -> StorageAdapter:
        return EventStore(tmp_path / "store", clock=clock, segment_size=4096, snapshot_every=50)


class TestSegmentLogContractFlush(StorageContract):
    def make_store(self, clock: FakeClock, tmp_path: Path) -> StorageAdapter:
        return EventStore(tmp_path / "store", clock=clock, durability="flush", segment_size=4096)


class TestSegmentLogContractNone(StorageContract):
    def make_store(self, clock: FakeClock, tmp_path: Path) -> StorageAdapter:
        return EventStore(tmp_path / "store", clock=clock, durability="none", segment_size=4096)
