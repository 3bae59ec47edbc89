"""Snapshots: the projections' state at a log position, so connect() replays
only the tail.

A snapshot file ``snapshot-<position, 20 digits>.snap`` sits beside the
segments.  Layout, little-endian (also in docs/format.md)::

    0   8  magic               b"\\x89ESSNAP\\n"
    8   2  format version      u16 (2; 1 is still read)
    10  2  flags               u16 (0)
    12  4  projection version  u32 (projections.PROJECTION_VERSION)
    16  8  position            u64, the last event the state includes
    24  8  schema fingerprint  the event schema of the code that wrote it
    32  16 store id            the store's id, as in its segment headers
    48  4  frame checksum      the crc32 field of the last log frame that starts at
                               or before ``position``; 0 if compaction left none
    52  4  checksum            crc32 of bytes 8..51, then 56 to the end (format 2:
                               the header too); of the payload alone (format 1)
    56  8  payload length      u64
    64  n  payload             msgpack of projections.Projections.dump()

The store id ties a snapshot to its store: one copied from another store is
ignored.  The frame checksum ties it to the exact bytes of its log: one left
over after ``repair`` cut the log and new events took the old positions names
a frame that is not there, or differs, and is ignored.  So is one with another
schema, a projection version this code does not load
(``projections.LOADABLE_PROJECTION_VERSIONS``), a bad checksum or a position
past the log's end.  Ignoring costs a full replay, never a wrong state.

Writing is atomic: temporary file, fsync, rename, fsync of the directory.
The two newest snapshots are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict

import msgspec

from projections import LOADABLE_PROJECTION_VERSIONS, PROJECTION_VERSION, Projections

from .errors import IntegrityError, StorageError
from .events import SCHEMA_FINGERPRINT
from .fsutil import fsync_dir, write_all

__all__ = [
    "SnapshotInfo",
    "check_snapshots",
    "list_snapshots",
    "load_newest",
    "read_snapshot",
    "unusable_reason",
    "write_snapshot",
]

MAGIC = b"\x89ESSNAP\n"
#: What write_snapshot writes.  Format 1 (checksum of the payload alone, so a
#: damaged header field passed for another version or a cut log) is read too.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER = struct.Struct("<8sHHIQ8s16sIIQ")
HEADER_SIZE = HEADER.size  # 64
KEEP = 2
SNAPSHOT_RE = re.compile(r"^snapshot-(\d{20})\.snap$")

_encoder = msgspec.msgpack.Encoder()


# The payload's shape, for decoding: the arrays' bytes (msgpack bin) come out
# as views of the file's bytes, not copies, so a load holds the file and the
# arrays built from it, not a third copy in between (134 MB of the 10M-event
# store's snapshot).  A payload of another shape is refused here, before any
# projection's load() sees it; the values are checked there.
_Index = tuple[memoryview, memoryview, memoryview]  # a SortedIndex: ts, pos, code


class _Channel(TypedDict):
    max_users: Any
    max_users_timestamp: Any
    max_connected: Any
    max_connected_timestamp: Any
    last_updated: Any


class _Actions(TypedDict):
    users: list[str]
    types: list[str]
    details: list[str]
    all: _Index
    by_type: dict[int, _Index]
    slots: tuple[memoryview, memoryview, memoryview, memoryview, memoryview]
    by_user: memoryview


class _Counts(TypedDict):
    index: _Index
    chat: memoryview
    connected: memoryview


class _Messages(TypedDict):
    users: list[str]
    index: _Index


class _State(TypedDict):
    position: int
    # first_seen, last_seen, chat lines, time connected, session start
    user_stats: dict[str, tuple[Any, Any, Any, Any, Any]]
    channel: _Channel
    actions: _Actions
    counts: _Counts
    messages: _Messages


_decoder = msgspec.msgpack.Decoder(_State)


class FrameChecks(Protocol):
    """What a snapshot needs from the log: the checksum of a frame by position."""

    @property
    def head(self) -> int: ...

    store_id: bytes | None

    def frame_checksum(self, position: int) -> int | None: ...


@dataclass(frozen=True)
class SnapshotInfo:
    path: str
    position: int
    size: int
    projection_version: int
    fingerprint: str
    store_id: bytes
    frame_checksum: int
    #: 2 since its checksum covers the header too (see FORMAT_VERSION).
    format_version: int = FORMAT_VERSION


def snapshot_name(position: int) -> str:
    return f"snapshot-{position:020d}.snap"


def list_snapshots(directory: str) -> list[SnapshotInfo]:
    """Every snapshot file whose header parses, newest first."""
    out = []
    for name in os.listdir(directory):
        if not SNAPSHOT_RE.match(name):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER_SIZE)
            info = _parse_header(head, path)
        except (OSError, IntegrityError):
            continue
        out.append(info)
    out.sort(key=lambda i: i.position, reverse=True)
    return out


def unreadable_snapshots(directory: str, listed: list[SnapshotInfo]) -> list[tuple[str, str]]:
    """(path, why) of each snapshot file whose header ``list_snapshots`` skipped."""
    parsed = {os.path.basename(info.path) for info in listed}
    out = []
    for name in sorted(os.listdir(directory)):
        if SNAPSHOT_RE.match(name) and name not in parsed:
            path = os.path.join(directory, name)
            try:
                with open(path, "rb") as f:
                    _parse_header(f.read(HEADER_SIZE), path)
            except (OSError, IntegrityError) as err:
                out.append((path, str(err).removeprefix(f"{path}: ")))
    return out


def _parse_header(head: bytes, path: str) -> SnapshotInfo:
    if len(head) < HEADER_SIZE:
        raise IntegrityError(
            f"{path}: snapshot header is {len(head)} bytes, expected {HEADER_SIZE}"
        )
    magic, version, flags, pversion, position, fingerprint, store_id, frame_crc, _pcrc, length = (
        HEADER.unpack(head)
    )
    if magic != MAGIC:
        raise IntegrityError(f"{path}: not a snapshot file")
    if version not in READABLE_VERSIONS:
        raise IntegrityError(
            f"{path}: snapshot format version {version}, this code reads "
            f"{' and '.join(map(str, READABLE_VERSIONS))}"
        )
    if flags != 0:
        raise IntegrityError(f"{path}: snapshot flags {flags:#06x}, this code knows none")
    return SnapshotInfo(
        path,
        position,
        HEADER_SIZE + length,
        pversion,
        fingerprint.hex(),
        store_id,
        frame_crc,
        version,
    )


def read_snapshot(path: str) -> tuple[SnapshotInfo, Projections]:
    """Load one snapshot; IntegrityError says why it cannot be used."""
    with open(path, "rb") as f:
        data = f.read()
    info = _parse_header(data[:HEADER_SIZE], path)
    if info.projection_version not in LOADABLE_PROJECTION_VERSIONS:
        raise IntegrityError(f"{path}: {_other_version(info)}")
    if info.fingerprint != SCHEMA_FINGERPRINT.hex():
        raise IntegrityError(
            f"{path}: written for event schema {info.fingerprint}, "
            f"this code has {SCHEMA_FINGERPRINT.hex()}"
        )
    damage = _payload_damage(data)
    if damage is not None:
        raise IntegrityError(f"{path}: {damage}")
    payload = memoryview(data)[HEADER_SIZE:]
    try:
        state: Any = _decoder.decode(payload)
        proj = Projections.load(state)
    except (msgspec.DecodeError, LookupError, ValueError, TypeError, AttributeError) as err:
        raise IntegrityError(f"{path}: undecodable snapshot payload: {err}") from err
    if proj.position != info.position:
        raise IntegrityError(
            f"{path}: payload is for position {proj.position}, header says {info.position}"
        )
    return info, proj


def _checksum(head: bytes | memoryview, payload: bytes | memoryview, version: int) -> int:
    """What the checksum field (bytes 52..55 of ``head``) of a snapshot should hold."""
    if version == 1:
        return zlib.crc32(payload)
    # Bytes 8..51, then 56 to the end of the file: all but the magic and the field.
    return zlib.crc32(payload, zlib.crc32(head[56:HEADER_SIZE], zlib.crc32(head[8:52])))


def _payload_damage(data: bytes) -> str | None:
    fields = HEADER.unpack_from(data)
    version, crc, length = fields[1], fields[-2], fields[-1]
    view = memoryview(data)
    head, payload = view[:HEADER_SIZE], view[HEADER_SIZE:]
    if len(payload) != length or _checksum(head, payload, version) != crc:
        covers = "payload" if version == 1 else "header or payload"
        return f"checksum mismatch (truncated, or its {covers} damaged)"
    return None


def payload_damage(path: str) -> str | None:
    """What its checksum finds wrong with the snapshot at ``path``, or None.

    The header alone (``list_snapshots``) does not tell a damaged snapshot.
    The checksum of format 2 covers the header too, that of format 1 only
    the payload.
    """
    with open(path, "rb") as f:
        data = f.read()
    return _payload_damage(data)


def unusable_reason(info: SnapshotInfo, log: FrameChecks) -> str | None:
    """Why ``connect()`` would ignore this snapshot for ``log``, or None.

    Checks the header against the log; the payload checksum is checked when
    the snapshot is read (``read_snapshot``).
    """
    if info.store_id != log.store_id:
        return f"it belongs to another store (id {info.store_id.hex()})"
    if info.position > log.head:
        return f"it covers position {info.position}, past the log's end {log.head}"
    if info.projection_version not in LOADABLE_PROJECTION_VERSIONS:
        return _other_version(info)
    if info.fingerprint != SCHEMA_FINGERPRINT.hex():
        return f"event schema {info.fingerprint}, this code has {SCHEMA_FINGERPRINT.hex()}"
    if log.frame_checksum(info.position) != info.frame_checksum:
        return (
            "its frame checksum does not match the log (another store's, the log was cut, "
            "or a compaction by the writer rewrote that frame since)"
        )
    return None


async def load_newest(
    directory: str, log: FrameChecks, logger: logging.Logger
) -> Projections | None:
    """The newest snapshot that belongs to this log, or None (full replay).

    Each candidate is read, checked and decoded in a worker thread (it
    touches nothing shared); at 10M events that held the event loop for a
    quarter of a second.  Its header is checked against ``log`` here.
    """
    loop = asyncio.get_running_loop()
    snaps = list_snapshots(directory)
    for path, reason in unreadable_snapshots(directory, snaps):
        logger.warning("ignoring snapshot %s: %s", path, reason)
    for info in snaps:
        why = unusable_reason(info, log)
        if why is None:
            try:
                return (await loop.run_in_executor(None, read_snapshot, info.path))[1]
            except FileNotFoundError:
                # Removed since it was listed: the writer keeps the newest
                # two (and a compaction removes those it made stale).
                logger.info("snapshot %s was removed as it was read; trying older", info.path)
                continue
            except (OSError, IntegrityError) as err:
                why = str(err)
        logger.warning("ignoring snapshot %s: %s", info.path, why)
    return None


def encode_state(proj: Projections) -> bytes:
    """Serialise the projections now (on the caller's thread: the state is live)."""
    return _encoder.encode(proj.dump())


def write_snapshot(
    directory: str,
    store_id: bytes,
    position: int,
    payload: bytes,
    frame_checksum: int,
    keep: int = KEEP,
) -> str:
    """Write a snapshot atomically and drop all but the newest ``keep``; return its path."""
    fields = [
        MAGIC,
        FORMAT_VERSION,
        0,
        PROJECTION_VERSION,
        position,
        SCHEMA_FINGERPRINT,
        store_id,
        frame_checksum,
        0,  # the checksum, once the rest is known
        len(payload),
    ]
    fields[8] = _checksum(HEADER.pack(*fields), payload, FORMAT_VERSION)
    head = HEADER.pack(*fields)
    path = os.path.join(directory, snapshot_name(position))
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, head)
            write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as err:
        # Left behind, the partial file would keep the space it took (on a
        # full disk, the room the log's next writes need) until the next
        # snapshot that succeeds.  The older snapshots are untouched.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StorageError(
            f"{path}: cannot write the snapshot: {err.strerror or err}; "
            "the older snapshots are kept"
        ) from err
    # The new name is made durable before older snapshots go: removed first,
    # a crash could leave the directory with neither (a full replay).
    try:
        fsync_dir(directory)
    except OSError as err:
        raise StorageError(
            f"{path}: written, but the directory could not be synced: {err.strerror or err}; "
            "the older snapshots are kept"
        ) from err
    try:
        _remove_older(directory, path, position, keep)
    except OSError as err:
        raise StorageError(
            f"{path}: written, but removing older snapshots failed: "
            f"{err.filename + ': ' if err.filename else ''}{err.strerror or err}"
        ) from err
    return path


