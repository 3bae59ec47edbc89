"""Compaction: rewrite sealed segments without what no read can see any more.

What goes:

* messages deleted by ``clear_old_messages``, user counts trimmed by a
  retention decision, and every row of a forgotten user;
* a user's many stat updates, folded into one absolute ``UserStatsSet`` at the
  position of the last of them (likewise the channel peaks, into one
  ``ChannelStatsSet``);
* ``UserForgotten`` events themselves, once the user's earlier events are gone
  (the name must not survive in any segment).

Positions never change: kept events keep theirs, folded events take the
position of the last event they replace, and the rewritten segments are
flagged as compacted so that readers accept the gaps.

Why it is safe.  Before anything is switched, the projections are rebuilt
twice, from the old log and from the new one (both up to the same position),
and compared; if they differ, nothing changes and IntegrityError is raised.

Why it is crash-safe.  New segments are written into ``compacting/`` and
fsynced; then ``compacting/COMMIT`` (the names of the old and new segments) is written
and fsynced: that is the moment of decision.  Only then are new segments
renamed into place and the old ones removed.  ``SegmentLog.open`` finishes a
committed compaction (roll forward) or deletes an uncommitted one (roll back)
before it lists segments, so a store killed at any moment opens with either
all old or all new segments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import is_not
from typing import TYPE_CHECKING, Any

from projections import Projections
from projections.channel_stats import ChannelStatsProjection
from projections.sorted_index import SortedIndex
from projections.user_stats import UserStatsProjection

from .errors import ConnectionError, IntegrityError, MigrationError, StorageError
from .events import (
    READABLE_FINGERPRINTS,
    SCHEMA_FINGERPRINT,
    ChannelPeakRaised,
    ChannelStatsSet,
    Event,
    MessageSaved,
    SessionEnded,
    UserActionLogged,
    UserCountLogged,
    UserForgotten,
    UserStatsSaved,
    UserStatsSet,
    event_name,
)
from .fsutil import fsync_dir, write_all
from .lockfile import lock_holder
from .logthread import outlive_cancels
from .segment import (
    FLAG_COMPACTED,
    FLAG_HOLES,
    FRAME_EVENTS,
    HEADER_SIZE,
    SEGMENT_RE,
    encode_frames,
    pack_header,
    segment_name,
    unpack_header,
)
from .snapshot import remove_snapshots

if TYPE_CHECKING:
    from .segmentlog import Segment, SegmentLog

__all__ = [
    "COMPACT_DIR",
    "CompactReport",
    "Planner",
    "compact_log",
    "describe",
    "recover_compaction",
]

COMPACT_DIR = "compacting"
COMMIT = "COMMIT"

Progress = Callable[[int, int], None]

# Events that pass 2 never copies: folded into absolute ones (a UserForgotten
# is decided before this is asked).
_FOLDED_AWAY = frozenset(
    {UserStatsSaved, UserStatsSet, SessionEnded, ChannelPeakRaised, ChannelStatsSet}
)
# Events pass 1 notes: whatever changes a user's or the channel's statistics.
_OBSERVED = _FOLDED_AWAY | {UserForgotten}


@dataclass
class CompactReport:
    """What a compaction did (or, with ``dry_run``, would do)."""

    dry_run: bool
    segments_rewritten: int = 0
    segments_written: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    events_before: int = 0
    events_after: int = 0
    dropped_by_type: dict[str, int] = field(default_factory=dict)
    users_folded: int = 0
    trimmed_before: int | None = None

    @property
    def events_dropped(self) -> int:
        return self.events_before - self.events_after

    @property
    def bytes_reclaimed(self) -> int:
        return self.bytes_before - self.bytes_after


def pending_commit(directory: str) -> str | None:
    """The COMMIT file of a compaction that committed and has not finished, if any.

    Until the switch it records is finished (by the writer, or on the next
    open for writing after a crash), the directory holds a mix of old and
    new segments, which reads as damage to anyone who walks it.
    """
    commit = os.path.join(directory, COMPACT_DIR, COMMIT)
    return commit if os.path.exists(commit) else None


def recover_compaction(directory: str, logger: logging.Logger, *, read_only: bool) -> str | None:
    """Finish or undo a compaction a crash interrupted; say which (None: nothing to do).

    Called by SegmentLog.open and by recovery.repair, with the writer lock held.
    """
    work = os.path.join(directory, COMPACT_DIR)
    if not os.path.isdir(work):
        return None
    commit = os.path.join(work, COMMIT)
    if read_only:
        if os.path.exists(commit):
            # The writer is switching segments right now (or died doing so and
            # will finish on its next open); the directory is a mix until then.
            if lock_holder(directory) is not None:
                raise ConnectionError(
                    f"{directory}: a compaction is being committed; try again in a moment"
                )
            raise ConnectionError(
                f"{directory}: a compaction was interrupted after it committed; opening "
                "the store for writing (the bot, or any command that writes), or "
                "repair(), finishes it"
            )
        return None
    if not os.path.exists(commit):
        shutil.rmtree(work)
        fsync_dir(directory)
        done = "removed an unfinished compaction (not committed)"
    else:
        old_names, new_names = _read_commit(commit, directory)
        _switch(directory, work, old_names, new_names)
        done = "finished a committed compaction"
    logger.warning("%s: %s", directory, done)
    return done


def _switch(directory: str, work: str, old_names: list[str], new_names: list[str]) -> None:
    """Move new segments into place and remove the old ones.  Idempotent.

    ``new_names`` comes from COMMIT, not from listing ``work``: after a crash
    half-way through, some new segments are already in place, possibly under
    the name of an old one, and must not then be taken for old ones.
    """
    for name in new_names:
        with contextlib.suppress(FileNotFoundError):  # moved before the crash
            os.replace(os.path.join(work, name), os.path.join(directory, name))
    keep = set(new_names)
    for name in old_names:
        if name not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
    fsync_dir(directory)
    # COMMIT goes last, once nothing else is left in compacting/: removed
    # earlier, a failure here would leave new segments there that the next
    # open, finding no COMMIT, would delete as an unfinished compaction's.
    left = sorted(n for n in os.listdir(work) if n != COMMIT)
    if left:
        raise IntegrityError(
            f"{work}: {', '.join(left)} left after the switch COMMIT lists; nothing "
            "more was changed"
        )
    os.unlink(os.path.join(work, COMMIT))
    os.rmdir(work)
    fsync_dir(directory)


def _write_commit(work: str, old_names: list[str], new_names: list[str]) -> None:
    """Write the commit marker: from here on, the compaction will be finished."""
    commit = os.path.join(work, COMMIT)
    body = "".join([f"old {n}\n" for n in old_names] + [f"new {n}\n" for n in new_names])
    data = body.encode("ascii")
    with open(commit + ".tmp", "wb") as f:
        # The checksum line makes a damaged COMMIT refused, not obeyed.
        f.write(data + b"crc32 %08x\n" % zlib.crc32(data))
        f.flush()
        os.fsync(f.fileno())
    os.rename(commit + ".tmp", commit)
    fsync_dir(work)


def _read_commit(commit: str, directory: str) -> tuple[list[str], list[str]]:
    """The old and new segment names COMMIT lists, checked before any file moves.

    Raises IntegrityError, with nothing changed, unless it is whole (its
    checksum line; a COMMIT of a release before it has none) and describes a
    switch these files can finish: names of segments only, each new one in
    ``compacting/`` or (moved before a crash) in the store directory, and no
    segment in ``compacting/`` it does not list.  Acting on a damaged one
    would delete the old segments for new ones that are not there.
    """
    work = os.path.dirname(commit)
    with open(commit, "rb") as f:
        data = f.read()

    def damaged(why: str) -> IntegrityError:
        return IntegrityError(
            f"{commit}: {why}; nothing was changed (the old segments still in the store "
            f"directory, the new ones in {work}), see docs/format.md, Compaction files"
        )

    body, crc_line = data, None
    if data.endswith(b"\n"):
        head, _, last = data[:-1].rpartition(b"\n")
        if last.startswith(b"crc32 "):
            body, crc_line = (head + b"\n" if head else b""), last
    if crc_line is not None and crc_line != b"crc32 %08x" % zlib.crc32(body):
        raise damaged("its checksum does not match")
    if body and not body.endswith(b"\n"):
        raise damaged("its last line is cut short")
    old: list[str] = []
    new: list[str] = []
    for line in body.split(b"\n")[:-1]:
        kind, _, raw = line.partition(b" ")
        name = raw.decode("ascii", "replace")
        if kind not in (b"old", b"new") or not SEGMENT_RE.match(name):
            raise damaged(f"a line is not 'old NAME' or 'new NAME' of a segment: {line!r}")
        (old if kind == b"old" else new).append(name)
    for name in new:
        if not (
            os.path.exists(os.path.join(work, name))
            or os.path.exists(os.path.join(directory, name))
        ):
            raise damaged(f"new segment {name} is neither in {work} nor in the store directory")
    listed = set(new)
    extra = sorted(n for n in os.listdir(work) if SEGMENT_RE.match(n) and n not in listed)
    if extra:
        raise damaged(f"{work} holds segment(s) it does not list: {', '.join(extra)}")
    return old, new


def _visible(index: SortedIndex, ts: int, pos: int) -> bool:
    """Is the row (ts, pos) in ``index``?  O(log n), no extra memory."""
    tss, poss = index.ts, index.pos
    i = bisect_left(tss, ts)
    if i < len(tss) and tss[i] == ts and poss[i] == pos:
        return True  # the common case: no other row has this timestamp
    # Rows are ordered by (timestamp, position): bisect the positions of the
    # rows with this timestamp.  A walk along them made a compaction
    # quadratic in rows sharing one timestamp: a bot whose clock stood still
    # for a few thousand chat lines held a compaction's loop for 0.6 s.
    hi = bisect_right(tss, ts, i)
    j = bisect_left(poss, pos, i, hi)
    return j < hi and poss[j] == pos


#: Bytes of new segments the compaction's writer queues before it hands them
#: to a thread (see _SegmentWriter.drain).
DRAIN_BYTES = 1 << 20


class _SegmentWriter:
    """Writes events (with their positions) as compacted segments in a directory.

    ``add`` and ``finish`` only encode, on the caller's thread; the file work
    they queue (open, write, fsync, close) runs in a worker thread at each
    ``drain``.  Compaction runs in the bot's process, beside its chat: done
    on the event loop, writes of the new segments stalled it for up to a
    second at a time behind the disk's writeback (a year of a busy channel,
    half a minute in all).  The queue holds about DRAIN_BYTES: a drain
    that finds less leaves it for the next.
    """

    def __init__(self, directory: str, store_id: bytes, segment_size: int, write: bool) -> None:
        self.directory = directory
        self.store_id = store_id
        self.segment_size = segment_size
        self.write = write
        self.names: list[str] = []
        self.bytes = 0
        self._size = 0
        self._run: list[Event | None] = []
        self._run_first = 0
        # File work not done yet: a new segment's name and header, bytes to
        # append to the segment last begun, or None to sync and close it.
        self._queued: list[tuple[str, bytes] | bytearray | None] = []
        self._queued_bytes = 0
        # Only the worker thread uses it while a drain runs.
        self._fd: int | None = None

    def add(self, position: int, event: Event) -> None:
        # The events kept are rarely neighbours (a busy channel's chat lines
        # alternate with statistics updates compaction drops): a frame per
        # run of neighbours made about one frame per event, each with its
        # 20-byte header, checked and decoded on its own.  So a frame holds
        # up to FRAME_EVENTS positions, with nil (None) at those without an
        # event (FLAG_HOLES); a gap that does not fit starts a new frame.
        run = self._run
        if run:
            missing = position - self._run_first - len(run)
            if len(run) + missing >= FRAME_EVENTS:
                self._flush_run()
            elif missing:
                run.extend([None] * missing)
        if not self._run:
            self._run_first = position
        self._run.append(event)

    def _flush_run(self) -> None:
        for first, _count, frame in encode_frames(self._run_first, self._run):
            if self._size == 0 or self._size + len(frame) > self.segment_size:
                self._new_segment(first)
            if self.write:
                queued = self._queued
                if queued and isinstance(queued[-1], bytearray):
                    queued[-1] += frame
                else:
                    queued.append(bytearray(frame))
                self._queued_bytes += len(frame)
            self._size += len(frame)
            self.bytes += len(frame)
        self._run = []

    def _new_segment(self, first: int) -> None:
        name = segment_name(first)
        if self.write:
            if self.names:
                self._queued.append(None)
            header = pack_header(first, self.store_id, flags=FLAG_COMPACTED | FLAG_HOLES)
            self._queued.append((name, header))
        self.names.append(name)
        self._size = HEADER_SIZE
        self.bytes += HEADER_SIZE

    async def drain(self, *, everything: bool = False) -> None:
        """Do the file work queued so far, in a worker thread; OSError as it failed.

        Unless ``everything``, only once DRAIN_BYTES are queued: a hand-over
        to the thread per group of runs (tens of thousands of them) made a
        compaction's CPU time half as long again.
        """
        if not self._queued or (self._queued_bytes < DRAIN_BYTES and not everything):
            return
        queued, self._queued = self._queued, []
        self._queued_bytes = 0
        work = asyncio.get_running_loop().run_in_executor(None, self._do, queued)
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            # The thread goes on regardless.  Let it end, however often the
            # caller is cancelled meanwhile: abandon() must not close the
            # file under it (its descriptor number may name another file by
            # then), nor may it open a segment after the work is removed.
            await outlive_cancels(work)
            raise

    def _do(self, queued: list[tuple[str, bytes] | bytearray | None]) -> None:
        for item in queued:
            if item is None:
                self._close_segment()
            elif isinstance(item, bytearray):
                assert self._fd is not None
                write_all(self._fd, item)
            else:
                name, header = item
                path = os.path.join(self.directory, name)
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                write_all(self._fd, header)

    def _close_segment(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def abandon(self) -> None:
        """Close the segment being written, if any, without syncing it.

        For a compaction that fails: its files are removed, and an unlinked
        file held open keeps its space (up to a whole segment) for as long
        as the process lives, on a disk that may just have run full.
        """
        self._queued = []
        self._queued_bytes = 0
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    async def finish(self, first_position: int) -> None:
        """Write the last run, sync and close the last segment, then the directory."""
        if self._run:
            self._flush_run()
        if not self.names:
            # Everything was dropped.  An empty compacted segment still
            # records that the gap up to the next segment is intended.
            self._new_segment(first_position)
        if self.write:
            self._queued.append(None)
        await self.drain(everything=True)
        if self.write:
            await asyncio.get_running_loop().run_in_executor(None, fsync_dir, self.directory)


class Planner:
    """Decides what a compacted range keeps; the same rules for every backend.

    Pass 1 shows it every event of the range in position order (``observe``);
    ``fold`` then turns each user's, and the channel's, last statistics event
    into an absolute one; pass 2 asks ``decide`` about each event again.
    ``visible`` is what every read sees (at the end of the log, which may lie
    past the range): rows it no longer holds are dropped.
    """

    def __init__(self, trim_before: int | None = None) -> None:
        #: Dry runs: count user counts older than this as already trimmed.
        self.trim_before = trim_before
        self._users = UserStatsProjection()
        self._channel = ChannelStatsProjection()
        self._last_stats: dict[str, int] = {}
        self._last_channel = 0
        self._fold_at: dict[int, Event] = {}
        self._visible = Projections()
        # Users with an event kept so far: a UserForgotten after one stays.
        self._kept_users: set[str] = set()

    def observe(self, position: int, event: Event) -> None:
        # Dispatch by exact type: most events of a long history are actions
        # and chat lines, which pass 1 has nothing to note about, and a chain
        # of isinstance checks cost each of them six calls.
        kind = type(event)
        if kind not in _OBSERVED:
            return
        if kind is UserStatsSaved:
            self._users.on_saved(position, event)  # type: ignore[arg-type]
        elif kind is UserStatsSet:
            self._users.on_set(position, event)  # type: ignore[arg-type]
        elif kind is SessionEnded:
            self._users.on_session_ended(position, event)  # type: ignore[arg-type]
        elif kind is UserForgotten:
            self._users.on_forgotten(position, event)  # type: ignore[arg-type]
            self._last_stats.pop(event.username, None)  # type: ignore[union-attr]
            return
        elif kind is ChannelPeakRaised:
            self._channel.on_raised(position, event)  # type: ignore[arg-type]
            self._last_channel = position
            return
        else:
            self._channel.on_set(position, event)  # type: ignore[arg-type]
            self._last_channel = position
            return
        self._last_stats[event.username] = position  # type: ignore[union-attr]

    def fold(self, visible: Projections) -> int:
        """End pass 1; return how many users' statistics were folded."""
        self._visible = visible
        for name, position in self._last_stats.items():
            rec = self._users.users.get(name)
            if rec is not None:  # else its stats events changed nothing: all go
                self._fold_at[position] = UserStatsSet(name, *rec)
        users = len(self._fold_at)
        if self._last_channel:
            c = self._channel
            self._fold_at[self._last_channel] = ChannelStatsSet(
                c.max_users,
                c.max_users_timestamp,
                c.max_connected,
                c.max_connected_timestamp,
                c.last_updated,
            )
        return users

    def decide(self, position: int, event: Event) -> Event | None:
        """What the compacted range holds at ``position``: ``event``, its fold, or None."""
        keep: Event | None
        kind = type(event)
        if position in self._fold_at:
            keep = self._fold_at[position]
        elif kind is UserForgotten:
            keep = event if event.username in self._kept_users else None  # type: ignore[union-attr]
        elif kind in _FOLDED_AWAY:
            return None
        elif kind is MessageSaved:
            index = self._visible.messages.index
            keep = event if _visible(index, event.timestamp, position) else None  # type: ignore[union-attr]
        elif kind is UserActionLogged:
            index = self._visible.actions.all
            keep = event if _visible(index, event.timestamp, position) else None  # type: ignore[union-attr]
        elif kind is UserCountLogged:
            ts = event.timestamp  # type: ignore[union-attr]
            seen = _visible(self._visible.counts.index, ts, position)
            if self.trim_before is not None and ts < self.trim_before:
                seen = False
            keep = event if seen else None
        else:
            keep = event
        name = getattr(keep, "username", None)
        if name is not None:
            self._kept_users.add(name)
        return keep


