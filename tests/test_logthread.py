"""The segment log's own thread: calls run in order, in that thread, results come back."""

from __future__ import annotations

import asyncio
import threading

import pytest

from eventstore.logthread import LogThread


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


async def test_an_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    worker = LogThread("test-log")

    def fail() -> None:
        raise OSError(28, "No space left on device")

    try:
        with pytest.raises(OSError, match="No space left"):
            await worker.call(fail)
        assert await worker.call(sum, [1, 2, 3]) == 6
    finally:
        worker.stop()


async def test_a_cancelled_wait_does_not_stop_the_call_or_the_thread() -> None:
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
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        fut.cancel()
        release.set()
        assert await worker.call(str, 7) == "7"  # queued behind slow(): so slow() ran
        assert done == [True]
    finally:
        worker.stop()


def test_stop_finishes_what_was_queued() -> None:
    async def main() -> list[int]:
        worker = LogThread("test-log")
        out: list[int] = []
        futs = [worker.call(out.append, i) for i in range(10)]
        worker.stop(wait=True)
        await asyncio.gather(*futs)
        return out

    assert asyncio.run(main()) == list(range(10))
