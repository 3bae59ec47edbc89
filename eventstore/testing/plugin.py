"""The pytest plugin of the test kit: fixtures for tests of code that uses a store.

Installed packages register it through the ``pytest11`` entry point named
``eventstore``; a checkout that is not installed can load it with
``-p eventstore.testing.plugin`` (or ``pytest_plugins`` in a root conftest).
Not both: once the package is installed, drop that line, or pytest refuses
to register the plugin a second time under the other name.

Fixtures:

* ``fake_clock``: a :class:`~eventstore.testing.FakeClock` at ``DEFAULT_START``.
* ``memory_store``: a connected ``EventStore(":memory:")`` reading ``fake_clock``.
* ``disk_store``: a connected ``EventStore`` in ``tmp_path / "store"``,
  reading ``fake_clock``.

Both stores are closed after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import NoReturn, TypeVar, cast

import pytest

from ..store import EventStore
from .clock import DEFAULT_START, FakeClock

__all__ = ["disk_store", "fake_clock", "memory_store"]

# Installing eventstore registers this plugin in every pytest run of that
# environment, so it must load without pytest-asyncio (a bot tested with
# anyio, or none of it): only the async fixtures need it, and say so.
try:
    import pytest_asyncio
except ImportError:
    _asyncio_plugin: ModuleType | None = None
else:
    _asyncio_plugin = pytest_asyncio

F = TypeVar("F", bound=Callable[..., AsyncIterator[EventStore]])


def store_fixture(fn: F) -> F:
    """An async fixture, or one that fails saying pytest-asyncio is missing."""
    if _asyncio_plugin is not None:
        return cast(F, _asyncio_plugin.fixture(fn))
    name = fn.__name__

    @pytest.fixture(name=name)
    def missing() -> NoReturn:
        pytest.fail(
            f"the {name} fixture needs pytest-asyncio: pip install pytest-asyncio "
            "(or eventstore[test])",
            pytrace=False,
        )

    return cast(F, missing)


@pytest.fixture
def fake_clock() -> FakeClock:
    """A clock that stands still at ``DEFAULT_START`` until the test moves it."""
    return FakeClock(DEFAULT_START)


@store_fixture
async def memory_store(fake_clock: FakeClock) -> AsyncIterator[EventStore]:
    """A connected store with its log in memory (on the function-scoped event loop)."""
    store = EventStore(":memory:", clock=fake_clock)
    await store.connect()
    try:
        yield store
    finally:
        await store.close()


@store_fixture
async def disk_store(fake_clock: FakeClock, tmp_path: Path) -> AsyncIterator[EventStore]:
    """A connected store with its log in ``tmp_path / "store"``.

    Opened on the function-scoped event loop: the log's writer belongs to
    it, so a test on a wider ``loop_scope`` opens its own store instead.
    """
    store = EventStore(tmp_path / "store", clock=fake_clock)
    await store.connect()
    try:
        yield store
    finally:
        await store.close()
