"""Schema evolution: old logs keep replaying after the event types change.

Three kinds of change, as docs/format.md and eventstore/codec.py describe:
a field added last with a default (nothing to do, both ways), a changed
event (a new tag, the old type kept with an upcaster), and a log written by
newer code with event types this code does not know (refused up front, by
tag, instead of failing in the middle of a replay).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from storeutil import frames_only, segment_files

from eventstore import EventStore, MigrationError
from eventstore.codec import remove_upcaster, upcaster
from eventstore.events import BaseEvent, MessageSaved, UserStatsSaved
from eventstore.recovery import find_damage
from eventstore.segment import HEADER_SIZE, pack_header


class MessageSavedV0(BaseEvent, tag=90, frozen=True):
    """How a chat line looked in an imagined earlier version: other names, other order."""

    version = 0
    user: str
    text: str
    at: int


class UserStatsSavedPlus(BaseEvent, tag=1, frozen=True):
    """UserStatsSaved as newer code might write it: one more field, last, with a default."""

    username: str
    now: int
    first_seen: int | None = None
    last_seen: int | None = None
    chat_lines: int = 0
    time_connected: int = 0
    session_start: int | None = None
    client: str = "web"


class FutureEvent(BaseEvent, tag=200, frozen=True):
    """An event type this code has never heard of."""

    payload: str


@pytest.fixture
def v0_upcaster() -> Iterator[None]:
    @upcaster(MessageSavedV0)
    def _(old: MessageSavedV0) -> MessageSaved:
        return MessageSaved(timestamp=old.at, username=old.user, message=old.text)

    yield
    remove_upcaster(MessageSavedV0)


def _rewrite_fingerprint(directory: Path, fingerprint: bytes) -> None:
    """Stamp every segment as written by other code (another event schema)."""
    for seg in segment_files(directory):
        data = bytearray(seg.read_bytes())
        store_id = bytes(data[28:44])
        first = int.from_bytes(data[12:20], "little")
        data[:HEADER_SIZE] = pack_header(first, store_id, fingerprint=fingerprint)
        seg.write_bytes(bytes(data))


async def _write_raw(directory: Path, events: list[msgspec.Struct]) -> None:
    """Append structs as they are, bypassing the adapter (as older/newer code would)."""
    store = EventStore(directory, snapshot_every=None)
    await store.connect()
    _first, done = store.log.submit(events)  # type: ignore[arg-type]
    await done
    store._connected = False  # do not snapshot: this code could not fold them all
    await store.log.close()


async def test_old_events_are_upcast_while_reading(tmp_path: Path, v0_upcaster: None) -> None:
    d = tmp_path / "s"
    await _write_raw(
        d, [MessageSavedV0("alice", "from the old days", 5), MessageSavedV0("bob", "hi", 6)]
    )
    async with EventStore(d, snapshot_every=None) as store:
        messages = await store.get_recent_messages()
        assert [(m["username"], m["message"], m["timestamp"]) for m in messages] == [
            ("bob", "hi", 6),
            ("alice", "from the old days", 5),
        ]
        # Projections and readers of the stream see only current events.
        assert [ev async for _, ev in store.read()] == [
            MessageSaved(5, "alice", "from the old days"),
            MessageSaved(6, "bob", "hi"),
        ]
        # And new writes go on in the current shape.
        await store.save_message("carol", "new", timestamp=7)
    async with EventStore(d, snapshot_every=None) as store:
        assert len(await store.get_recent_messages()) == 3


async def test_without_its_upcaster_an_old_tag_is_refused_by_name(tmp_path: Path) -> None:
    d = tmp_path / "s"

    @upcaster(MessageSavedV0)
    def _(old: MessageSavedV0) -> MessageSaved:
        return MessageSaved(old.at, old.user, old.text)

    try:
        await _write_raw(d, [MessageSavedV0("alice", "x", 5)])
    finally:
        remove_upcaster(MessageSavedV0)
    _rewrite_fingerprint(d, b"\x00" * 8)
    with pytest.raises(MigrationError, match="tag\\(s\\) 90 "):
        await EventStore(d).connect()


async def test_log_with_unknown_event_types_is_refused_before_replay(tmp_path: Path) -> None:
    d = tmp_path / "s"
    async with EventStore(d, snapshot_every=None) as store:
        await store.save_message("a", "b", timestamp=1)
    await _write_raw(d, [FutureEvent("from the future")])
    _rewrite_fingerprint(d, b"\xfe" * 8)
    with pytest.raises(MigrationError) as info:
        await EventStore(d).connect()
    message = str(info.value)
    assert "tag(s) 200" in message and "fefefefefefefefe" in message
    # Not damage that repair() may cut: the same refusal.
    with pytest.raises(MigrationError, match=r"tag\(s\) 200"):
        find_damage(str(d))


async def test_a_field_added_by_newer_code_is_ignored_by_this_code(tmp_path: Path) -> None:
    d = tmp_path / "s"
    await _write_raw(d, [UserStatsSavedPlus("alice", 10, chat_lines=2, client="tv")])
    _rewrite_fingerprint(d, b"\x11" * 8)  # newer code: another fingerprint, same tags
    async with EventStore(d, snapshot_every=None) as store:
        stats = await store.get_user_stats("alice")
        assert stats is not None and stats["total_chat_lines"] == 2
        assert [ev async for _, ev in store.read()] == [UserStatsSaved("alice", 10, chat_lines=2)]


def test_an_event_written_before_a_field_was_added_gets_its_default() -> None:
    old_bytes = msgspec.msgpack.encode([UserStatsSaved("alice", 10)])
    decoded = msgspec.msgpack.decode(old_bytes, type=list[UserStatsSavedPlus])
    assert decoded == [UserStatsSavedPlus("alice", 10, client="web")]


def test_upcasters_are_for_old_types_only() -> None:
    with pytest.raises(ValueError, match="current event type"):
        upcaster(MessageSaved)(lambda ev: ev)


def _fingerprints(directory: Path) -> list[bytes]:
    return [bytes(seg.read_bytes()[20:28]) for seg in segment_files(directory)]


@pytest.mark.parametrize("last", ["holds frames", "empty"])
async def test_this_code_writes_on_in_a_segment_of_its_own_schema(
    tmp_path: Path, last: str
) -> None:
    """Appended to a segment of another schema, this code's events would sit
    under that schema's fingerprint: code that cannot read them (a rollback)
    then took them for damage, where it refuses a segment by its fingerprint."""
    from eventstore.events import SCHEMA_FINGERPRINT

    d = tmp_path / "s"
    async with EventStore(d, snapshot_every=None, segment_size=1024) as store:
        for i in range(3 if last == "holds frames" else 40):
            await store.save_message("a", f"m{i}", timestamp=i)
        if last == "empty":
            await store.compact()  # seals the active segment: the new last one is empty
    other = b"\x11" * 8  # the code before: another fingerprint, the same tags
    _rewrite_fingerprint(d, other)
    before = {p.name: p.read_bytes() for p in segment_files(d)}
    async with EventStore(d, snapshot_every=None, segment_size=1024) as store:
        await store.save_message("b", "after the upgrade", timestamp=100)
        position = store.position
    segments = segment_files(d)
    assert _fingerprints(d)[-1] == SCHEMA_FINGERPRINT
    assert set(_fingerprints(d)[:-1]) == {other}
    if last == "holds frames":
        # The old one is sealed (the zeros after its frames cut), not written to.
        assert [p.name for p in segments[:-1]] == sorted(before)
        old = segments[-2]
        assert before[old.name].startswith(old.read_bytes())
        assert not before[old.name][len(old.read_bytes()) :].strip(b"\0")
    else:
        assert [p.name for p in segments] == sorted(before)  # replaced under its name
    assert segments[-1].name == f"{position:020d}.seg"
    async with EventStore(d, snapshot_every=None) as store:
        assert (await store.get_recent_messages(limit=1))[0]["message"] == "after the upgrade"
    assert find_damage(str(d)) is None


async def test_compaction_refuses_segments_of_newer_code(tmp_path: Path) -> None:
    """This code decodes a newer release's events without the fields it
    added: rewritten by its compaction, they would lose them for good."""
    d = tmp_path / "s"
    await _write_raw(d, [UserStatsSavedPlus("alice", 10, chat_lines=2, client="tv")])
    _rewrite_fingerprint(d, b"\x11" * 8)  # newer code: another fingerprint, same tags
    async with EventStore(d, snapshot_every=None) as store:
        await store.save_user_stats("alice", chat_lines=1)
        files = {p.name: frames_only(p) for p in segment_files(d)}
        with pytest.raises(MigrationError, match=r"written by other code .* compact with the"):
            await store.compact()
        report = await store.compact(dry_run=True)  # changes nothing: allowed
        assert report.dry_run
        assert {p.name: frames_only(p) for p in segment_files(d)} == files
    assert b"tv" in segment_files(d)[0].read_bytes()


def _stamp(seg: Path, fingerprint: bytes) -> None:
    """One segment's header rewritten as code of another schema writes it."""
    data = bytearray(seg.read_bytes())
    store_id = bytes(data[28:44])
    first = int.from_bytes(data[12:20], "little")
    flags = int.from_bytes(data[10:12], "little")
    data[:HEADER_SIZE] = pack_header(first, store_id, flags=flags, fingerprint=fingerprint)
    seg.write_bytes(bytes(data))


