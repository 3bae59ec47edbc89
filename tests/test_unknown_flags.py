"""Header flags this code does not know: a segment is refused, a snapshot ignored.

docs/format.md says the other flag bits are 0.  Newer code setting one may
have changed how the bytes after it read, so a segment with such a bit is
refused before any frame is read, and a snapshot with one is not loaded.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from pathlib import Path

import pytest
from storeutil import fill, segment_files

from eventstore import EventStore, IntegrityError, MigrationError
from eventstore.recovery import find_damage, repair
from eventstore.verify import verify


def set_segment_flags(path: Path, flags: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 10, flags)
    struct.pack_into("<I", data, 44, zlib.crc32(data[:44]))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("flags", [0x0004, 0x8000, 0x0007])
@pytest.mark.parametrize("read_only", [False, True])
async def test_a_segment_with_an_unknown_flag_is_refused(
    tmp_path: Path, flags: int, read_only: bool
) -> None:
    async with EventStore(tmp_path, snapshot_every=None) as store:
        await fill(store, 5)
    (seg,) = segment_files(tmp_path)
    set_segment_flags(seg, flags)
    with pytest.raises(MigrationError, match=rf"segment flags {flags:#06x} include bits"):
        await EventStore(tmp_path, read_only=read_only).connect()
    report = await asyncio.to_thread(verify, str(tmp_path))
    assert not report.ok
    assert any(f"{flags:#06x}" in p.message for p in report.problems), report.problems


@pytest.mark.parametrize("read_only", [False, True])
async def test_holes_without_compaction_are_refused(tmp_path: Path, read_only: bool) -> None:
    """Bit 1 (frames with holes) only comes with bit 0 (a compacted segment)."""
    async with EventStore(tmp_path, snapshot_every=None) as store:
        await fill(store, 5)
    (seg,) = segment_files(tmp_path)
    set_segment_flags(seg, 0x0002)
    with pytest.raises(IntegrityError, match=r"flags 0x0002: holes in frames \(bit 1\) without"):
        await EventStore(tmp_path, read_only=read_only).connect()
    report = await asyncio.to_thread(verify, str(tmp_path))
    assert any("holes in frames" in p.message for p in report.problems), report.problems


async def test_a_snapshot_with_flags_is_not_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with EventStore(tmp_path) as store:
        await fill(store, 5)
    (snap,) = tmp_path.glob("*.snap")
    data = bytearray(snap.read_bytes())
    struct.pack_into("<H", data, 10, 1)
    snap.write_bytes(bytes(data))
    async with EventStore(tmp_path, read_only=True) as again:
        # Rebuilt from the log instead: the same five messages.
        assert len(await again.get_recent_messages()) == 5
    assert "ignoring snapshot" in caplog.text and "snapshot flags 0x0001" in caplog.text
    report = await asyncio.to_thread(verify, str(tmp_path))
    assert any("snapshot flags 0x0001" in p.message for p in report.problems), report.problems


async def test_repair_refuses_a_segment_of_newer_code_instead_of_cutting(tmp_path: Path) -> None:
    """Not damage: cutting it (and every later segment) would throw events away."""
    async with EventStore(tmp_path, segment_size=2048, snapshot_every=None) as store:
        await fill(store, 200)
    segments = segment_files(tmp_path)
    assert len(segments) >= 3
    set_segment_flags(segments[1], 0x0004)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(MigrationError, match="include bits this code does not know"):
        repair(str(tmp_path))
    with pytest.raises(MigrationError):
        find_damage(str(tmp_path))
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after.keys() - {"LOCK"} == before.keys() - {"LOCK"}
    assert all(after[name] == data for name, data in before.items() if name != "LOCK")