def _remove_older(directory: str, path: str, position: int, keep: int) -> None:
    listed = list_snapshots(directory)
    others = [info for info in listed if info.path != path]
    # One of a later position than the state just saved cannot be of this
    # log (it was cut since: a repair, or a tail lost in "flush" mode); it
    # must not count among the ``keep`` newest and push this one out.
    drop = [info.path for info in others if info.position > position]
    # Nor may one this code cannot load (other projection or event versions,
    # a header it cannot read): kept, it would also hold on to whatever a
    # forget_user since has erased from the current state.
    drop += [p for p, _ in unreadable_snapshots(directory, listed) if p != path]
    older = [info for info in others if info.position < position]
    drop += [info.path for info in older if not _loadable_version(info)]
    drop += [info.path for info in older if _loadable_version(info)][keep - 1 :]
    _remove(directory, drop, leftovers_of=path)


def _loadable_version(info: SnapshotInfo) -> bool:
    return (
        info.projection_version in LOADABLE_PROJECTION_VERSIONS
        and info.fingerprint == SCHEMA_FINGERPRINT.hex()
    )


def _other_version(info: SnapshotInfo) -> str:
    return (
        f"projection version {info.projection_version}, this code has {PROJECTION_VERSION} "
        f"(and loads {', '.join(map(str, sorted(LOADABLE_PROJECTION_VERSIONS)))})"
    )


