"""Checking a store directory byte by byte: the operator's ``verify``.

:func:`verify` reads every segment file directly (no lock, nothing written,
safe beside a running writer) and checks

* every segment header: magic, checksum, format version, event schema, and
  that the first position in the header agrees with the file name;
* every frame: its checksum, that its payload decodes into as many events as
  its header says, and that positions continue without a gap or an overlap
  (within a segment, and from one segment to the next; compacted segments may
  leave gaps, never overlaps);
* every snapshot: that it equals a replay of the log up to its position
  (:func:`_check_snapshots`, only when the log itself is sound).

:func:`verify_postgres` does the same for a store in PostgreSQL, row by row:
every payload decodes into one event, the ``tag`` and ``username`` columns
agree with the payload, positions run from 1 to the head without a gap
except where a compaction recorded that it deleted rows, and no row lies
past the head.

Unlike ``recovery.find_damage``, which stops at the first damage because
``repair`` cuts there, verify reports *every* problem it can reach: after a
bad frame it cannot know where the next frame of that segment starts (the
length field may be what is damaged), so it gives up on the rest of that
segment and carries on with the next one.

:func:`scan_segment` is the one place that walks a segment's frames; ``info``
(:mod:`eventstore.inspect`) uses it too, so both agree on what is damage.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from . import snapshot
from .codec import decode_batch, decode_event, known_tags
from .compaction import pending_commit
from .cuts import CUTS
from .errors import ConnectionError, IntegrityError, MigrationError, StorageError
from .events import READABLE_FINGERPRINTS, Event
from .framing import FrameWalker, is_torn_tail
from .lockfile import lock_holder
from .pglog import SCHEMA_VERSION, PostgresLog, decode_rows, redact_dsn, username_column
from .recovery import COMMIT_PENDING
from .segment import (
    FLAG_COMPACTED,
    FLAG_HOLES,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    MAX_FRAME_PAYLOAD,
    FrameError,
    FrameInfo,
    check_fingerprint,
    list_segments,
    parse_frame,
    unpack_header,
)
from .snapshot import list_snapshots
from .tailindex import TAIL_INDEX

__all__ = [
    "PostgresVerifyReport",
    "Problem",
    "RowProblem",
    "SegmentScan",
    "VerifyReport",
    "scan_segment",
    "verify",
    "verify_postgres",
]

#: Bytes read per call while walking a segment.
READ_CHUNK = 4 * 1024 * 1024
#: How often a check starts over when a segment vanishes under it (a live
#: writer's compaction replaces segments), or waits COMMIT_WAIT seconds for
#: a live writer to finish switching segments.
ATTEMPTS = 3
COMMIT_WAIT = 0.2

#: Called with (bytes done, bytes in total).
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Problem:
    """One thing wrong: the file, the byte offset in it, and what is wrong."""

    path: str
    offset: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message} at offset {self.offset}"


@dataclass
class SegmentScan:
    """What walking one segment found."""

    path: str
    #: Size of the file when the walk began (bytes after it are not read).
    size: int
    #: First position in the file name (the header should agree).
    first_position: int
    compacted: bool = False
    #: The store id in the header (None if the header is unreadable).
    store_id: bytes | None = None
    frames: int = 0
    events: int = 0
    #: Positions of the segment's first and last events, None if it has none.
    first_event: int | None = None
    last_event: int | None = None
    #: Where the next segment should continue; None when damage hides it.
    next_position: int | None = None
    #: Bytes after the last complete frame that a live writer is still writing.
    in_progress: int = 0
    problems: list[Problem] = field(default_factory=list)


@dataclass
class VerifyReport:
    """What :func:`verify` checked and every problem it found."""

    directory: str
    segments: int = 0
    frames: int = 0
    events: int = 0
    bytes: int = 0
    first_position: int | None = None
    last_position: int | None = None
    #: Snapshots compared with a replay; None if they were not checked (the
    #: log itself has problems, so a replay could not be trusted).
    snapshots_checked: int | None = None
    problems: list[Problem] = field(default_factory=list)
    #: Remarks that are not problems (a live writer, files that are not segments).
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def scan_segment(
    path: str,
    first_position: int,
    *,
    expect: int | None = None,
    exact: bool = True,
    store_id: bytes | None = None,
    last: bool = False,
    writer_active: bool = False,
    on_frame: Callable[[FrameInfo, list[Event]], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> SegmentScan:
    """Walk one segment file: header, frames, checksums, decoding, continuity.

    ``expect`` is the position the previous segment says comes next (1 for
    the first); with ``exact=False`` it is only a lower bound (after a
    compacted segment, which may have lost events at its end, or after damage
    hid where the previous segment really ended).  ``store_id`` is the id the
    other segments carry (None: not known yet).  ``last`` marks
    the newest segment, the only one a crash can leave with a torn tail; with
    ``writer_active`` too, an incomplete frame at its very end is a write in
    progress, not damage.  ``on_frame(info, events)`` is called for every
    decoded frame, ``on_bytes(n)`` as bytes are read.  Raises OSError if the
    file cannot be read (``FileNotFoundError`` if it vanished).
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        scan = SegmentScan(path, size, first_position)

        def problem(offset: int, message: str) -> SegmentScan:
            scan.problems.append(Problem(path, offset, message))
            return scan

        head = f.read(HEADER_SIZE)
        if on_bytes is not None:
            on_bytes(len(head))
        try:
            header = unpack_header(head, path)
            check_fingerprint(header, path)
        except (IntegrityError, MigrationError) as err:
            return problem(0, str(err).removeprefix(f"{path}: ").removesuffix(" at offset 0"))
        scan.compacted = bool(header.flags & FLAG_COMPACTED)
        holes = bool(header.flags & FLAG_HOLES)
        scan.store_id = header.store_id
        if store_id is not None and header.store_id != store_id:
            problem(
                28,
                f"segment of another store (store id {header.store_id.hex()}, "
                f"the segments before it have {store_id.hex()})",
            )
        if header.first_position != first_position:
            problem(
                12,
                f"header says first position {header.first_position}, "
                f"the file name says {first_position}",
            )
        if expect is not None:
            if first_position < expect:
                problem(0, f"segment starts at position {first_position}, before {expect}")
            elif first_position > expect and exact and not scan.compacted:
                missing = (
                    f"position {expect} is"
                    if first_position == expect + 1
                    else f"positions {expect}..{first_position - 1} are"
                )
                problem(
                    0,
                    f"segment starts at position {first_position}, expected {expect} "
                    f"({missing} missing)",
                )

        # With a live writer, zeros at the end of the last segment are where it
        # is writing: frames may appear there while this reads, so the walk
        # stops at them instead of checking that only zeros follow.
        live = last and writer_active
        offset, position = HEADER_SIZE, first_position
        counted = offset  # bytes reported to on_bytes (a look again re-reads some)
        for attempt in range(ATTEMPTS):
            walker = FrameWalker(
                offset, position, gaps_allowed=scan.compacted, zeros_checked=not live
            )
            f.seek(offset)
            bad = None
            try:
                while offset < size:
                    data = f.read(min(max(READ_CHUNK, walker.wanted()), size - offset))
                    if not data:
                        break
                    offset += len(data)
                    if on_bytes is not None and offset > counted:
                        on_bytes(offset - counted)
                        counted = offset
                    for info, payload in walker.feed(data):
                        try:
                            events = decode_batch(payload, holes=holes)
                        except IntegrityError as err:
                            return problem(info.offset, str(err))
                        if len(events) != info.count:
                            return problem(
                                info.offset,
                                f"frame holds {len(events)} events, its header says {info.count}",
                            )
                        if holes:
                            events = [ev for ev in events if ev is not None]
                        scan.frames += 1
                        scan.events += len(events)
                        if scan.first_event is None:
                            scan.first_event = info.first_position
                        scan.last_event = info.first_position + info.count - 1
                        if on_frame is not None:
                            on_frame(info, events)
                bad = walker.finish()
            except FrameError as err:
                bad = err
            if bad is None:
                break
            fd = f.fileno()
            torn = (
                last
                and bad.offset == walker.offset
                and is_torn_tail(os.pread(fd, size - bad.offset, bad.offset), bad)
            )
            if torn and live:
                # The frame the writer is in the middle of (or the zeros it
                # is about to fill): not checked, not a problem.
                scan.in_progress = size - bad.offset
            elif torn:
                return problem(
                    bad.offset,
                    f"torn tail: {size - bad.offset} bytes after the last complete frame "
                    f"({bad.reason}); a crash mid-write leaves this, and the next writer "
                    "cuts it",
                )
            elif live and attempt < ATTEMPTS - 1 and _frame_parses_now(fd, bad.offset):
                # Read half-written, complete now (the writer went on while
                # this read): look again from that frame, the file grown.
                offset, position = walker.offset, walker.next_position
                size = scan.size = os.fstat(fd).st_size
                continue
            else:
                return problem(bad.offset, bad.reason)
            break
        scan.next_position = walker.next_position
        return scan