async def test_a_follower_goes_on_when_an_empty_foreign_last_segment_is_replaced(
    tmp_path: Path,
) -> None:
    """A writer replaces such a segment under its name: a follower that read
    nothing from it is not told the log was cut."""
    d = tmp_path / "s"
    async with EventStore(d, snapshot_every=None) as store:
        for i in range(5):
            await store.save_message("a", f"m{i}", timestamp=i)
        await store.log.roll()  # as compact() leaves it: an empty last segment
    _stamp(segment_files(d)[-1], b"\x11" * 8)
    follower = EventStore(d, read_only=True)
    await follower.connect()
    try:
        async with EventStore(d, snapshot_every=None) as store:
            await store.save_message("b", "after the upgrade", timestamp=10)
        for _ in range(3):
            await follower.refresh()
        assert follower.position == 6
        messages = await follower.get_recent_messages(limit=1)
        assert messages[0]["message"] == "after the upgrade"
    finally:
        await follower.close()


async def test_a_failed_replacement_of_an_empty_foreign_segment_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its name holds the log's head when compaction dropped the last events:
    removed, the next events would take positions already handed out."""
    import errno

    import eventstore.segmentlog as segmentlog

    d = tmp_path / "s"
    async with EventStore(d, snapshot_every=None) as store:
        for i in range(5):
            await store.save_message("a", f"m{i}", timestamp=i)
        await store.save_message("b", "goes", timestamp=9)
        await store.forget_user("b")  # compacts: the forget itself is dropped
        head = store.log.head
    last = segment_files(d)[-1]
    assert last.stat().st_size == HEADER_SIZE and int(last.name[:20]) == head + 1
    _stamp(last, b"\x11" * 8)

    def full(fd: int, data: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segmentlog, "write_all", full)
    with pytest.raises(OSError):
        await EventStore(d, snapshot_every=None).connect()
    monkeypatch.undo()
    assert last.exists()
    async with EventStore(d, snapshot_every=None) as store:
        assert store.log.head == head
        await store.save_message("c", "next", timestamp=20)
        assert store.position == head + 1


async def test_compaction_of_segments_of_newer_code_writes_nothing_first(tmp_path: Path) -> None:
    """Refused before the retention decision is recorded; and forget_user says
    this release cannot finish the erasure, not to call again."""
    d = tmp_path / "s"
    async with EventStore(d, snapshot_every=None) as store:
        for i in range(5):
            await store.log_user_count(i, i, timestamp=i)
        await store.save_message("bob", "hi", timestamp=9)
    _rewrite_fingerprint(d, b"\x11" * 8)
    async with EventStore(d, snapshot_every=None) as store:
        position = store.position
        with pytest.raises(MigrationError, match="nothing was changed"):
            await store.compact(keep_history_days=0)
        assert store.position == position
        assert len(await store.get_user_count_history()) == 5
        with pytest.raises(MigrationError, match="this release cannot erase them from the files"):
            await store.forget_user("bob")
        assert not store.knows_user("bob")
