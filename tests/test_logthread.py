"""The segment log's own thread: calls run in order, in that thread, results come back."""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path
from typing import Any

import pytest

from eventstore import ConnectionError
from eventstore.logthread import LogThread
from eventstore.segmentlog import SegmentLog


async def test_calls_run_in_order_in_one_other_thread() -> None:
    worker = LogThread("test-log")
    seen: list[tuple[int, str]] = []

    def note(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * 2

    try:
        results = await asyncio.gather(*(worker.call(note, i) for i in range(50)))
    finally:
        worker.stop()
    assert results == [i * 2 for i in range(50)]
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"test-log"}


class _Stop(BaseException):
    pass


async def test_any_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    worker = LogThread("test-log")

    def fail(err: BaseException) -> None:
        raise err

    try:
        with pytest.raises(OSError, match="No space left"):
            await worker.call(fail, OSError(28, "No space left on device"))
        with pytest.raises(_Stop):
            await worker.call(fail, _Stop())
        assert await worker.call(sum, [1, 2, 3]) == 6
    finally:
        worker.stop()


async def test_a_cancelled_wait_does_not_stop_the_call_or_upset_the_loop() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    worker = LogThread("test-log")
    started, release = threading.Event(), threading.Event()
    done: list[bool] = []

    def slow() -> str:
        started.set()
        release.wait(5)
        done.append(True)
        return "late"

    try:
        fut = worker.call(slow)
        await loop.run_in_executor(None, started.wait, 5)
        fut.cancel()
        release.set()
        assert await worker.call(str, 7) == "7"  # queued behind slow(): so slow() ran
        await asyncio.sleep(0)  # let the late result of slow() arrive
        assert done == [True]
        assert errors == []  # no "invalid state" from settling a cancelled future
    finally:
        loop.set_exception_handler(None)
        worker.stop()


def test_stop_finishes_what_was_queued_and_ends_the_thread() -> None:
    async def main() -> list[int]:
        worker = LogThread("test-log")
        out: list[int] = []
        futs = [worker.call(out.append, i) for i in range(10)]
        worker.stop(wait=True)
        assert not worker.alive
        with pytest.raises(RuntimeError, match="stopped"):
            worker.call(out.append, 99)
        await asyncio.gather(*futs)
        return out

    assert asyncio.run(main()) == list(range(10))


async def test_a_thread_nobody_stopped_ends_when_it_is_collected() -> None:
    worker = LogThread("test-log-orphan")
    assert await worker.call(len, "abc") == 3
    thread = worker._thread
    del worker
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()


async def test_a_cancelled_open_leaves_the_store_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open() cancelled while its work runs in the log's thread: that work
    (which takes the writer lock) finishes later, and must be undone."""
    d = tmp_path / "s"
    real = SegmentLog._open_files
    entered, gate = threading.Event(), threading.Event()

    def slow_open_files(self: SegmentLog) -> None:
        entered.set()
        gate.wait(5)
        real(self)

    monkeypatch.setattr(SegmentLog, "_open_files", slow_open_files)
    log = SegmentLog(str(d))
    task = asyncio.create_task(log.open())
    await asyncio.get_running_loop().run_in_executor(None, entered.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    monkeypatch.undo()
    for _ in range(250):
        again = SegmentLog(str(d))
        try:
            await again.open()
            break
        except ConnectionError:  # the cancelled open still holds the lock
            await asyncio.sleep(0.02)
    else:
        pytest.fail("the cancelled open kept the writer lock")
    await again.close()
