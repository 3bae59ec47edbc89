"""The writer lock: one writing process per store directory.

``LOCK`` in the store directory is held with ``flock(LOCK_EX | LOCK_NB)`` for
as long as a writer is open.  The kernel drops the lock when the process dies,
however it dies, so a killed bot never leaves a stale lock behind; the pid
written into the file only serves the error message and ``eventstore info``.
Readers do not hold the lock; ``lock_holder`` (is a writer open?) takes it
shared for an instant to find out, so a writer that finds it taken tries
again for a few milliseconds before it reports another writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

from .errors import ConnectionError

__all__ = ["LOCK_NAME", "WriterLock", "lock_holder"]

LOCK_NAME = "LOCK"
#: How long a writer keeps trying when the lock is taken: a reader's probe
#: holds it for microseconds, a writer for as long as it is open.
RETRY_SECONDS = 0.05


class WriterLock:
    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _lock_exclusive(fd)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise ConnectionError(
                f"{os.path.dirname(self.path)} is already open for writing by {who}; "
                "open it with read_only=True, or stop that writer first"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            # The pid only serves messages; the lock is what counts.  On a
            # full disk there may be no room for it: raising here lost the
            # descriptor, and with it a lock nothing would release (a
            # connect() after freeing space was refused as another writer).
            pass
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            # Unlock before close so no window exists where the pid is stale
            # but the lock still held; the file itself stays for next time.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _lock_exclusive(fd: int) -> None:
    deadline = time.monotonic() + RETRY_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.001)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def lock_holder(directory: str) -> int | None:
    """The pid of the writer holding ``directory``'s lock, or None if unlocked."""
    path = os.path.join(directory, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
