"""Helpers shared by the on-disk log tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from eventstore import EventStore, segmentlog
from eventstore.segment import FRAME_HEADER_SIZE, HEADER_SIZE


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


def frames_end(data: bytes) -> int:
    """Offset just past a segment's last frame (frames are walked to a zero header).

    An "fsync" writer keeps zeros after the last frame of the active segment.
    """
    off = HEADER_SIZE
    while off + FRAME_HEADER_SIZE <= len(data) and data[off : off + FRAME_HEADER_SIZE].strip(b"\0"):
        off += FRAME_HEADER_SIZE + int.from_bytes(data[off : off + 4], "little")
    return off


def frames_only(path: Path) -> bytes:
    """A segment's bytes without the zeros after its last frame."""
    data = path.read_bytes()
    return data[: frames_end(data)]


def record_walks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the offset every frame walk of a segment log starts at, in order."""
    starts: list[int] = []
    real = segmentlog._index_frames

    def recording(seg: Any, start: int, *args: Any, **kwargs: Any) -> Any:
        starts.append(start)
        return real(seg, start, *args, **kwargs)

    monkeypatch.setattr(segmentlog, "_index_frames", recording)
    return starts
