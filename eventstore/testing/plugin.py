"""The pytest plugin of the test kit: fixtures for tests of code that uses a store.

Installed packages register it through the ``pytest11`` entry point named
``eventstore``; a checkout that is not installed can load it with
``-p eventstore.testing.plugin`` (or ``pytest_plugins`` in a root conftest).

Fixtures:

* ``fake_clock``: a :class:`~eventstore.testing.FakeClock` at ``DEFAULT_START``.
* ``memory_store``: a connected ``EventStore(":memory:")`` reading ``fake_clock``.
* ``disk_store``: a connected ``EventStore`` in ``tmp_path / "store"``,
  reading ``fake_clock``.

Both stores are closed after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from ..store import EventStore
from .clock import DEFAULT_START, FakeClock

__all__ = ["disk_store", "fake_clock", "memory_store"]


@pytest.fixture
def fake_clock() -> FakeClock:
    """A clock that stands still at ``DEFAULT_START`` until the test moves it."""
    return FakeClock(DEFAULT_START)


@pytest_asyncio.fixture
async def memory_store(fake_clock: FakeClock) -> AsyncIterator[EventStore]:
    """A connected store with its log in memory."""
    store = EventStore(":memory:", clock=fake_clock)
    await store.connect()
    try:
        yield store
    finally:
        await store.close()


@pytest_asyncio.fixture
async def disk_store(fake_clock: FakeClock, tmp_path: Path) -> AsyncIterator[EventStore]:
    """A connected store with its log in the directory ``tmp_path / "store"``."""
    store = EventStore(tmp_path / "store", clock=fake_clock)
    await store.connect()
    try:
        yield store
    finally:
        await store.close()
