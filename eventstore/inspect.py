"""Looking into a store without opening it for writing: ``info``, ``dump``, ``tail``.

Everything here reads the files directly or through a read-only log: no lock
is taken and nothing is written, so all of it works while the bot runs.

* :func:`store_info` summarises a directory: its segments, event counts by
  type, the positions and times it covers, its snapshots and its writer.
* :func:`read_events` yields stored events, filtered by position, type and
  user; :func:`tail_events` yields the last few and can then follow a live
  writer.  :func:`event_record` turns one into the JSON shape the CLI prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import msgspec

from projections import PROJECTION_VERSION

from .errors import ConnectionError, ValidationError
from .events import SCHEMA_FINGERPRINT, TYPES_BY_NAME, Event, event_name, event_time
from .lockfile import LOCK_NAME, lock_holder
from .segment import FRAME_HEADER_SIZE, FrameInfo, list_segments
from .segmentlog import SegmentLog
from .snapshot import SnapshotInfo, list_snapshots
from .verify import ATTEMPTS, Problem, scan_segment

__all__ = [
    "EventMark",
    "SegmentSummary",
    "SnapshotSummary",
    "StoreInfo",
    "check_types",
    "directory_size",
    "event_record",
    "read_events",
    "store_info",
    "tail_events",
]

#: Called with (bytes done, bytes in total).
Progress = Callable[[int, int], None]

#: How often ``tail_events(follow=...)`` looks for new events, in seconds.
FOLLOW_INTERVAL = 0.5


@dataclass(frozen=True)
class SegmentSummary:
    name: str
    size: int
    #: The position in the file name; the segment's events start there or later.
    first_position: int
    events: int
    #: Position of its last event, None if it holds none.
    last_position: int | None
    #: Rewritten by compaction (its positions may have gaps).
    compacted: bool


@dataclass(frozen=True)
class EventMark:
    """One event, briefly: where it is, the moment it describes, its type."""

    position: int
    time: int
    type: str


@dataclass(frozen=True)
class SnapshotSummary:
    name: str
    size: int
    #: The last event the snapshot includes.
    position: int
    #: "current" (matches the log), "behind" (valid, older than the log's
    #: end), or why ``connect()`` would ignore it.
    status: str


@dataclass
class StoreInfo:
    """What :func:`store_info` found in a store directory."""

    directory: str
    segments: list[SegmentSummary] = field(default_factory=list)
    #: Bytes in segment files, and in every file of the directory.
    segments_size: int = 0
    total_size: int = 0
    events: int = 0
    #: Event type name -> how many (names as in ``TYPES_BY_NAME``).
    counts_by_type: dict[str, int] = field(default_factory=dict)
    first: EventMark | None = None
    last: EventMark | None = None
    #: Earliest and latest ``event_time`` of any event (imports are back-dated,
    #: so these need not be the first and last events' times).
    earliest_time: int | None = None
    latest_time: int | None = None
    snapshots: list[SnapshotSummary] = field(default_factory=list)
    #: Pid of the process holding the writer lock; -1 if held but the pid is
    #: unreadable; None if no writer is open.
    writer_pid: int | None = None
    #: Files that are neither segments, snapshots nor the lock.
    other_files: list[str] = field(default_factory=list)
    #: Damage met while reading (``verify`` lists all of it).
    problems: list[Problem] = field(default_factory=list)
    #: Bytes at the end of the last segment a live writer was still writing.
    in_progress: int = 0


def store_info(directory: str | os.PathLike[str], progress: Progress | None = None) -> StoreInfo:
    """Summarise the store in ``directory``, reading its files directly.

    Takes no lock and writes nothing, so it works while a writer runs.  Every
    frame is checked and decoded (counting by type needs the events), so it
    costs about as much as a replay; ``progress(done, total)`` is called in
    bytes.  Damage does not stop it: the damaged segment's remaining frames
    are skipped and listed in ``problems``.  Raises
    :class:`~eventstore.errors.ConnectionError` if ``directory`` is not a
    directory.

    Example::

        info = store_info("data")
        print(info.events, info.counts_by_type, info.writer_pid)
    """
    d = os.fspath(directory)
    if not os.path.isdir(d):
        raise ConnectionError(f"{d}: no such store directory")
    for attempt in range(ATTEMPTS):
        try:
            return _store_info(d, progress)
        except FileNotFoundError:
            # A live writer's compaction swapped segments under us: start over.
            if attempt == ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _store_info(directory: str, progress: Progress | None) -> StoreInfo:
    info = StoreInfo(directory, writer_pid=lock_holder(directory))
    names, stray = list_segments(directory)
    snaps = list_snapshots(directory)
    snap_names = {os.path.basename(s.path) for s in snaps}
    info.other_files = sorted(n for n in stray if n != LOCK_NAME and n not in snap_names)
    paths = [os.path.join(directory, name) for _, name in names]
    total = sum(os.path.getsize(p) for p in paths)
    done = 0
    counts: Counter[str] = Counter()
    first: EventMark | None = None
    last: EventMark | None = None
    lo: int | None = None
    hi: int | None = None
    # A snapshot belongs to this log only if the last frame starting at or
    # before its position has the checksum it recorded (see snapshot.py):
    # note where those frames are.
    wanted = sorted({s.position for s in snaps})
    frame_at: dict[int, tuple[str, int]] = {}  # snapshot position -> (path, frame offset)
    store_id: bytes | None = None
    head = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    for i, ((position, name), path) in enumerate(zip(names, paths, strict=True)):

        def on_frame(frame: FrameInfo, events: list[Event], path: str = path) -> None:
            nonlocal first, last, lo, hi
            counts.update(event_name(ev) for ev in events)
            times = [event_time(ev) for ev in events]
            t_lo, t_hi = min(times), max(times)
            lo = t_lo if lo is None or t_lo < lo else lo
            hi = t_hi if hi is None or t_hi > hi else hi
            if first is None:
                first = _mark(frame.first_position, events[0])
            end = frame.first_position + frame.count
            last = _mark(end - 1, events[-1])
            for pos in wanted:
                if frame.first_position <= pos:
                    frame_at[pos] = (path, frame.offset)

        scan = scan_segment(
            path,
            position,
            last=i == len(names) - 1,
            writer_active=info.writer_pid is not None,
            on_frame=on_frame,
            on_bytes=on_bytes,
        )
        info.segments.append(
            SegmentSummary(name, scan.size, position, scan.events, scan.last_event, scan.compacted)
        )
        info.segments_size += scan.size
        info.events += scan.events
        info.problems.extend(scan.problems)
        info.in_progress += scan.in_progress
        store_id = store_id or scan.store_id
        # As the log counts it: a compacted tail may have dropped the last events.
        head = (scan.next_position or position) - 1
    info.total_size = directory_size(directory)
    info.counts_by_type = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    info.first, info.last = first, last
    info.earliest_time, info.latest_time = lo, hi
    info.snapshots = [
        SnapshotSummary(
            os.path.basename(s.path),
            s.size,
            s.position,
            _snapshot_status(s, store_id, head, frame_at.get(s.position)),
        )
        for s in snaps
    ]
    return info


def _mark(position: int, event: Event) -> EventMark:
    return EventMark(position, event_time(event), event_name(event))


def directory_size(directory: str | os.PathLike[str]) -> int:
    """Bytes in the regular files of ``directory`` (segments, snapshots, the lock)."""
    size = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False):
                    size += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
    return size


def _snapshot_status(
    snap: SnapshotInfo, store_id: bytes | None, head: int, frame: tuple[str, int] | None
) -> str:
    """Would ``connect()`` use this snapshot?  The rules of ``snapshot.load_newest``."""
    if store_id is not None and snap.store_id != store_id:
        return f"ignored: belongs to another store (id {snap.store_id.hex()})"
    if snap.projection_version != PROJECTION_VERSION:
        return (
            f"ignored: projection version {snap.projection_version}, "
            f"this code has {PROJECTION_VERSION}"
        )
    if snap.fingerprint != SCHEMA_FINGERPRINT.hex():
        return f"ignored: written for event schema {snap.fingerprint}"
    if snap.position > head:
        return f"ignored: covers position {snap.position}, past the log's end {head}"
    crc = None
    if frame is not None:
        path, offset = frame
        with contextlib.suppress(OSError), open(path, "rb") as f:
            f.seek(offset)
            header = f.read(FRAME_HEADER_SIZE)
            if len(header) == FRAME_HEADER_SIZE:
                crc = int.from_bytes(header[4:8], "little")
    if crc != snap.frame_checksum:
        return "ignored: its frame checksum does not match the log (the log was cut?)"
    if snap.position == head:
        return "current"
    return f"behind: {head - snap.position} positions before the log's end"


# -- events ---------------------------------------------------------------------------


def event_record(position: int, event: Event) -> dict[str, Any]:
    """``{"position": p, "type": "<event name>", <the event's fields>}``.

    The shape of ``eventstore dump`` and of ``legacy.export_jsonl``.
    """
    record: dict[str, Any] = {"position": position, "type": event_name(event)}
    record.update(msgspec.structs.asdict(event))
    return record


def check_types(types: Collection[str]) -> frozenset[type]:
    """The event classes named by ``types``; ValidationError names unknown ones."""
    unknown = sorted(set(types) - TYPES_BY_NAME.keys())
    if unknown:
        names = ", ".join(repr(t) for t in unknown)
        raise ValidationError(
            f"unknown event type{'s' if len(unknown) > 1 else ''} {names}; "
            f"valid types: {', '.join(sorted(TYPES_BY_NAME))}"
        )
    return frozenset(TYPES_BY_NAME[t] for t in types)


async def _open_log(directory: str | os.PathLike[str]) -> SegmentLog:
    d = os.fspath(directory)
    if not os.path.isdir(d):
        raise ConnectionError(f"{d}: no such store directory")
    log = SegmentLog(d, read_only=True)
    await log.open()
    return log


async def read_events(
    directory: str | os.PathLike[str],
    *,
    start: int = 1,
    stop: int | None = None,
    types: Collection[str] | None = None,
    user: str | None = None,
    progress: Progress | None = None,
) -> AsyncGenerator[tuple[int, Event], None]:
    """Yield (position, event) for the stored events that match, oldest first.

    ``start`` and ``stop`` are inclusive positions; ``types`` are event type
    names (``TYPES_BY_NAME``; an unknown one raises ValidationError before
    anything is read); ``user`` matches an event's ``username``.  Reads
    through a read-only log: no lock, nothing written.  ``progress(done,
    total)`` is called in positions.

    Example::

        async for position, event in read_events("data", types=["message_saved"]):
            print(position, event)
    """
    wanted = check_types(types) if types is not None else None
    log = await _open_log(directory)
    try:
        head = log.head if stop is None else min(stop, log.head)
        async for first, events in log.read_runs(start, stop):
            for i, event in enumerate(events):
                if wanted is not None and type(event) not in wanted:
                    continue
                if user is not None and getattr(event, "username", None) != user:
                    continue
                yield first + i, event
            if progress is not None:
                progress(min(first + len(events) - 1, head), head)
    finally:
        await log.close()


async def tail_events(
    directory: str | os.PathLike[str],
    count: int = 10,
    *,
    follow: bool = False,
    interval: float = FOLLOW_INTERVAL,
) -> AsyncGenerator[tuple[int, Event], None]:
    """Yield the last ``count`` events; with ``follow``, then every new one, for ever.

    Following works beside a live writer: the log is opened read-only and
    ``refresh()`` picks up what the writer appended, every ``interval``
    seconds.  Stop it by leaving the loop or cancelling the task.

    Example::

        async for position, event in tail_events("data", 5, follow=True):
            print(position, event)
    """
    if count < 0:
        raise ValidationError(f"count must be >= 0, got {count}")
    log = await _open_log(directory)
    try:
        last = log.head
        for item in await _last(log, count):
            yield item
        while follow:
            await asyncio.sleep(interval)
            head = await log.refresh()
            if head <= last:
                continue
            async for first, events in log.read_runs(last + 1, head):
                for i, event in enumerate(events):
                    yield first + i, event
            last = head
    finally:
        await log.close()


async def _last(log: SegmentLog, count: int) -> list[tuple[int, Event]]:
    """The last ``count`` stored events (compaction may leave gaps: look further back)."""
    head = log.head
    if count == 0 or head == 0:
        return []
    span = count
    while True:
        start = max(1, head - span + 1)
        found = [item async for item in log.read(start, head)]
        if len(found) >= count or start == 1:
            return found[-count:]
        span *= 4
