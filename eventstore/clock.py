"""Where "now" comes from.

The adapter reads the clock once per accepted write and records the result in
the event; nothing reads it during replay.  Tests pass a fake clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Clock", "system_clock"]

#: A clock returns the current time in whole Unix seconds.
Clock = Callable[[], int]


def system_clock() -> int:
    return int(time.time())