def remove_snapshots(directory: str, *, before: int) -> int:
    """Remove the snapshots of positions before ``before``; return how many.

    Compaction calls this before it commits: a snapshot of a moment inside
    the range it rewrites describes a prefix of the old log, and the new log
    folds to the same state only at the end of that range (it drops events,
    a UserForgotten with the user's events, for one).  Such a snapshot
    loaded with the new log's tail would be wrong, and its frame checksum
    does not always tell (a frame re-encoded with the same bytes).
    """
    # By name, not by header: a snapshot whose header this code cannot read
    # may still hold what the rewritten range drops (a forgotten user).
    drop = [
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if (m := SNAPSHOT_RE.match(name)) and int(m.group(1)) < before
    ]
    _remove(directory, drop)
    return len(drop)


def _remove(directory: str, paths: list[str], leftovers_of: str | None = None) -> None:
    """Unlink ``paths`` and a crash's leftover ``*.snap.tmp`` files, durably.

    The callers hold the store's snapshot lock (one writer process, one
    snapshot at a time), so a temporary file other than ``leftovers_of``'s
    own is a crashed write's, and may hold a forgotten user's name.
    """
    own = None if leftovers_of is None else os.path.basename(leftovers_of) + ".tmp"
    paths = paths + [
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if name != own and name.startswith("snapshot-") and name.endswith(".snap.tmp")
    ]
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if paths:
        # The removals are made durable too: after compaction an older
        # snapshot names frames that moved, and must not come back after a
        # power cut.
        fsync_dir(directory)


