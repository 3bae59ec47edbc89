"""The segment log's own thread: its blocking file work, one call at a time, in order.

A one-worker ``ThreadPoolExecutor`` driven with ``run_in_executor`` did the
same job, but every call went through a concurrent.futures Future (a lock,
a condition, state checks) and a chain of callbacks into the event loop, in
Python, on both sides of the hand-over.  For a bot that awaits each write in
"fsync" mode that is one hand-over per write.  Measured on the project
machine with a bare loop of write + fdatasync of 58 bytes awaited from
asyncio: 200-225 us a call at the median through the executor, 150-175 us
through this class (a queue, and one ``call_soon_threadsafe`` back),
120-150 us with no thread at all.

The thread is a daemon: a program that exits without closing its store
must not hang on it.  Work still queued then is abandoned, as a crash would
abandon it, and the log recovers on open.  Nothing acknowledged in "fsync"
or "flush" mode is lost that way, since a write is acknowledged only after
its call has run; "none" mode promises nothing for its last 100 ms anyway.
A LogThread that is garbage-collected without ``stop()`` stops its thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["LogThread", "outlive_cancels"]


async def outlive_cancels(work: asyncio.Future[Any]) -> None:
    """Wait for ``work``, a thread's, to end, through any number of cancels.

    For a caller cancelled while a thread works for it: the thread goes on
    regardless, and what the caller does next (close the file the thread
    writes, let another writer in) must not happen under it.
    """
    while not work.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({work})


T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class LogThread:
    """Runs functions in one dedicated thread; ``call`` returns an asyncio future."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._stopped = False
        # The thread holds the queue only, not this object, so that an
        # instance nobody stopped can still be collected, and then stops it.
        self._thread = threading.Thread(target=_serve, args=(self._jobs,), name=name, daemon=True)
        self._thread.start()
        weakref.finalize(self, self._jobs.put, None)

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue ``fn(*args)``; the future settles with its result or exception.

        Cancelling the future does not stop the call: it runs anyway, and
        its result is dropped.
        """
        if self._stopped:
            raise RuntimeError("the log's thread is stopped")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, fut, fn, args))
        return fut

    def call_detached(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` after what is queued, with nobody waiting for it."""
        fut = self.call(fn, *args)
        fut.add_done_callback(_consume)

    def stop(self, wait: bool = True) -> None:
        """Finish the calls already queued, then end the thread."""
        if not self._stopped:
            self._stopped = True
            self._jobs.put(None)
        if wait:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def _serve(jobs: queue.SimpleQueue[_Job | None]) -> None:
    while (job := jobs.get()) is not None:
        _run(*job)
        del job  # hold nothing of a finished call while waiting for the next


def _run(
    loop: asyncio.AbstractEventLoop,
    fut: asyncio.Future[Any],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    try:
        result, error = fn(*args), None
    except BaseException as err:  # handed to the caller, whatever it is
        result, error = None, err
    # RuntimeError: the event loop is closed, nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, fut, result, error)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved, so asyncio does not log it as forgotten