def _present(first: int, events: Sequence[Event | None]) -> Iterator[tuple[int, Event]]:
    """(position, event) for each event of a run from ``first``, its holes passed over.

    In C: after a year of compactions most positions of a compacted log are
    holes (about ten for each event kept, in a soak), and a Python loop over
    them cost more than the folds of the events between.
    """
    return compress(enumerate(events, first), map(is_not, events, repeat(None)))  # type: ignore[arg-type]


async def _replay(
    log: SegmentLog,
    through: int,
    projections: Projections,
    start: int = 1,
    reached: Callable[[int], None] | None = None,
) -> Projections:
    """Fold ``start..through`` into ``projections``; ``reached(position)`` after each group."""
    async for group in log.read_groups(start, through):
        projections.apply_runs(group)
        if reached is not None and group:
            last_first, last_events = group[-1]
            reached(last_first + len(last_events) - 1)
    return projections


def refuse_newer_segments(segments: list[Segment]) -> None:
    """Raise MigrationError if a segment was written by code of an unknown event schema.

    That is newer code (this is a rollback): this code decodes its events
    without the fields that code added, and a rewrite would write them back
    without, for good.  Segments of the schemas this code knows
    (READABLE_FINGERPRINTS) are rewritten as usual.
    """
    for seg in segments:
        fingerprint = unpack_header(os.pread(seg.fd, HEADER_SIZE, 0), seg.path).fingerprint
        if fingerprint not in READABLE_FINGERPRINTS:
            raise MigrationError(
                f"{seg.path}: written by other code (event schema {fingerprint.hex()}, "
                f"this code has {SCHEMA_FINGERPRINT.hex()}): compacting it here would drop "
                "what its events hold beyond this code's fields; compact with the release "
                "that wrote it; nothing was changed"
            )


