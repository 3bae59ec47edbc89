"""Finding damage in a store directory and, on request, cutting past it.

``connect()`` only ever cuts a torn tail (the end of the last segment, where
a crash mid-write leaves an incomplete frame).  Damage anywhere else makes
``connect()`` raise IntegrityError and stop: the log never skips a frame on
its own.  ``repair()`` is the operator's explicit decision to give up the
damaged frame and everything after it, keeping a copy of what it removes.
``cut_after()`` takes back the last events of a log, those an import that
did not finish added.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field

from .codec import decode_batch
from .compaction import pending_commit, recover_compaction
from .cuts import count_cut, settle_cuts
from .errors import IntegrityError, StorageError
from .framing import FrameWalker
from .fsutil import fsync_dir
from .importmarker import IMPORTING_MORE, position_before, remove_marker
from .lockfile import WriterLock
from .segment import (
    FLAG_COMPACTED,
    FLAG_HOLES,
    HEADER_SIZE,
    FrameError,
    check_fingerprint,
    list_segments,
    unpack_header,
)
from .snapshot import SNAPSHOT_RE
from .tailindex import TAIL_INDEX

__all__ = [
    "CutReport",
    "Damage",
    "RepairReport",
    "cut_after",
    "find_damage",
    "repair",
    "undo_import",
]

_CHUNK = 4 * 1024 * 1024

COMMIT_PENDING = (
    "a compaction was interrupted after it committed (the segments are a mix of "
    "old and new until it finishes); opening the store for writing, or repair(), "
    "finishes it"
)


@dataclass(frozen=True)
class Damage:
    """The first bad spot of a store: file, byte offset and what is wrong."""

    path: str
    offset: int
    reason: str
    #: Position of the last event before the damage (0 if none).
    last_good_position: int

    def __str__(self) -> str:
        return f"{self.path}: {self.reason} at offset {self.offset}"


@dataclass
class RepairReport:
    damage: Damage | None
    #: Files copied or moved aside, as ``*.broken`` (``*.broken.1``, ... if taken).
    set_aside: list[str] = field(default_factory=list)
    bytes_cut: int = 0
    #: What was done first about a compaction a crash interrupted, if anything.
    compaction: str | None = None

    @property
    def repaired(self) -> bool:
        return self.damage is not None


def find_damage(directory: str) -> Damage | None:
    """Check every header and frame (checksums and decoding) of every segment.

    Returns the first damage found, or None.  Unlike ``connect()`` this treats
    a torn tail as damage too, so it also reports what a crash left behind.
    A compaction interrupted after it committed is reported as such: until it
    is finished the segments are a mix, and their overlap is not damage.
    A segment written by newer code (a format version, flag or event tag
    this code does not know) is not damage either: MigrationError is raised,
    so that ``repair`` never cuts what it cannot read.
    """
    commit = pending_commit(directory)
    if commit is not None:
        return Damage(commit, 0, COMMIT_PENDING, 0)
    names, _ = list_segments(directory)
    next_position = 1
    prev_compacted = False
    store_id: bytes | None = None
    for first, name in names:
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            try:
                header = unpack_header(f.read(HEADER_SIZE), path)
                check_fingerprint(header, path)
            except IntegrityError as err:
                return Damage(path, 0, str(err).removeprefix(f"{path}: "), next_position - 1)
            if store_id is None:
                store_id = header.store_id
            elif header.store_id != store_id:
                return Damage(
                    path, 28, "segment of another store (store id differs)", next_position - 1
                )
            if first < next_position:
                return Damage(
                    path, 0, f"segment starts at {first}, before {next_position}", next_position - 1
                )
            compacted = bool(header.flags & FLAG_COMPACTED)
            # Compaction may leave gaps inside its segments and at their ends;
            # anywhere else a gap means events are missing.
            if first != next_position and not (compacted or prev_compacted):
                return Damage(
                    path,
                    0,
                    f"segment starts at {first}, expected {next_position} (events missing)",
                    next_position - 1,
                )
            prev_compacted = compacted
            holes = bool(header.flags & FLAG_HOLES)
            walker = FrameWalker(HEADER_SIZE, first, gaps_allowed=compacted)
            try:
                while True:
                    data = f.read(max(_CHUNK, walker.wanted()))
                    if not data:
                        break
                    for info, payload in walker.feed(data):
                        try:
                            events = decode_batch(payload, holes=holes)
                        except IntegrityError as err:
                            return Damage(path, info.offset, str(err), info.first_position - 1)
                        if len(events) != info.count:
                            return Damage(
                                path,
                                info.offset,
                                f"frame holds {len(events)} events, its header says {info.count}",
                                info.first_position - 1,
                            )
                bad = walker.finish()
            except FrameError as err:
                bad = err
            if bad is not None:
                return Damage(path, bad.offset, bad.reason, walker.next_position - 1)
            next_position = walker.next_position
    return None


def _free_name(path: str) -> str:
    """``path + ".broken"``, or the first of ``.broken.1``, ``.broken.2``, ... not taken."""
    aside = path + ".broken"
    n = 0
    while os.path.lexists(aside):
        n += 1
        aside = f"{path}.broken.{n}"
    return aside


def _copy_aside(path: str) -> str:
    """Copy ``path`` to a free ``.broken`` name and fsync the copy; return that name.

    Created with O_EXCL, so an existing copy is never written over even if a
    name is taken between the look and the create.  A crash during the copy
    leaves the original whole (nothing is cut yet); the next repair copies it
    again, under the next name.
    """
    while True:
        aside = _free_name(path)
        try:
            # Owner only, as every file of a store: it holds chat lines.
            fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "wb") as dst, open(path, "rb") as src:
                shutil.copyfileobj(src, dst, _CHUNK)
                dst.flush()
                shutil.copystat(path, aside)  # the times, as copy2 kept them
                os.fsync(dst.fileno())
        except OSError as err:
            # A partial copy left under a .broken name would pass for the
            # bytes repair keeps, and hold the space it took (the disk is
            # likely full); the next repair would copy to .broken.1.
            with contextlib.suppress(OSError):
                os.unlink(aside)
            raise StorageError(
                f"{path}: cannot copy it aside to {os.path.basename(aside)} before cutting "
                f"it: {err.strerror or err}; nothing was cut"
            ) from err
        return aside


def repair(directory: str, logger: logging.Logger | None = None) -> RepairReport:
    """Cut the log at its first damage, keeping copies of what is removed.

    The damaged segment is copied to ``<name>.broken`` and truncated at the
    last good frame; later segments (whose positions would follow a gap) are
    renamed to ``<name>.broken``.  Where an earlier repair left that name, the
    first free one of ``<name>.broken.1``, ``.2``, ... is taken: a segment
    repaired twice (or a name the log reused after a cut) must not lose the
    first copy.  Never run implicitly; takes the writer lock,
    so it refuses while a writer is open.  A compaction a crash interrupted is
    first finished (or undone, if it had not committed), as opening the store
    would: cutting a directory in the middle of a switch would set aside the
    new segments, and the switch would then delete the old ones.
    """
    log = logger or logging.getLogger("eventstore")
    lock = WriterLock(directory)
    lock.acquire()
    try:
        compaction = recover_compaction(directory, log, read_only=False)
        settle_cuts(directory)
        damage = find_damage(directory)
        report = RepairReport(damage, compaction=compaction)
        if damage is None:
            return report
        names, _ = list_segments(directory)
        paths = [os.path.join(directory, name) for _, name in names]
        at = paths.index(damage.path)
        broken = _copy_aside(damage.path)
        # The copy is durable before the original is cut: after a power cut
        # the bytes repair removes must still be somewhere.
        fsync_dir(directory)
        report.set_aside.append(broken)
        count_cut(directory)  # before and after, as cut_after does
        size = os.path.getsize(damage.path)
        if damage.offset < HEADER_SIZE:
            # The header itself is bad: the whole file goes aside.
            os.unlink(damage.path)
            report.bytes_cut += size
        else:
            with open(damage.path, "r+b") as f:
                f.truncate(damage.offset)
                f.flush()
                os.fsync(f.fileno())
            report.bytes_cut += size - damage.offset
        for path in paths[at + 1 :]:
            report.bytes_cut += os.path.getsize(path)
            aside = _free_name(path)
            # Free when looked at, and still free at the rename: we hold the
            # writer lock, and only repair makes these names.
            os.rename(path, aside)
            report.set_aside.append(aside)
        fsync_dir(directory)
        count_cut(directory)
        log.warning(
            "repaired %s: cut %d bytes at %s; copies in %s",
            directory,
            report.bytes_cut,
            damage,
            ", ".join(report.set_aside),
        )
        return report
    finally:
        lock.release()


@dataclass
class CutReport:
    #: The position the log was cut after: it holds no event after it now.
    position: int
    #: Bytes removed from the segment files, zeros a writer filled ahead included.
    bytes_cut: int = 0
    #: Files removed whole: segments after the cut, snapshots past it, the tail index.
    removed: list[str] = field(default_factory=list)


def cut_after(directory: str, position: int, logger: logging.Logger | None = None) -> CutReport:
    """Remove every event after ``position`` from the log, for good.

    For an import that did not finish (``eventstore import-sqlite`` into a
    store that held events; see ``undo_import``): its events are the log's
    last, and the file they came from still holds them, so no copy is
    kept.  Snapshots past ``position`` and the tail index go too.  Takes
    the writer lock, so it refuses while a writer is open.  A reader open
    meanwhile is told to open the store again at its next refresh().

    The cut must fall between two frames: a frame holding both ``position``
    and the event after it means those events were written together, not
    by an import that began after ``position``, and StorageError is raised
    with nothing changed.  So is damage in the segment the cut falls in,
    before the cut (IntegrityError; ``verify`` and ``repair`` are for
    damage; earlier segments are not read).  Anything after the cut, a torn
    tail included, is cut away.  A log that ends at or before ``position``
    is left as it is.  A crash part-way leaves a log that holds a prefix of
    what it held, and a second call finishes the cut: segments go last
    first, and the one the cut falls in is truncated last.
    """
    if type(position) is not int or position < 0:
        raise ValueError(f"position must be an int >= 0, got {position!r}")
    log = logger or logging.getLogger("eventstore")
    lock = WriterLock(directory)
    lock.acquire()
    try:
        return _cut(directory, position, log)
    finally:
        lock.release()


def undo_import(
    directory: str, before: int | None = None, logger: logging.Logger | None = None
) -> int | None:
    """Undo an unfinished import into a store that held events, as ``IMPORTING-MORE`` says.

    Under the writer lock: reads the position the marker names, cuts the
    log after it (``cut_after``) and removes the marker.  Returns that
    position; None, with nothing done, if there is no marker, or if
    ``before`` is given and the marker names another position (the run
    that wrote it was undone by another, which may since have imported
    anew: cutting then would remove that import).  IntegrityError if the
    marker names no position.
    """
    log = logger or logging.getLogger("eventstore")
    lock = WriterLock(directory)
    lock.acquire()
    try:
        position = position_before(directory)
        if position is None or (before is not None and position != before):
            return None
        _cut(directory, position, log)
        remove_marker(os.path.join(directory, IMPORTING_MORE))
        return position
    finally:
        lock.release()


def _cut(directory: str, position: int, log: logging.Logger) -> CutReport:
    """``cut_after``, with the writer lock held."""
    recover_compaction(directory, log, read_only=False)
    settle_cuts(directory)
    report = CutReport(position)
    names, _ = list_segments(directory)
    # The segment the cut falls in: the last one starting at or before
    # the first position to remove.
    keep = [seg for seg in names if seg[0] <= position + 1] or names[:1]
    if not keep:
        return report
    first, name = keep[-1]
    path = os.path.join(directory, name)
    offset = _cut_offset(path, first, position)
    later = [os.path.join(directory, name) for _, name in names[len(keep) :]]
    if offset is None and not later:
        return report  # the log ends at or before ``position``
    # Counted before and after: a reader that opens during the cut still
    # sees the count change once it is done.
    count_cut(directory)
    for name in sorted(os.listdir(directory), reverse=True):
        m = SNAPSHOT_RE.match(name)
        if m and int(m.group(1)) > position:
            os.unlink(os.path.join(directory, name))
            report.removed.append(os.path.join(directory, name))
    tail = os.path.join(directory, TAIL_INDEX)
    if os.path.exists(tail):
        os.unlink(tail)
        report.removed.append(tail)
    for seg in reversed(later):
        report.bytes_cut += os.path.getsize(seg)
        os.unlink(seg)
        report.removed.append(seg)
        fsync_dir(directory)
    if offset is not None:
        with open(path, "r+b") as f:
            report.bytes_cut += os.fstat(f.fileno()).st_size - offset
            f.truncate(offset)
            os.fsync(f.fileno())
    fsync_dir(directory)
    count_cut(directory)
    log.info("%s: cut the log after position %d (%d bytes)", directory, position, report.bytes_cut)
    return report


def _cut_offset(path: str, first: int, position: int) -> int | None:
    """Offset of the first frame of segment ``path`` past ``position``; None if none.

    Bad bytes where the events after ``position`` would begin (the torn
    frame of a killed writer) are cut there too; before that they are
    damage, and nothing is cut.
    """
    with open(path, "rb") as f:
        header = unpack_header(f.read(HEADER_SIZE), path)
        check_fingerprint(header, path)
        walker = FrameWalker(HEADER_SIZE, first, gaps_allowed=bool(header.flags & FLAG_COMPACTED))
        try:
            while data := f.read(max(_CHUNK, walker.wanted())):
                for info, _payload in walker.feed(data):
                    if info.first_position > position:
                        return info.offset
                    last = info.first_position + info.count - 1
                    if last > position:
                        raise StorageError(
                            f"{path}: the frame at offset {info.offset} holds positions "
                            f"{info.first_position}..{last}, so the log cannot be cut "
                            f"after {position}; nothing was cut"
                        )
            bad = walker.finish()
        except FrameError as err:
            bad = err
    if bad is None:
        return None
    if walker.next_position > position:
        return bad.offset
    raise IntegrityError(
        f"{path}: {bad.reason} at offset {bad.offset}, before position {position + 1}; "
        "nothing was cut (see eventstore verify)"
    )
