"""Helpers shared by the on-disk log tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from eventstore import EventStore


def segment_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(".seg"))


async def fill(store: EventStore, n: int, *, prefix: str = "m") -> None:
    """Append ``n`` messages with distinct, checkable text."""
    for i in range(n):
        await store.save_message(f"user{i % 5}", f"{prefix}{i}", timestamp=1000 + i)


async def all_events(directory: Path, **kwargs: Any) -> list[Any]:
    store = EventStore(directory, **kwargs)
    async with store:
        return [ev async for _, ev in store.read()]


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    lock = dst / "LOCK"
    if lock.exists():
        os.unlink(lock)
    return dst