async def compact_log(
    log: SegmentLog,
    *,
    dry_run: bool = False,
    trim_before: int | None = None,
    progress: Progress | None = None,
    logger: logging.Logger | None = None,
) -> CompactReport:
    """Compact every sealed segment of ``log`` (an open writer).

    ``trim_before`` (dry runs only) counts user counts older than it as
    already trimmed, to report what a retention decision would reclaim.
    """
    from .segmentlog import SegmentLog

    logger = logger or logging.getLogger("eventstore")
    report = CompactReport(dry_run=dry_run)
    await log.flush()
    head = log.head
    if dry_run:
        # Report as if the active segment were sealed too, as compact() does
        # (it rolls first, unless the active segment holds no frame yet).
        sealed = log.segments
        if sealed and sealed[-1].end <= HEADER_SIZE:
            sealed = sealed[:-1]
        last_sealed = head
    else:
        # One copy of the list: the log's thread may append a rolled segment
        # to it between two reads (a round in flight), and ``sealed`` and
        # ``last_sealed`` must describe the same segments.
        segments = log.segments
        sealed = segments[:-1]
        last_sealed = segments[-1].first - 1
    if not sealed or last_sealed == 0:
        return report
    assert log.store_id is not None
    directory = log.directory
    if not dry_run and pending_commit(directory) is not None:
        # An earlier compaction of this open committed but did not finish
        # its switch (EventStore.compact() stops the store then; this is for
        # other callers).  Its work directory decides the log now: removing
        # it would leave old and new segments side by side.
        raise IntegrityError(
            f"{directory}: an earlier compaction committed but did not finish moving its "
            "segments; close() and connect() again to finish it; nothing was changed"
        )
    if not dry_run:
        refuse_newer_segments(sealed)
    # Segment.end, not the file size: the active segment may end in zeros.
    report.bytes_before = sum(s.end for s in sealed)
    # Steps for the progress bar, in log positions: the replay of the old log,
    # the two passes over the sealed range and, unless a dry run, the replay
    # that proves the new one.
    total = head + last_sealed * 2 + (0 if dry_run else head)

    def reached(done: int) -> None:
        if progress is not None:
            progress(min(done, total), total)

    # Pass 1, one read of the old log: what every read sees at ``head``
    # (computed from the log itself), and each user's stats, and the
    # channel's, folded over the sealed range.
    before = Projections()
    planner = Planner(trim_before)
    observe = planner.observe
    async for group in log.read_groups(1, head):
        before.apply_runs(group)
        for first, events in group:
            # A group's runs come from one segment (read_groups), and
            # last_sealed ends one: a run is wholly inside the range or past it.
            if first > last_sealed:
                break
            for pos, ev in _present(first, events):
                observe(pos, ev)
                report.events_before += 1
        last_first, last_events = group[-1]
        done = last_first + len(last_events) - 1
        # Two steps a position, up to the end of the sealed range.
        reached(done + min(done, last_sealed))
    reached(head + last_sealed)
    report.users_folded = planner.fold(before)

    # Pass 2: write what is still visible, in position order.
    work = os.path.join(directory, COMPACT_DIR)
    writer = _SegmentWriter(work, log.store_id, log.segment_size, write=not dry_run)
    dropped: dict[str, int] = {}
    # Set once COMMIT is in place: from then on the switch decides, even
    # after _switch has removed COMMIT (its last directory fsync may fail).
    committed = False
    snapshots_removed = 0
    try:
        if not dry_run:
            # Inside the try: on a full disk (no block or inode for the
            # directory) this fails as the rest does, with StorageError.
            if os.path.exists(work):
                shutil.rmtree(work)
            os.mkdir(work, 0o700)
            # Its name made durable too: COMMIT inside it decides the switch.
            fsync_dir(directory)
        decide, add = planner.decide, writer.add
        async for group in log.read_groups(1, last_sealed):
            for first, events in group:
                for pos, ev in _present(first, events):
                    keep = decide(pos, ev)
                    if keep is None:
                        name = event_name(ev)
                        dropped[name] = dropped.get(name, 0) + 1
                    else:
                        add(pos, keep)
                        report.events_after += 1
            last_first, last_events = group[-1]
            await writer.drain()
            reached(head + last_sealed + last_first + len(last_events) - 1)
        await writer.finish(sealed[0].first)
        report.dropped_by_type = dict(sorted(dropped.items()))
        report.bytes_after = writer.bytes
        report.segments_rewritten = len(sealed)
        report.segments_written = len(writer.names)
        if not dropped and writer.bytes == report.bytes_before:
            # Already compact (a second run in a row): the rewrite would only
            # copy the same events.  The old segments are as good; keep them.
            # A dry run says the same as the real run would.
            report.segments_rewritten = report.segments_written = 0
            if not dry_run:
                shutil.rmtree(work, ignore_errors=True)
            reached(total)  # no proof to replay: the bar ends full
            return report
        if dry_run:
            # Pass 2 may end short of head: compaction may have dropped
            # the last events before it.
            reached(total)
            return report

        # Prove it: the new log must give exactly the old projections.  The
        # old ones go first, kept as a digest: the replay below builds a
        # second set, and at years of history both at once cost hundreds of
        # megabytes (the allocator keeps much of a peak after it).  Hashing
        # them took over 0.1 s at 10M events: in a worker thread, where
        # BLAKE2b lets go of the GIL, the loop goes on meanwhile.  Nothing
        # else holds these read models, so nothing changes them under it.
        loop = asyncio.get_running_loop()
        expected = await loop.run_in_executor(None, before.digest)
        # The planner holds ``before`` too, and so do its bound methods.
        del before, planner, observe, decide
        after = Projections()

        def proved(position: int) -> None:
            reached(head + last_sealed * 2 + position)

        if writer.names:
            new_log = SegmentLog(work, read_only=True, logger=logger)
            try:
                await new_log.open()
            except ConnectionError as err:
                # Its own files could not be opened (EMFILE, EIO): not a
                # store to reconnect, a compaction that changed nothing.
                raise StorageError(
                    f"{directory}: compaction failed, nothing was changed: {err}"
                ) from err
            try:
                await _replay(new_log, last_sealed, after, reached=proved)
            finally:
                await new_log.close()
        await _replay(log, head, after, start=last_sealed + 1, reached=proved)
        reached(total)
        if await loop.run_in_executor(None, after.digest) != expected:
            raise IntegrityError(
                f"{directory}: compaction refused: the rewritten segments would change "
                "what reads return; nothing was changed"
            )

        # Snapshots inside the rewritten range go first (see remove_snapshots);
        # if this compaction then fails, the next connect() replays in full.
        snapshots_removed = remove_snapshots(directory, before=last_sealed)
        # The moment of decision, then the switch.
        old_names = [os.path.basename(s.path) for s in sealed]
        # From COMMIT on, the log's list of segments is not to be trusted
        # until replace_sealed has followed the files; the store stops
        # writing (see EventStore.compact) if this does not get that far.
        log.switch_unfinished = True
        _write_commit(work, old_names, writer.names)
        committed = True
        switch = asyncio.get_running_loop().run_in_executor(
            None, _switch, directory, work, old_names, writer.names
        )
        try:
            await asyncio.shield(switch)
        finally:
            # Cancelled: the thread moves files on regardless.  Let it end,
            # so that what follows sees the files as they will stay.
            await outlive_cancels(switch)
            if not switch.cancelled() and switch.exception() is None:
                log.replace_sealed(len(sealed))
                log.switch_unfinished = False
    except BaseException as err:
        writer.abandon()
        if dry_run or committed or os.path.exists(os.path.join(work, COMMIT)):
            # Committed (COMMIT may be in place although writing it raised):
            # the switch decides; EventStore.compact() stops the store.
            if not dry_run and isinstance(err, OSError) and not isinstance(err, StorageError):
                where = f"{err.filename}: " if err.filename else ""
                raise StorageError(
                    f"{directory}: compaction committed, but did not finish its switch "
                    f"({where}{err.strerror or err}); close() and connect() again finish it"
                ) from err
            raise
        # Not committed (COMMIT.tmp, or its rename, may have failed): leave
        # the store as it was, and going on, as it can: its segments did not
        # move.
        log.switch_unfinished = False
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, StorageError):
            # The snapshots it removed first are gone all the same: say so,
            # as the next connect() replays more of the log than before.
            what = (
                f"the segments were not changed (but {snapshots_removed} snapshot(s) in the "
                "range it rewrote were removed: the next connect() replays more of the log)"
                if snapshots_removed
                else "nothing was changed"
            )
            raise StorageError(
                f"{directory}: compaction failed, {what}: {err.strerror or err}"
            ) from err
        raise
    logger.info(
        "%s: compacted %d segments, %d -> %d bytes, %d events dropped",
        directory,
        report.segments_rewritten,
        report.bytes_before,
        report.bytes_after,
        report.events_dropped,
    )
    return report


def describe(report: CompactReport) -> dict[str, Any]:
    """The report as plain data (for JSON output)."""
    return {
        "dry_run": report.dry_run,
        "segments_rewritten": report.segments_rewritten,
        "segments_written": report.segments_written,
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "bytes_reclaimed": report.bytes_reclaimed,
        "events_before": report.events_before,
        "events_after": report.events_after,
        "events_dropped": report.events_dropped,
        "dropped_by_type": report.dropped_by_type,
        "users_folded": report.users_folded,
        "trimmed_before": report.trimmed_before,
    }