def _frame_parses_now(fd: int, offset: int) -> bool:
    """Does a complete, checksum-valid frame start at ``offset`` now?"""
    head = os.pread(fd, FRAME_HEADER_SIZE, offset)
    if len(head) < FRAME_HEADER_SIZE:
        return False
    # A damaged length can say 4 GiB: read no more than a frame may hold.
    length = min(int.from_bytes(head[:4], "little"), MAX_FRAME_PAYLOAD)
    data = head + os.pread(fd, length, offset + FRAME_HEADER_SIZE)
    try:
        parse_frame(data, 0)
    except FrameError:
        return False
    return True


def verify(directory: str | os.PathLike[str], progress: Progress | None = None) -> VerifyReport:
    """Check every byte of the store in ``directory`` and list every problem.

    Never holds the writer lock and never writes, so it is safe to run while
    the bot is writing (the frame the writer is in the middle of is then
    noted, not reported).  ``progress(done, total)`` is called as it goes,
    counting a unit per byte of the segments walked, then one per log
    position replayed to check the snapshots (each is compared with a
    replay from the first position).
    Raises :class:`~eventstore.errors.ConnectionError` if ``directory`` is not
    a directory; damage is reported, never raised.

    Example::

        report = verify("data")
        for problem in report.problems:
            print(problem)
    """
    d = os.fspath(directory)
    if not os.path.isdir(d):
        raise ConnectionError(f"{d}: no such store directory")
    for attempt in range(ATTEMPTS):
        commit = pending_commit(d)
        if commit is not None:
            if lock_holder(d) is not None and attempt < ATTEMPTS - 1:
                time.sleep(COMMIT_WAIT)  # a live writer is switching segments: ms
                continue
            # The segments are a mix of old and new until the switch is
            # finished: walking them would report overlaps that are not damage.
            report = VerifyReport(d)
            report.problems.append(Problem(commit, 0, COMMIT_PENDING))
            report.notes.append("segments not checked: a compaction's switch is unfinished")
            return report
        try:
            return _verify(d, progress)
        except FileNotFoundError:
            # A writer's compaction replaced segments while we read them;
            # start over on the new set.
            if attempt == ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _verify(directory: str, progress: Progress | None) -> VerifyReport:
    report = VerifyReport(directory)
    names, stray = list_segments(directory)
    writer = lock_holder(directory)
    paths = [os.path.join(directory, name) for _, name in names]
    walk = sum(os.path.getsize(p) for p in paths)
    replays = sum(info.position for info in list_snapshots(directory))
    total = walk + replays
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            # A live writer's segment grows while the walk reads the others.
            progress(min(done, total), total)

    # Compaction may leave gaps inside its segments and at their ends (it
    # drops events); anywhere else a gap means events are missing.
    expect, exact, store_id = 1, True, None
    for i, ((first, _name), path) in enumerate(zip(names, paths, strict=True)):
        scan = scan_segment(
            path,
            first,
            expect=expect,
            exact=exact,
            store_id=store_id,
            last=i == len(names) - 1,
            writer_active=writer is not None,
            on_bytes=on_bytes,
        )
        report.segments += 1
        report.frames += scan.frames
        report.events += scan.events
        report.bytes += scan.size
        if scan.first_event is not None and report.first_position is None:
            report.first_position = scan.first_event
        if scan.last_event is not None:
            report.last_position = scan.last_event
        report.problems.extend(scan.problems)
        if scan.in_progress:
            report.notes.append(
                f"{path}: the writer (process {writer}) was writing {scan.in_progress} bytes "
                f"at offset {scan.size - scan.in_progress}; not checked"
            )
        if store_id is None:
            store_id = scan.store_id
        if scan.next_position is not None:
            expect, exact = scan.next_position, not scan.compacted
        else:
            # Damage hides where this segment really ends: the next one can
            # only be checked for overlap with what was read.
            seen = scan.last_event if scan.last_event is not None else first - 1
            expect, exact = max(seen + 1, expect), False

    skipped = [n for n in stray if not _known_file(n)]
    if skipped:
        report.notes.append(f"not segments, not checked: {', '.join(sorted(skipped))}")
    if report.problems:
        report.notes.append("snapshots not checked: the log itself has problems")
    else:
        # From what the walk read: never back, if a writer made it longer.
        walked = max(done, walk)
        total = walked + replays

        def replayed(positions: int) -> None:
            if progress is not None:
                progress(min(walked + positions, total), total)

        report.problems.extend(_check_snapshots(directory, report.notes, replayed))
        report.snapshots_checked = len(list_snapshots(directory))
    if progress is not None:
        progress(total, total)
    return report


