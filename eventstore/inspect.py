"""Looking into a store without opening it for writing: ``info``, ``dump``, ``tail``.

Everything here reads the files directly or through a read-only log: no lock
is taken and nothing is written, so all of it works while the bot runs.

* :func:`store_info` summarises a directory: its segments, event counts by
  type, the positions and times it covers, its snapshots and its writer.
* :func:`postgres_info` summarises a store in PostgreSQL from its tables:
  rows by type, positions and times, sizes, schema, compactions.
* :func:`read_events` yields stored events, filtered by position, type and
  user; :func:`tail_events` yields the last few and can then follow a live
  writer.  :func:`event_record` turns one into the JSON shape the CLI prints.
  Both take a store directory or a ``postgresql://`` URL.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .codec import decode_event
from .cuts import CUTS
from .errors import ConnectionError, IntegrityError, ValidationError
from .events import (
    READABLE_FINGERPRINTS,
    SCHEMA_FINGERPRINT,
    TYPES_BY_NAME,
    Event,
    event_name,
    event_tag,
    event_time,
)
from .lockfile import LOCK_NAME, lock_holder
from .log import EventLog
from .pglog import SCHEMA_VERSION, PostgresLog, is_dsn, redact_dsn, refuse_other_urls
from .segment import FRAME_HEADER_SIZE, FrameInfo, list_segments
from .segmentlog import SegmentLog
from .snapshot import SnapshotInfo, list_snapshots, payload_damage, unusable_reason
from .tailindex import TAIL_INDEX
from .verify import ATTEMPTS, Problem, scan_segment

__all__ = [
    "EventMark",
    "PostgresInfo",
    "SegmentSummary",
    "SnapshotSummary",
    "StoreInfo",
    "check_types",
    "directory_size",
    "event_record",
    "open_log",
    "postgres_info",
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
    info.other_files = sorted(
        n for n in stray if n not in (LOCK_NAME, TAIL_INDEX, CUTS) and n not in snap_names
    )
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
            nonlocal first, last, lo, hi, head
            counts.update(event_name(ev) for ev in events)
            times = [event_time(ev) for ev in events]
            t_lo, t_hi = min(times), max(times)
            lo = t_lo if lo is None or t_lo < lo else lo
            hi = t_hi if hi is None or t_hi > hi else hi
            if first is None:
                first = _mark(frame.first_position, events[0])
            end = frame.first_position + frame.count
            last = _mark(end - 1, events[-1])
            head = end - 1  # so far: a scan stopped by damage ends here
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
        # As the log counts it (a compacted tail may have dropped the last
        # events); a scan stopped by damage ends at its last good frame.
        head = scan.next_position - 1 if scan.next_position else max(head, position - 1)
    info.total_size = directory_size(directory)
    info.counts_by_type = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    info.first, info.last = first, last
    info.earliest_time, info.latest_time = lo, hi
    scanned = _ScannedLog(head, store_id, frame_at)
    info.snapshots = [
        SnapshotSummary(os.path.basename(s.path), s.size, s.position, _snapshot_status(s, scanned))
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


@dataclass
class _ScannedLog:
    """What ``unusable_reason`` needs from a log, from the scan ``store_info`` made."""

    head: int
    store_id: bytes | None
    frames: dict[int, tuple[str, int]]  # snapshot position -> (path, frame offset)

    def frame_checksum(self, position: int) -> int | None:
        frame = self.frames.get(position)
        if frame is None:
            return 0  # as SegmentLog: no frame starts at or before ``position``
        path, offset = frame
        with contextlib.suppress(OSError), open(path, "rb") as f:
            f.seek(offset)
            header = f.read(FRAME_HEADER_SIZE)
            if len(header) == FRAME_HEADER_SIZE:
                return int.from_bytes(header[4:8], "little")
        return None


def _snapshot_status(snap: SnapshotInfo, log: _ScannedLog) -> str:
    """Would ``connect()`` use this snapshot?  Its own rules, not a copy of them.

    Damage first where the checksum covers the header (format 2): a damaged
    field would otherwise read as another version, store or log.
    """
    why = None if snap.format_version < 2 else _damage(snap)
    if why is None:
        why = unusable_reason(snap, log)
    if why is None:
        why = _damage(snap)
    if why is not None:
        return f"ignored: {why}"
    if snap.position == log.head:
        return "current"
    return f"behind: {log.head - snap.position} positions before the log's end"


def _damage(snap: SnapshotInfo) -> str | None:
    try:
        return payload_damage(snap.path)
    except OSError as err:
        return f"unreadable: {err.strerror or err}"


# -- PostgreSQL ------------------------------------------------------------------------------

_NAMES_BY_TAG = {event_tag(cls): name for name, cls in TYPES_BY_NAME.items()}


@dataclass
class PostgresInfo:
    """What :func:`postgres_info` found in a store in PostgreSQL."""

    #: The store's URL, password hidden, and the schema its tables are in.
    where: str
    schema: str
    #: The tables' version, and the event schema fingerprint they record (hex),
    #: with whether this code reads it ("current", "readable ..." or "unreadable ...").
    schema_version: int
    fingerprint: str
    fingerprint_status: str
    #: The last position handed out (eventstore_head).
    head: int
    #: Rows in eventstore_events, by type (from the ``tag`` column; verify
    #: checks that it agrees with the payloads).
    rows: int = 0
    counts_by_type: dict[str, int] = field(default_factory=dict)
    first: EventMark | None = None
    last: EventMark | None = None
    #: When the first and last rows were committed (``recorded_at``), Unix seconds.
    recorded_first: int | None = None
    recorded_last: int | None = None
    #: Bytes of payload; of the events table with its indexes and TOAST
    #: (``pg_total_relation_size``); and of every table of the store.
    payload_bytes: int = 0
    table_size: int = 0
    total_size: int = 0
    #: Compactions run, positions they deleted, the head the last one covered
    #: and when it committed (Unix seconds).
    compactions: int = 0
    deleted: int = 0
    compacted_through: int | None = None
    last_compaction: int | None = None
    #: Damage met on the way (the first or last row does not decode).
    problems: list[str] = field(default_factory=list)


async def postgres_info(dsn: str) -> PostgresInfo:
    """Summarise the store in PostgreSQL at ``dsn`` from its tables.

    One read-only REPEATABLE READ transaction on a connection of its own:
    no lock, nothing written, a consistent picture beside running writers.
    Counts come from the ``tag`` column (one aggregate query, no decoding);
    only the first and last rows are decoded, for their times.  Raises
    :class:`~eventstore.errors.ConnectionError` if the server cannot be
    reached or holds no store.

    Example::

        info = await postgres_info("postgresql://bot@db/bot")
        print(info.rows, info.counts_by_type, info.table_size)
    """
    log = PostgresLog(dsn, read_only=True)
    where = redact_dsn(dsn)
    async with (
        log.dedicated() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        schema = await conn.fetchval(
            "SELECT relnamespace::regnamespace::text FROM pg_class "
            "WHERE oid = to_regclass('eventstore_schema')"
        )
        if schema is None:
            raise ConnectionError(
                f"{where}: no event store here (no table eventstore_schema on the search_path)"
            )
        tables = await conn.fetchrow(
            "SELECT to_regclass('eventstore_head') IS NOT NULL, "
            "to_regclass('eventstore_events') IS NOT NULL"
        )
        missing = [
            n
            for n, ok in zip(("eventstore_head", "eventstore_events"), tables, strict=True)
            if not ok
        ]
        if missing:
            # A store whose tables were dropped: not "no store here".  (As
            # eventstore verify says it.)
            raise IntegrityError(f"{where}: table {' and '.join(missing)} missing")
        meta = await conn.fetchrow(
            "SELECT (SELECT version FROM eventstore_schema LIMIT 1), "
            "(SELECT fingerprint FROM eventstore_schema LIMIT 1), "
            "(SELECT position FROM eventstore_head LIMIT 1)"
        )
        version, fingerprint = int(meta[0] or 0), bytes(meta[1] or b"")
        info = PostgresInfo(
            where,
            str(schema),
            version,
            fingerprint.hex(),
            _fingerprint_status(version, fingerprint),
            int(meta[2] or 0),
        )
        totals = await conn.fetchrow(
            "SELECT count(*), coalesce(sum(octet_length(payload)), 0), "
            "extract(epoch FROM min(recorded_at))::bigint, "
            "extract(epoch FROM max(recorded_at))::bigint, "
            "pg_total_relation_size('eventstore_events') FROM eventstore_events"
        )
        info.rows, info.payload_bytes = int(totals[0]), int(totals[1])
        info.recorded_first, info.recorded_last = totals[2], totals[3]
        info.table_size = int(totals[4])
        info.total_size = int(
            await conn.fetchval(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "WHERE c.relkind = 'r' AND c.relnamespace = $1::regnamespace "
                "AND starts_with(c.relname, 'eventstore_')",
                info.schema,
            )
        )
        by_tag = await conn.fetch("SELECT tag, count(*) FROM eventstore_events GROUP BY tag")
        counts = {_NAMES_BY_TAG.get(tag, f"tag {tag}"): int(n) for tag, n in by_tag}
        info.counts_by_type = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        ends = await conn.fetch(
            "(SELECT position, payload FROM eventstore_events ORDER BY position LIMIT 1) "
            "UNION ALL "
            "(SELECT position, payload FROM eventstore_events ORDER BY position DESC LIMIT 1)"
        )
        marks = [_row_mark(int(p), bytes(payload), info.problems) for p, payload in ends]
        if marks:
            info.first, info.last = marks[0], marks[-1]
        if await conn.fetchval("SELECT to_regclass('eventstore_compactions') IS NOT NULL"):
            books = await conn.fetchrow(
                "SELECT count(*), max(through), "
                "extract(epoch FROM max(finished_at))::bigint, "
                "(SELECT coalesce(sum(last_position - first_position + 1), 0) "
                "FROM eventstore_deleted) FROM eventstore_compactions"
            )
            info.compactions, info.compacted_through = int(books[0]), books[1]
            info.last_compaction, info.deleted = books[2], int(books[3])
    return info


def _fingerprint_status(version: int, fingerprint: bytes) -> str:
    if version > SCHEMA_VERSION or fingerprint not in READABLE_FINGERPRINTS:
        return "unreadable: written by newer code"
    return "current" if fingerprint == SCHEMA_FINGERPRINT else "readable (an older schema)"


def _row_mark(position: int, payload: bytes, problems: list[str]) -> EventMark | None:
    try:
        event = decode_event(msgspec.Raw(payload))
    except IntegrityError as err:
        problems.append(f"position {position}: {err}")
        return None
    return _mark(position, event)


# -- events ---------------------------------------------------------------------------------


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


async def open_log(
    target: str | os.PathLike[str], *, empty_ok: bool = False, pin_head: bool = False
) -> EventLog:
    """Open the log of a store directory or a ``postgresql://`` URL read-only.

    A directory without segment files is refused, unless ``empty_ok`` (a
    follower waiting for the bot to create its store there).  ``pin_head``
    (PostgreSQL) reads only up to the head found on opening, and records the
    compactions committed by then (``pinned_compactions``).
    """
    log: EventLog
    refuse_other_urls(target)
    if is_dsn(target):
        log = PostgresLog(str(target), read_only=True, create=False, pin_head=pin_head)
    else:
        d = os.fspath(target)
        # As the CLI says it (cli/output.need_store): a read-only open of
        # anything else would report an empty store, a likely wrong path.
        if os.path.isfile(d):
            raise ConnectionError(f"{d}: is a file, not a store directory")
        if not os.path.isdir(d):
            raise ConnectionError(f"{d}: no such store directory")
        if not empty_ok and not list_segments(d)[0]:
            raise ConnectionError(f"{d}: no event store here (no segment files)")
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

    ``directory`` may also be a ``postgresql://`` URL.  ``start`` and
    ``stop`` are inclusive positions; ``types`` are event type
    names (``TYPES_BY_NAME``; an unknown one raises ValidationError before
    anything is read); ``user`` matches an event's ``username``.  Reads
    through a read-only log: no lock, nothing written.  ``progress(done,
    total)`` is called in positions.

    Example::

        async for position, event in read_events("data/demo", types=["message_saved"]):
            print(position, event)
    """
    wanted = check_types(types) if types is not None else None
    log = await open_log(directory)
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
    seconds.  ``directory`` may also be a ``postgresql://`` URL; new rows
    then show as soon as their writer's notification arrives.  Stop it by
    leaving the loop or cancelling the task.

    With ``follow`` the directory may still be empty: the bot creates its
    store there later (a volume mounted before the bot starts).

    Example::

        async for position, event in tail_events("data/demo", 5, follow=True):
            print(position, event)
    """
    if count < 0:
        raise ValidationError(f"count must be >= 0, got {count}")
    log = await open_log(directory, empty_ok=follow)
    try:
        last = log.head
        for item in await _last(log, count):
            yield item
        while follow:
            # PostgreSQL wakes this early when something is appended
            # (LISTEN/NOTIFY); a directory is looked at every ``interval``,
            # and again at once when its last look stopped short.
            if not log.refresh_pending:
                await log.wait_for_appends(interval)
            head = await log.refresh()
            if head <= last:
                continue
            async for first, events in log.read_runs(last + 1, head):
                for i, event in enumerate(events):
                    yield first + i, event
            last = head
    finally:
        await log.close()


async def _last(log: EventLog, count: int) -> list[tuple[int, Event]]:
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