def _removed_meanwhile(path: str, notes: list[str] | None) -> None:
    # A writer beside the check keeps the newest two and removes the rest
    # (a compaction removes those it made stale): not damage.
    if notes is not None:
        notes.append(f"{path}: removed by the writer while it was being checked")


async def check_snapshots(
    directory: str,
    *,
    ignored: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[str, int, str]]:
    """Compare every snapshot with a replay of the log up to its position.

    Returns problems as (path, offset, message); an empty list means every
    snapshot equals the replay.  Problems: a damaged file, a snapshot of
    another store, one that differs from the replay.  A snapshot connect()
    ignores without harm is not a problem: one of another version of the
    projections or events, one past the log's end or naming a frame the log
    does not have (written before the log was cut).  The next snapshot
    replaces or removes those; they are described in ``ignored``, if given.
    ``progress(n)`` is called as the replays go, with the log positions
    replayed so far (a replay per snapshot, each from position 1).
    """
    from .segmentlog import SegmentLog

    snaps = list_snapshots(directory)
    problems = [(path, 0, why) for path, why in unreadable_snapshots(directory, snaps)]
    if not snaps:
        return problems
    log = SegmentLog(directory, read_only=True)
    await log.open()
    done = 0  # positions replayed for the snapshots before this one
    try:
        for info in sorted(snaps, key=lambda i: i.position):
            if info.format_version >= 2:
                # Its checksum covers the header: a damaged field is found
                # here, not taken for another version or a cut log below.
                try:
                    damage = payload_damage(info.path)
                except FileNotFoundError:
                    _removed_meanwhile(info.path, ignored)
                    continue
                if damage is not None:
                    problems.append((info.path, 0, damage))
                    continue
            if info.store_id != log.store_id:
                problems.append((info.path, 32, "snapshot of another store (store id differs)"))
                continue
            m = SNAPSHOT_RE.match(os.path.basename(info.path))
            if m is not None and int(m.group(1)) != info.position:
                # Written under the name of its position: the header's is damaged
                # (it has no checksum of its own), not a snapshot past a cut.
                problems.append(
                    (
                        info.path,
                        16,
                        f"its header says position {info.position}, its name "
                        f"{int(m.group(1))}: the header is damaged",
                    )
                )
                continue
            why = unusable_reason(info, log)
            if why is not None:
                if ignored is not None:
                    ignored.append(
                        f"{info.path}: ignored by connect(): {why}; the next snapshot "
                        "replaces or removes it"
                    )
                continue
            try:
                _, loaded = read_snapshot(info.path)
            except FileNotFoundError:
                _removed_meanwhile(info.path, ignored)
                continue
            except (OSError, IntegrityError) as err:
                problems.append((info.path, 0, str(err).removeprefix(f"{info.path}: ")))
                continue
            replayed = Projections()
            async for group in log.read_groups(1, info.position):
                replayed.apply_runs(group)
                if progress is not None and group:
                    first, events = group[-1]
                    progress(done + first + len(events) - 1)
            done += info.position
            replayed.position = info.position
            if not replayed.same_state(loaded):
                problems.append(
                    (
                        info.path,
                        HEADER_SIZE,
                        f"differs from a replay up to position {info.position}",
                    )
                )
    finally:
        await log.close()
    return problems
