"""No frame is ever written past the 16 MiB payload cap that readers enforce.

Group commit puts up to FRAME_EVENTS events of one round into a frame.  With
messages of about 1 MiB, 17 of them already exceed the cap: such a frame was
acknowledged, then refused as damage by every later open.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest
from storeutil import segment_files

from eventstore import EventStore
from eventstore.events import MessageSaved
from eventstore.segment import (
    FRAME_EVENTS,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    MAX_FRAME_PAYLOAD,
    encode_frames,
)

#: Just under the 1 MiB message limit (in UTF-8 bytes).
BIG = 1024 * 1024 - 64


def frame_lengths(directory: Path) -> list[int]:
    lengths = []
    for path in segment_files(directory):
        data = path.read_bytes()
        offset = HEADER_SIZE
        while offset + FRAME_HEADER_SIZE <= len(data):
            (length,) = struct.unpack_from("<I", data, offset)
            if length == 0:
                break  # zeros after the last frame
            lengths.append(length)
            offset += FRAME_HEADER_SIZE + length
    return lengths


def test_encode_frames_splits_a_chunk_over_the_cap() -> None:
    events = [MessageSaved(i, "u", chr(97 + i % 26) * BIG) for i in range(40)]
    frames = encode_frames(7, events)
    assert [first for first, _, _ in frames] == sorted(first for first, _, _ in frames)
    assert sum(count for _, count, _ in frames) == 40
    # Consecutive: each frame starts where the previous one ended.
    expected = 7
    for first, count, data in frames:
        assert first == expected
        assert len(data) - FRAME_HEADER_SIZE <= MAX_FRAME_PAYLOAD
        expected += count
    assert len(frames) > 40 // FRAME_EVENTS + 1  # it did split


def test_encode_frames_keeps_small_events_in_frames_of_64() -> None:
    events = [MessageSaved(i, "u", "hi") for i in range(130)]
    assert [(f, c) for f, c, _ in encode_frames(1, events)] == [(1, 64), (65, 64), (129, 2)]


def test_an_event_larger_than_a_frame_is_refused() -> None:
    with pytest.raises(ValueError, match="position 3 encodes to"):
        encode_frames(3, [MessageSaved(1, "u", "x" * (MAX_FRAME_PAYLOAD + 1))])


@pytest.mark.parametrize("segment_size", [None, 3 * 1024 * 1024])
@pytest.mark.parametrize("durability", ["fsync", "flush", "none"])
async def test_a_round_of_big_messages_reopens(
    tmp_path: Path, durability: str, segment_size: int | None
) -> None:
    """40 concurrent 1 MiB messages: one round, written as frames under the cap
    (and, with 3 MiB segments, split frames across rolls)."""
    texts = [chr(65 + i % 26) * BIG for i in range(40)]
    async with EventStore(
        tmp_path,
        durability=durability,  # type: ignore[arg-type]
        snapshot_every=None,
        segment_size=segment_size,
    ) as store:
        await asyncio.gather(
            *(store.save_message(f"u{i}", t, timestamp=i) for i, t in enumerate(texts))
        )
    lengths = frame_lengths(tmp_path)
    assert lengths and max(lengths) <= MAX_FRAME_PAYLOAD
    if segment_size is not None:
        assert len(segment_files(tmp_path)) >= 4  # frames of ~10 MiB, one a segment
    for read_only in (True, False):
        async with EventStore(tmp_path, read_only=read_only) as again:
            got = await again.get_recent_messages(limit=100)
            assert sorted(m["message"] for m in got) == sorted(texts)


async def test_compaction_writes_big_messages_under_the_cap(tmp_path: Path) -> None:
    texts = [chr(65 + i % 26) * BIG for i in range(40)]
    async with EventStore(tmp_path, durability="flush", segment_size=8 * 1024 * 1024) as store:
        await asyncio.gather(
            *(store.save_message(f"u{i}", t, timestamp=i) for i, t in enumerate(texts))
        )
        await store.clear_old_messages(keep_count=39)
        await store.save_message("late", "roll", timestamp=99)
        await store.compact()
    assert max(frame_lengths(tmp_path)) <= MAX_FRAME_PAYLOAD
    async with EventStore(tmp_path, read_only=True) as again:
        got = await again.get_recent_messages(limit=100)
        assert len(got) == 40  # 39 kept, and the one after them
