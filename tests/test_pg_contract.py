"""The storage contract, run against the store with its log in PostgreSQL.

Each test gets a new, empty schema of one session database (about 1 ms)
rather than a database of its own (about 0.1 s, which over the suite's 300+
tests would be most of its run time).  A schema is as empty as a new
database for the store: its tables are created on the search_path, and its
NOTIFY channel is named after the schema.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from eventstore import EventStore, StorageAdapter
from eventstore.pglog import PostgresLog
from eventstore.testing import FakeClock, StorageContract

pytest_plugins = ["pgserver"]


class TestPostgresStore(StorageContract):
    dsn: str

    @pytest.fixture(autouse=True)
    def _fresh_schema(self, pg_schema: str) -> None:
        self.dsn = pg_schema

    def make_store(self, clock: FakeClock, tmp_path: Path) -> StorageAdapter:
        store = EventStore(self.dsn, clock=clock)
        assert isinstance(store.log, PostgresLog)
        return store