def _known_file(name: str) -> bool:
    # tail.index is only a hint, checked by the writer that uses it (tailindex.py).
    return name in ("LOCK", TAIL_INDEX, CUTS) or (
        name.startswith("snapshot-") and name.endswith(".snap")
    )


def _check_snapshots(
    directory: str, notes: list[str], progress: Callable[[int], None]
) -> list[Problem]:
    """Compare every snapshot with a replay of the log up to its position.

    The comparison lives in :mod:`eventstore.snapshot` (``check_snapshots``);
    this hook adapts it: it may be a coroutine function (it is then run on its
    own event loop in a worker thread, so ``verify`` works both inside and
    outside a running loop) and its problems may be ``Problem``s or ``(path,
    offset, message)`` tuples.  Without that function it checks nothing.
    Snapshots connect() ignores without harm are described in ``notes``.
    """
    check = getattr(snapshot, "check_snapshots", None)
    if check is None:  # pragma: no cover - the function ships with the store
        return []
    try:
        found = _call(lambda d: check(d, ignored=notes, progress=progress), directory)
    except (StorageError, OSError) as err:
        return [Problem(directory, 0, f"snapshot check failed: {err}")]
    return [_as_problem(p) for p in found]


def _call(func: Callable[[str], Any], directory: str) -> Sequence[Any]:
    result = func(directory)
    if not asyncio.iscoroutine(result):
        return list(result)
    coro = result
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as err:
            box["error"] = err

    worker = threading.Thread(target=run, name="eventstore-verify-snapshots")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return list(box["value"])


