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

import inspect
from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, NoReturn, TypeVar, cast

import pytest

from . import streams
from .clock import DEFAULT_START, FakeClock

if TYPE_CHECKING:
    # Imported by the fixtures when they run: this plugin loads in every
    # pytest run of an environment that has eventstore installed, and the
    # store imports the top-level ``projections`` package, whose name a
    # project's own module may have.
    from ..store import EventStore

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

F = TypeVar("F", bound=Callable[..., AsyncIterator["EventStore"]])


def store_fixture(fn: F) -> F:
    """An async fixture, or one that fails saying pytest-asyncio is missing.

    Pinned to the function-scoped event loop: left to pytest-asyncio's
    default, a project's ``asyncio_default_fixture_loop_scope = "session"``
    would open the store on a loop its function-scoped tests do not run on.
    """
    if _asyncio_plugin is not None:
        # loop_scope is pytest-asyncio 0.24+; before it, a function-scoped
        # async fixture always ran on the function-scoped loop.
        if "loop_scope" in inspect.signature(_asyncio_plugin.fixture).parameters:
            return cast(F, _asyncio_plugin.fixture(fn, loop_scope="function"))
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


def _test_loop_scope(request: pytest.FixtureRequest) -> str | None:
    """The event loop scope the requesting test runs on, if it is an asyncio test."""
    marker = request.node.get_closest_marker("asyncio")
    if marker is None:
        return None
    scope = marker.kwargs.get("loop_scope") or marker.kwargs.get("scope")
    if scope:
        return str(scope)
    try:
        default = request.config.getini("asyncio_default_test_loop_scope")
    except ValueError:  # pytest-asyncio before 0.26: tests ran on the function loop
        return "function"
    return str(default or "function")


def _check_loop_scope(request: pytest.FixtureRequest) -> None:
    """Fail at setup, saying why, rather than later with "attached to a different loop"."""
    scope = _test_loop_scope(request)
    if scope not in (None, "function"):
        pytest.fail(
            f"the {request.fixturename} fixture opens its store on the function-scoped "
            f"event loop, but this test runs on the {scope}-scoped one: open an "
            "EventStore inside the test (or mark it @pytest.mark.asyncio(loop_scope="
            '"function"))',
            pytrace=False,
        )


def _awaited_all(where: str) -> Generator[None, object, object]:
    """Around one phase of a test: fail it if it dropped an event assertion unawaited."""
    streams.unawaited.clear()
    result = yield  # re-raises the phase's own failure, which comes first
    dropped, streams.unawaited[:] = list(streams.unawaited), []
    if dropped:
        pytest.fail(
            f"an event assertion was never awaited{where}, so it checked nothing: "
            + "; ".join(dropped)
            + " (put `await` before it)",
            pytrace=False,
        )
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    """Fail a test whose fixtures made an event assertion and never awaited it."""
    return (yield from _awaited_all(" in a fixture's setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Fail a test that made an event assertion and never awaited it."""
    return (yield from _awaited_all(""))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    """Fail a test whose fixtures' teardown made an event assertion and never awaited it."""
    return (yield from _awaited_all(" in a fixture's teardown"))


@pytest.fixture
def fake_clock() -> FakeClock:
    """A clock that stands still at ``DEFAULT_START`` until the test moves it."""
    return FakeClock(DEFAULT_START)


@store_fixture
async def memory_store(fake_clock: FakeClock) -> AsyncIterator[EventStore]:
    """A connected store with its log in memory (on the function-scoped event loop).

    Its appends complete at once, so its writes wait on no future of that
    loop: unlike ``disk_store`` it is not refused to a test on a wider
    ``loop_scope`` (tests/test_testkit.py runs one such test).
    """
    from ..store import EventStore

    store = EventStore(":memory:", clock=fake_clock)
    await store.connect()
    try:
        yield store
    finally:
        await store.close()


@store_fixture
async def disk_store(
    fake_clock: FakeClock, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[EventStore]:
    """A connected store with its log in ``tmp_path / "store"``.

    Opened on the function-scoped event loop: the log's writer belongs to
    it, so a test on a wider ``loop_scope`` opens its own store instead.
    """
    _check_loop_scope(request)
    from ..store import EventStore

    store = EventStore(tmp_path / "store", clock=fake_clock)
    await store.connect()
    try:
        yield store
    finally:
        await store.close()
