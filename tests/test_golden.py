"""Every committed golden store still opens, replays and reads as recorded.

Golden stores are written by tests/golden/make_golden.py, one per version of
the on-disk format or of the events, and never rewritten.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from storeutil import record_walks

from eventstore import EventStore
from eventstore.codec import decode_batch
from eventstore.recovery import find_damage
from eventstore.segment import HEADER_SIZE
from eventstore.snapshot import check_snapshots, list_snapshots
from eventstore.tailindex import TAIL_INDEX

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
from make_golden import reads  # noqa: E402

# By number: v10 is newer than v9.
STORES = sorted(
    (p for p in GOLDEN.iterdir() if (p / "expected.json").exists()), key=lambda p: int(p.name[1:])
)


def test_there_is_a_golden_store() -> None:
    assert [p.name for p in STORES][:1] == ["v1"]


@pytest.fixture(params=STORES, ids=lambda p: p.name)
def golden(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, object]]:
    # Work on a copy: opening as a writer may cut tails or write snapshots.
    copy = tmp_path / "store"
    shutil.copytree(request.param / "store", copy)
    expected = json.loads((request.param / "expected.json").read_text())
    return copy, expected


async def test_opens_and_reads_as_recorded(golden: tuple[Path, dict[str, object]]) -> None:
    directory, expected = golden
    assert list_snapshots(str(directory)), "a golden store carries a snapshot"
    async with EventStore(directory, read_only=True) as store:
        assert await reads(store) == expected


async def test_full_replay_without_the_snapshot(golden: tuple[Path, dict[str, object]]) -> None:
    directory, expected = golden
    for snap in directory.glob("snapshot-*.snap"):
        snap.unlink()
    async with EventStore(directory, snapshot_every=None) as store:
        assert await reads(store) == expected


async def test_verifies_clean_and_takes_new_writes(golden: tuple[Path, dict[str, object]]) -> None:
    directory, expected = golden
    assert find_damage(str(directory)) is None
    assert await check_snapshots(str(directory)) == []
    async with EventStore(directory) as store:
        await store.save_message("new", "written by today's code", timestamp=2_000_000_000)
        assert (await store.get_recent_messages(limit=1))[0]["id"] == expected["position"] + 1  # type: ignore[operator]


async def test_a_writer_opens_it_without_a_warning(
    golden: tuple[Path, dict[str, object]], caplog: pytest.LogCaptureFixture
) -> None:
    # Since v4 a golden store is a copy of a live "fsync" writer: its last
    # segment ends in zeros, which are free space, not a torn tail to cut.
    directory, expected = golden
    caplog.set_level(logging.WARNING)
    async with EventStore(directory) as store:
        assert await reads(store) == expected
    # (Snapshots of older projection versions are ignored with a warning.)
    assert [r.getMessage() for r in caplog.records if "snapshot" not in r.getMessage()] == []


def test_the_newest_golden_store_ends_in_filled_space() -> None:
    last = sorted((STORES[-1] / "store").glob("*.seg"))[-1].read_bytes()
    assert last.endswith(bytes(64))


WITH_TAIL_INDEX = [p for p in STORES if (p / "store" / TAIL_INDEX).exists()]  # since v9


@pytest.mark.parametrize("source", WITH_TAIL_INDEX, ids=lambda p: p.name)
async def test_a_writer_opens_from_the_saved_tail_index(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "store"
    shutil.copytree(source / "store", directory)
    expected = json.loads((source / "expected.json").read_text())
    starts = record_walks(monkeypatch)
    async with EventStore(directory) as store:
        assert starts[0] > HEADER_SIZE  # the open's walk began at the saved frame
        await store._log._indexer  # type: ignore[attr-defined]  # the check of the rest
        assert await reads(store) == expected


def test_the_newest_golden_store_has_a_tail_index_of_several_entries() -> None:
    assert WITH_TAIL_INDEX[-1:] == STORES[-1:]
    data = (STORES[-1] / "store" / TAIL_INDEX).read_bytes()
    assert int.from_bytes(data[60:64], "little") >= 2


def test_the_newest_golden_store_has_frames_with_holes() -> None:
    """Since v10 compaction writes its kept events with nil between them (flag bit 1)."""
    (compacted,) = [
        p
        for p in sorted((STORES[-1] / "store").glob("*.seg"))
        if int.from_bytes(p.read_bytes()[10:12], "little") == 3
    ]
    events = []
    data = compacted.read_bytes()
    offset = HEADER_SIZE
    while offset < len(data):
        length, _crc, _first, count = struct.unpack_from("<IIQI", data, offset)
        batch = decode_batch(data[offset + 20 : offset + 20 + length], holes=True)
        assert len(batch) == count and batch[0] is not None and batch[-1] is not None
        events += batch
        offset += 20 + length
    assert events.count(None) > 20 and len(events) - events.count(None) > 20


def test_the_newest_golden_store_has_snapshots_of_format_2() -> None:
    """Since v11 the snapshot's checksum covers its header; v10's are format 1,
    and still load (test_opens_and_reads_as_recorded)."""
    formats = {
        store.name: {
            struct.unpack_from("<H", snap.read_bytes(), 8)[0]
            for snap in (store / "store").glob("snapshot-*.snap")
        }
        for store in STORES
        if int(store.name[1:]) >= 10
    }
    assert formats == {store: {1} if store == "v10" else {2} for store in formats}
    assert formats[STORES[-1].name] == {2}


def test_the_newest_snapshot_encodes_again_to_its_own_bytes() -> None:
    """Snapshots are encoded from views of the live arrays (no copies): the
    bytes must stay those of the format, byte for byte."""
    from eventstore.snapshot import encode_state, read_snapshot
    from projections import PROJECTION_VERSION

    snap = list_snapshots(str(STORES[-1] / "store"))[0]
    info, projections = read_snapshot(snap.path)
    assert info.projection_version == PROJECTION_VERSION
    payload = encode_state(projections)
    assert len(payload) > 1000 and Path(snap.path).read_bytes().endswith(payload)


def test_the_newest_golden_store_has_tombstones_in_its_snapshots() -> None:
    """Since v12 (projection version 8) a forget leaves its user's action
    slots as tombstones, and snapshots keep them; v11's are of version 7,
    which this code loads too (test_a_snapshot_of_projection_version_7_is_loaded)."""
    from eventstore.snapshot import read_snapshot
    from projections.user_actions import GONE

    for snap in list_snapshots(str(STORES[-1] / "store")):
        info, projections = read_snapshot(snap.path)
        assert info.projection_version == 8
        assert projections.actions.gone == projections.actions.slot_type.count(GONE) > 0


async def test_a_snapshot_of_projection_version_7_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Version 7's snapshots (v8 to v11) are version 8's without tombstones:
    a writer connects from one, with no warning and no replay from the start."""
    source = GOLDEN / "v11"
    directory = tmp_path / "store"
    shutil.copytree(source / "store", directory)
    expected = json.loads((source / "expected.json").read_text())
    (newest, *_) = list_snapshots(str(directory))
    assert struct.unpack_from("<I", Path(newest.path).read_bytes(), 12)[0] == 7
    loaded = []
    real_load = EventStore._load_snapshot

    async def load_snapshot(self: EventStore) -> Any:
        proj = await real_load(self)
        loaded.append(None if proj is None else proj.position)
        return proj

    monkeypatch.setattr(EventStore, "_load_snapshot", load_snapshot)
    caplog.set_level(logging.WARNING)
    async with EventStore(directory) as store:
        assert await reads(store) == expected
    assert loaded == [newest.position]
    assert caplog.records == []