def _as_problem(item: Any) -> Problem:
    if isinstance(item, Problem):
        return item
    if isinstance(item, tuple) and len(item) == 3:
        path, offset, message = item
        return Problem(str(path), int(offset), str(message))
    return Problem(
        str(getattr(item, "path", "?")),
        int(getattr(item, "offset", 0)),
        str(getattr(item, "message", item)),
    )


# -- PostgreSQL ------------------------------------------------------------------------------

#: Rows decoded per call while verifying a PostgreSQL store.
PG_BATCH_ROWS = 2_000


@dataclass(frozen=True)
class RowProblem:
    """One thing wrong in a PostgreSQL store: the row's position (None: not one
    row's), and what is wrong."""

    position: int | None
    message: str

    def __str__(self) -> str:
        return (
            self.message if self.position is None else f"position {self.position}: {self.message}"
        )


@dataclass
class PostgresVerifyReport:
    """What :func:`verify_postgres` checked and every problem it found."""

    #: The store's URL, password hidden.
    where: str
    schema_version: int | None = None
    #: The event schema fingerprint the tables record (hex).
    fingerprint: str | None = None
    #: The position in ``eventstore_head``: the last one handed out.
    head: int | None = None
    rows: int = 0
    #: Bytes of payload in those rows.
    bytes: int = 0
    first_position: int | None = None
    last_position: int | None = None
    #: Positions that compactions recorded as deleted, and how many compactions ran.
    deleted: int = 0
    compactions: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class _TagOnly(msgspec.Struct, array_like=True):
    """The first element of an encoded event: its tag (the rest is skipped)."""

    tag: int


_tag_decoder = msgspec.msgpack.Decoder(_TagOnly)


async def verify_postgres(dsn: str, progress: Progress | None = None) -> PostgresVerifyReport:
    """Check every row of the PostgreSQL store at ``dsn`` and list every problem.

    Reads one consistent snapshot (a read-only REPEATABLE READ transaction
    on a connection of its own): no lock, nothing written, safe beside
    running writers, whose later appends it does not see.  Checks the schema
    row (version, fingerprint), that every payload decodes into one event
    whose tag and username agree with the ``tag`` and ``username`` columns,
    that positions run 1..head with gaps only where ``eventstore_deleted``
    says a compaction deleted rows, that no recorded deletion has a row, and
    that no row lies past the head.  ``progress(done, total)`` is called in
    positions.  Raises :class:`~eventstore.errors.ConnectionError` if the
    server cannot be reached or holds no store; damage is reported, never
    raised.

    Example::

        report = await verify_postgres("postgresql://bot@db/bot")
        for problem in report.problems:
            print(problem)
    """
    log = PostgresLog(dsn, read_only=True)
    report = PostgresVerifyReport(redact_dsn(dsn))
    async with (
        log.dedicated() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        await _pg_check_tables(conn, report)
        ranges = await _pg_check_books(conn, report)
        head = report.head or 0
        walk = _RowWalk(report, ranges, head)
        batch: list[Any] = []
        async for row in conn.cursor(
            "SELECT position, tag, payload, username FROM eventstore_events ORDER BY position",
            prefetch=PG_BATCH_ROWS,
        ):
            batch.append(row)
            if len(batch) >= PG_BATCH_ROWS:
                walk.check(batch, report.where)
                batch = []
                if progress is not None:
                    progress(min(walk.expect - 1, head), head)
        walk.check(batch, report.where)
        walk.finish()
        if progress is not None:
            progress(head, head)
    return report


async def _pg_check_tables(conn: Any, report: PostgresVerifyReport) -> None:
    tables = await conn.fetchrow(
        "SELECT to_regclass('eventstore_schema') IS NOT NULL, "
        "to_regclass('eventstore_head') IS NOT NULL, "
        "to_regclass('eventstore_events') IS NOT NULL"
    )
    if not tables[0]:
        raise ConnectionError(
            f"{report.where}: no event store here (no table eventstore_schema on the search_path)"
        )
    if not (tables[1] and tables[2]):
        missing = [
            n
            for n, ok in (("eventstore_head", tables[1]), ("eventstore_events", tables[2]))
            if not ok
        ]
        raise IntegrityError(f"{report.where}: table {' and '.join(missing)} missing")
    schema = await conn.fetch("SELECT version, fingerprint FROM eventstore_schema")
    if len(schema) != 1:
        report.problems.append(RowProblem(None, f"eventstore_schema has {len(schema)} rows, not 1"))
    else:
        version, fingerprint = schema[0][0], bytes(schema[0][1])
        report.schema_version, report.fingerprint = version, fingerprint.hex()
        if version > SCHEMA_VERSION or version < 1:
            report.problems.append(
                RowProblem(
                    None,
                    f"schema version {version}: this code knows versions 1..{SCHEMA_VERSION}",
                )
            )
        if fingerprint not in READABLE_FINGERPRINTS:
            report.problems.append(
                RowProblem(
                    None,
                    f"events were written with schema fingerprint {fingerprint.hex()}, "
                    "which this code cannot read (newer code wrote them?)",
                )
            )
    heads = await conn.fetch("SELECT position FROM eventstore_head")
    if len(heads) != 1:
        report.problems.append(RowProblem(None, f"eventstore_head has {len(heads)} rows, not 1"))
    else:
        report.head = int(heads[0][0])


async def _pg_check_books(conn: Any, report: PostgresVerifyReport) -> list[tuple[int, int]]:
    """The deleted ranges compactions recorded (checked for overlaps and the head)."""
    if not await conn.fetchval("SELECT to_regclass('eventstore_compactions') IS NOT NULL"):
        return []
    report.compactions = int(await conn.fetchval("SELECT count(*) FROM eventstore_compactions"))
    rows = await conn.fetch(
        "SELECT first_position, last_position FROM eventstore_deleted ORDER BY first_position"
    )
    ranges = [(int(r[0]), int(r[1])) for r in rows]
    head = report.head or 0
    previous = 0
    for first, last in ranges:
        report.deleted += last - first + 1
        if first <= previous:
            report.problems.append(
                RowProblem(first, f"deleted range {first}..{last} overlaps the one before it")
            )
        if first < 1 or last > head:
            report.problems.append(
                RowProblem(first, f"deleted range {first}..{last} lies outside 1..{head}")
            )
        previous = max(previous, last)
    return ranges


class _RowWalk:
    """Walks the rows in position order: decoding, columns, continuity."""

    def __init__(
        self, report: PostgresVerifyReport, ranges: list[tuple[int, int]], head: int
    ) -> None:
        self.report = report
        self.ranges = ranges
        self.starts = [first for first, _ in ranges]
        self.head = head
        self.expect = 1
        self.known = known_tags()

    def _deleted_range(self, position: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self.starts, position) - 1
        if i >= 0 and self.ranges[i][1] >= position:
            return self.ranges[i]
        return None

    def _missing(self, first: int, last: int) -> None:
        """Positions first..last hold no row: fine where a compaction deleted them."""
        position = first
        i = max(0, bisect.bisect_right(self.starts, first) - 1)
        holes: list[tuple[int, int]] = []
        while position <= last:
            while i < len(self.ranges) and self.ranges[i][1] < position:
                i += 1
            if i < len(self.ranges) and self.ranges[i][0] <= position:
                position = self.ranges[i][1] + 1
                continue
            end = last if i >= len(self.ranges) else min(last, self.ranges[i][0] - 1)
            holes.append((position, end))
            position = end + 1
        for a, b in holes:
            what, them = (
                (f"position {a} is", "it") if a == b else (f"positions {a}..{b} are", "them")
            )
            self.report.problems.append(
                RowProblem(a, f"missing: {what} not in the table and no compaction deleted {them}")
            )

    def check(self, batch: list[Any], where: str) -> None:
        if not batch:
            return
        report = self.report
        positions = [int(r[0]) for r in batch]
        payloads = [bytes(r[2]) for r in batch]
        try:
            events: list[Event | None] = list(decode_rows(payloads, positions, where))
        except IntegrityError:
            events = [
                self._decode_one(p, payload) for p, payload in zip(positions, payloads, strict=True)
            ]
        for row, position, payload, event in zip(batch, positions, payloads, events, strict=True):
            report.rows += 1
            report.bytes += len(payload)
            if report.first_position is None:
                report.first_position = position
            report.last_position = position
            if position > self.expect:
                self._missing(self.expect, position - 1)
            self.expect = position + 1
            if position > self.head:
                report.problems.append(
                    RowProblem(position, f"past the head {self.head} in eventstore_head")
                )
            span = self._deleted_range(position)
            if span is not None:
                report.problems.append(
                    RowProblem(
                        position,
                        f"holds a row, but a compaction recorded {span[0]}..{span[1]} as deleted",
                    )
                )
            if event is None:
                continue
            tag = self._payload_tag(payload)
            if tag != row[1]:
                report.problems.append(
                    RowProblem(position, f"tag column says {row[1]}, the payload's tag is {tag}")
                )
            name = username_column(event)
            if name != row[3]:
                report.problems.append(
                    RowProblem(position, f"username column says {row[3]!r}, the payload {name!r}")
                )

    def _decode_one(self, position: int, payload: bytes) -> Event | None:
        try:
            return decode_event(msgspec.Raw(payload))
        except IntegrityError as err:
            tag = self._payload_tag(payload)
            why = (
                f"unknown event tag {tag} (written by newer code?)"
                if tag is not None and tag not in self.known
                else str(err)
            )
            self.report.problems.append(RowProblem(position, f"payload does not decode: {why}"))
            return None

    @staticmethod
    def _payload_tag(payload: bytes) -> int | None:
        try:
            return _tag_decoder.decode(payload).tag
        except msgspec.DecodeError:
            return None

    def finish(self) -> None:
        if self.expect <= self.head:
            self._missing(self.expect, self.head)
