"""The segment-file log: the durable, embedded default.

One directory holds the log as segment files (format in segment.py and
docs/format.md), the writer's ``LOCK`` and, later, snapshots.

Writing.  ``submit()`` runs in the caller's task: it hands out positions,
keeps the events in memory and wakes the writer task.  The writer takes
everything submitted since its last round, encodes it as one frame (or a few,
for very large rounds) and writes it: many concurrent callers share one
write and, in ``"fsync"`` mode, one fdatasync (group commit).  A caller's
future resolves when its round is as durable as the mode promises:

* ``"fsync"``: the round's bytes were fdatasync'ed.  The write and the sync run
  in the log's own thread (logthread.py), so the event loop keeps serving
  other tasks.
* ``"flush"``: the bytes were handed to the kernel with ``pwrite``; they
  survive the process being killed, not a power cut.  The pwrite runs on the
  event loop: it only copies into the page cache, which measured 0.8 us for a
  120-byte frame on the project machine, against 32-35 us for the same pwrite
  sent through a thread (measured with run_in_executor, before the log had
  its own thread; still a hop each way).  A round that has to
  start a new segment (create, fsync, rename, fsync the directory) goes to
  the thread instead.
* ``"none"``: the future is resolved at once; the writer (or, if the caller
  never yields, ``submit`` itself) writes at least every 100 ms.

Events stay in memory until their round is written and indexed, so a read
(``fetch``) of an event just submitted is answered from memory.

Recovery.  ``open()`` checks every segment header, then walks the frames of
the last segment (a writer from the frame ``tail.index`` names, if it fits:
see tailindex.py and _check_prefix).  A frame cut short at the end of that
segment (a crash during a write) is cut off and logged; any other damage raises
IntegrityError with the file and offset.  Sealed segments are checked as
replay reads them; after a start from a snapshot, which reads none of the
older ones, by a walk in the background (see index_in_background), whose
findings are logged and raised to the reads they concern.
``recovery.repair`` is the explicit way past damage.

Readers.  With ``read_only=True`` no lock is taken and nothing is written;
``refresh()`` picks up frames and segments the writer has added since, and
the segments a compaction wrote in place of ones it holds (it notices a
file removed or replaced under its name, waits out a switch in progress,
and reads on from its head in the new files: positions never change).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain, pairwise
from operator import attrgetter, itemgetter

import msgspec

from .codec import decode_batch, decode_event, decode_frames, has_upcasters, split_batch
from .compaction import pending_commit, recover_compaction
from .cuts import CUTS, cuts_seen, settle_cuts
from .errors import (
    ConnectionError,
    IntegrityError,
    QueryError,
    StorageError,
    ValidationError,
)
from .events import SCHEMA_FINGERPRINT, Event
from .framing import FrameWalker, Scanned, is_torn_tail
from .fsutil import fsync_dir, write_all
from .importmarker import unfinished_import
from .lockfile import WriterLock, lock_holder
from .log import EventLog, Group
from .logthread import LogThread
from .segment import (
    FLAG_COMPACTED,
    FLAG_HOLES,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    STORE_ID_SIZE,
    FrameError,
    SegmentHeader,
    check_fingerprint,
    encode_frames,
    list_segments,
    pack_header,
    segment_name,
    unpack_header,
)
from .tailindex import (
    TAIL_INDEX,
    TailIndex,
    read_tail_index,
    remove_tail_index,
    write_tail_index,
)

__all__ = ["DEFAULT_SEGMENT_SIZE", "SegmentLog"]

DEFAULT_SEGMENT_SIZE = 64 * 1024 * 1024
#: Replay reads segments in chunks of this size.
READ_CHUNK = 4 * 1024 * 1024
#: "none" mode writes at least this often, even if the caller never yields.
NONE_FLUSH_INTERVAL = 0.1
#: ... and as soon as this many events are waiting.
NONE_FLUSH_EVENTS = 8192
#: Replay decodes and yields frames in groups of about this many events: one
#: decode call for many small frames, yet a group's events are still in the
#: CPU cache when the projections fold them.  Measured with connect() on the
#: project machine: a whole 4 MiB chunk at once (about 100,000 events)
#: replayed 1M busy-channel events in frames of 64 at 1.0M events/s against
#: 1.3M one frame at a time; groups of 128 to 1024 events did 1.2M-1.5M
#: (within the noise of each other) and, on a log of one event per frame,
#: about 300k events/s against 200k one frame at a time.
RUN_EVENTS = 256
#: A position without an event in a frame of a segment with FLAG_HOLES.
_NIL = msgspec.Raw(b"\xc0")
#: Bytes of frames between two entries of a segment's sparse frame index.
INDEX_STRIDE = 4096
#: Bytes of a sealed segment indexed per call in the log's thread when it is
#: indexed after connect (see SegmentLog._walk): a write queued behind such
#: a call waits for it, about 4 ms, instead of the ~55 ms of a whole segment.
INDEX_CHUNK = 4 * 1024 * 1024
#: A read of the log (compaction's passes, a follower's rebuild, an export)
#: hands the event loop back at least this often, in seconds.  Its groups
#: are yielded without a pause between them, and a chunk of READ_CHUNK bytes
#: is up to a hundred thousand events, or over a million positions of a
#: compacted log: folding one held the loop for up to 0.7 s, on a year of a
#: busy channel, while the bot's other tasks (its chat) waited.
READ_SLICE = 0.02
#: A follower that sees a segment without the one before it looks this many
#: times (a refresh each) before it takes the gap for damage: a listing taken
#: while the writer rolls can miss a file just created.
GAP_LOOKS = 20
#: Memory kept for fetch() in frames split into their events (not decoded):
#: recent chat and a user's recent actions are read again and again.
CACHE_BYTES = 8 * 1024 * 1024
#: What one split event costs besides its bytes (a msgspec.Raw and its list
#: slot; 65 bytes measured on CPython 3.11).  Counting frame bytes alone, the
#: cache held 2.4M of them at a year of the soak's history, mostly the holes
#: of compacted frames (1 byte each): 209 MiB under a cap of 8 MiB.
RAW_BYTES = 64
#: In "fsync" mode, a round that writes past the end of the active segment
#: file also appends this many zero bytes (at most up to segment_size), which
#: later rounds overwrite.  fdatasync of a write that grows a file must also
#: commit the new size to the file system's journal; overwriting blocks that
#: already exist syncs the data alone.  Measured on the project machine: a
#: write + fdatasync loop appending one-event frames ran at 7.0k/s, the same
#: loop overwriting a zero-filled file at 10k/s.  Zeros written rather than
#: ``fallocate``d: ext4 converts unwritten extents on first write, and that
#: conversion is journalled too.  The zeros after the last frame are cut
#: when the segment is sealed and when the log closes.
PREFILL_BYTES = 1024 * 1024
_ZEROS = bytes(PREFILL_BYTES)

DIR_MODE = 0o700
FILE_MODE = 0o600


@dataclass
class Segment:
    """One segment file as the log knows it."""

    first: int
    path: str
    fd: int
    flags: int
    #: End of the last complete frame known (file offset).
    end: int = HEADER_SIZE
    #: Position after the segment's last event.  For a sealed segment not
    #: walked yet, the next segment's first position: what the log expects
    #: until a walk (which sets ``indexed``) says where its frames end.
    next_position: int = 0
    #: First position and offset of frames, about one per INDEX_STRIDE bytes.
    frame_pos: array[int] = field(default_factory=lambda: array("q"))
    frame_off: array[int] = field(default_factory=lambda: array("q"))
    #: True once frame_pos/frame_off cover the whole segment (see note()).
    indexed: bool = False
    #: Readers: the offset of the last frame walked, and its header as read
    #: (see SegmentLog._check_unchanged).
    last_frame: int = 0
    last_header: bytes = b""
    #: Set by the walk of a sealed segment whose last frame runs past the end
    #: of the file: what is wrong, and where (see _damage_after).
    cut: str | None = None

    @property
    def gaps_allowed(self) -> bool:
        return bool(self.flags & FLAG_COMPACTED)

    @property
    def holes(self) -> bool:
        """Its frames may hold nil for a position without an event (FLAG_HOLES)."""
        return bool(self.flags & FLAG_HOLES)

    def note(self, first: int, offset: int) -> None:
        """Index a frame if it starts at least INDEX_STRIDE after the last one indexed.

        A sparse index: a bot writing one event per round makes one frame per
        event, and a dense index (16 bytes a frame) would cost 160 MB at 10
        million events.  Finding a frame then means reading at most about
        INDEX_STRIDE bytes of headers from the nearest entry.
        """
        offs = self.frame_off
        if not offs or offset - offs[-1] >= INDEX_STRIDE:
            self.frame_pos.append(first)
            offs.append(offset)


def _file_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _same_file(path: str, fd: int) -> bool:
    """Is ``path`` still the file ``fd`` holds open (not removed, nor replaced)?"""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == _file_id(fd)


def _by_compaction(held: list[Segment], fresh: list[Segment]) -> bool:
    """Did a compaction put ``fresh`` in place of ``held``?

    Every compaction writes its segments anew, flagged compacted: one the
    reader does not hold yet says so.  A cut (repair, an import undone)
    only removes and truncates files, and what is appended after it makes
    plain ones.
    """
    ids = {_file_id(seg.fd) for seg in held}
    return any(seg.gaps_allowed and _file_id(seg.fd) not in ids for seg in fresh)


def _empty_last_replaced(held: list[Segment], fresh: list[Segment]) -> bool:
    """Was only the reader's last segment replaced under its name, while it held no frame?

    A writer of another event schema does that to an empty last segment
    (SegmentLog._begin_own_segment): nothing this reader has read changed.
    """
    last = held[-1]
    if last.next_position != last.first or len(fresh) < len(held):
        return False
    if any(
        _file_id(old.fd) != _file_id(new.fd) for old, new in zip(held[:-1], fresh, strict=False)
    ):
        return False
    return fresh[len(held) - 1].first == last.first


def _open_sealed(path: str, first: int) -> tuple[Segment, SegmentHeader]:
    """Open a segment whose frames are all written, to be walked when first read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        header = unpack_header(os.pread(fd, HEADER_SIZE, 0), path)
    except BaseException:
        os.close(fd)
        raise
    seg = Segment(first, path, fd, header.flags, next_position=first)
    seg.end = os.fstat(fd).st_size
    return seg, header


def _close_quietly(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _resolve(waiters: list[asyncio.Future[None]]) -> None:
    for fut in waiters:
        if not fut.done():
            fut.set_result(None)


def _index_frames(
    seg: Segment,
    start: int,
    next_position: int,
    stop: int,
    gaps_allowed: bool,
    live: bool = False,
) -> tuple[FrameWalker, FrameError | None]:
    """Walk ``seg``'s frames from ``start`` to ``stop``, noting them in its index.

    Checksums are checked, payloads not decoded.  Returns the walker (just
    past the last good frame) and the error that stopped it, if any: what the
    error means (a torn tail, a live writer's half frame, damage) is the
    caller's to decide.  ``live``: another process may be writing this
    segment, so the walk stops at zero-filled space without checking it.
    """
    walker = FrameWalker(start, next_position, gaps_allowed=gaps_allowed, zeros_checked=not live)
    offset = start
    try:
        while offset < stop:
            data = os.pread(seg.fd, min(max(READ_CHUNK, walker.wanted()), stop - offset), offset)
            if not data:
                break
            offset += len(data)
            frames, bad = walker.scan(data)
            if frames.firsts:
                _note_frames(seg, frames)
                seg.last_frame = frames.base + frames.starts[-1]
            if bad is not None:
                raise bad
        return walker, walker.finish()
    except FrameError as err:
        # Without its traceback, which holds this frame, ``data`` (a 4 MiB
        # chunk) and the caller's frames: kept with the result, the error
        # made a reference cycle of them all, one chunk per walk, left to a
        # garbage collector that runs rarely here (events are not tracked).
        return walker, err.with_traceback(None)


def _build_index(seg: Segment) -> Segment | None:
    """A sealed segment's frame index (headers and checksums only), in one walk."""
    if seg.indexed:
        return None
    scratch = _scratch(seg)
    walker, err = _index_frames(scratch, HEADER_SIZE, seg.first, seg.end, True)
    _check_walk(seg, scratch, walker, err)
    return scratch


def _scratch(seg: Segment) -> Segment:
    """A Segment to build ``seg``'s index on.

    Not ``seg`` itself: the index may be built in the log's thread while a
    replay on the loop indexes ``seg`` as it reads.  Replay builds the index
    as a side effect; after a snapshot, old segments are indexed later.
    """
    return Segment(
        seg.first, seg.path, seg.fd, seg.flags, end=seg.end, next_position=seg.next_position
    )


def _check_walk(
    seg: Segment, scratch: Segment, walker: FrameWalker, err: FrameError | None
) -> None:
    """What the walk of a whole sealed segment found: damage raises, but a cut end.

    A sealed segment ends with its last frame (the writer cuts its zeros
    before it rolls), so one whose last frame runs past the end of the file
    was cut short.  Its whole frames stay readable: the index stops before
    the cut frame, and the positions after them are reported by the reads
    that want them and logged when the index is taken (see _damage_after).
    """
    if err is not None and not err.short:
        raise IntegrityError(f"{seg.path}: {err.reason} at offset {err.offset}")
    if err is not None:
        scratch.cut = f"{err.reason} at offset {err.offset}"
    scratch.end = walker.offset  # before any zeros, or the cut frame
    scratch.next_position = walker.next_position


def _publish_index(seg: Segment, built: Segment | None) -> bool:
    """Give ``seg`` the index ``_build_index`` made (on the loop, unless it has one).

    Returns whether it did.
    """
    if built is None or seg.indexed:
        return False
    seg.frame_pos, seg.frame_off, seg.end = built.frame_pos, built.frame_off, built.end
    seg.next_position, seg.cut = built.next_position, built.cut
    seg.indexed = True
    return True


def _damage_after(seg: Segment, after: Segment) -> str | None:
    """What the walk of sealed ``seg`` found wrong at its end, if anything.

    ``after`` is the segment that follows it.  Known only once ``seg`` is
    indexed.  Replay sees this when it reads across the two segments, but
    a start from a snapshot reads neither: the walk is then what finds it.
    Positions after a compacted segment, or before one, may have been
    dropped by compaction (docs/format.md): no damage there, unless the
    segment was cut short.
    """
    if not seg.indexed:
        return None
    if seg.cut is not None:
        why = f"{seg.path}: cut short: {seg.cut}"
    elif seg.next_position < after.first and not (seg.gaps_allowed or after.gaps_allowed):
        why = (
            f"{seg.path}: its frames end at position {seg.next_position - 1}, but the next "
            f"segment, {os.path.basename(after.path)}, starts at {after.first} "
            "(a segment cut short or deleted)"
        )
    else:
        return None
    lo, hi = seg.next_position, after.first - 1
    if lo == hi:
        why += f": the event at position {lo} is missing"
    elif lo < hi:
        why += f": events {lo}..{hi} are missing"
    return why


def _note_frames(seg: Segment, frames: Scanned) -> None:
    """``seg.note`` for each frame scanned, a bisect per index entry, not a call per frame."""
    starts, base = frames.starts, frames.base
    offs = seg.frame_off
    k = 0 if not offs else bisect_left(starts, offs[-1] + INDEX_STRIDE - base)
    while k < len(starts):
        seg.frame_pos.append(frames.firsts[k])
        offs.append(base + starts[k])
        k = bisect_left(starts, starts[k] + INDEX_STRIDE, k + 1)


def _decode_runs(
    path: str, frames: Scanned, a: int, b: int, lo: int, hi: int, holes: bool
) -> Group:
    """Decode frames ``a`` to ``b - 1`` of ``frames`` into runs of consecutive
    positions, cut to [lo, hi].  With ``holes`` (FLAG_HOLES) the runs hold
    None where their frames hold nil.

    One decode call for all of them (see RUN_EVENTS): per-frame calls are
    what a log of small frames (one event per "fsync" round) replays slowly on.
    """
    view = memoryview(frames.buf)
    firsts, counts = frames.firsts[a:b], frames.counts[a:b]
    payloads = [
        view[start + FRAME_HEADER_SIZE : end]
        for start, end in zip(frames.starts[a:b], frames.ends[a:b], strict=True)
    ]
    events = decode_frames(payloads, counts, holes=holes) if len(payloads) > 1 else None
    if events is None:  # one frame, or a bad one among them: find which
        batches = []
        for k, (count, payload) in enumerate(zip(counts, payloads, strict=True)):
            offset = frames.base + frames.starts[a + k]
            batch = decode_batch(payload, f"{path} offset {offset}", holes=holes)
            if len(batch) != count:
                raise IntegrityError(
                    f"{path}: frame at offset {offset} holds {len(batch)} "
                    f"events, its header says {count}"
                )
            batches.append(batch)
        events = batches[0] if len(batches) == 1 else list(chain.from_iterable(batches))
    runs: Group = []
    run_first = expect = firsts[0]
    start = i = 0
    for first, count in zip(firsts, counts, strict=True):
        if first != expect:  # a gap left by compaction
            runs.append((run_first, events[start:i]))
            start, run_first = i, first
        i += count
        expect = first + count
    runs.append((run_first, events[start:] if start else events))
    first, run = runs[0]
    if first < lo:
        runs[0] = (lo, run[lo - first :])
    first, run = runs[-1]
    if first + len(run) - 1 > hi:
        runs[-1] = (first, run[: hi - first + 1])
    return runs


def _split_at_holes(first: int, events: Sequence[Event | None]) -> list[tuple[int, list[Event]]]:
    """The runs of events in ``events`` (at positions from ``first``), without its Nones."""
    runs: list[tuple[int, list[Event]]] = []
    start = None
    for i, event in enumerate(events):
        if event is None:
            if start is not None:
                runs.append((first + start, list(events[start:i])))  # type: ignore[arg-type]
                start = None
        elif start is None:
            start = i
    if start is not None:
        runs.append((first + start, list(events[start:])))  # type: ignore[arg-type]
    return runs


class SegmentLog(EventLog):
    def __init__(
        self,
        directory: str,
        *,
        durability: str = "fsync",
        read_only: bool = False,
        logger: logging.Logger | None = None,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
    ) -> None:
        if type(segment_size) is not int or segment_size < 1024:
            raise ValidationError(
                f"segment_size must be an int of at least 1024 bytes, got {segment_size!r}"
            )
        self.directory = directory
        self.durability = durability
        self.read_only = read_only
        self.segment_size = segment_size
        self.logger = logger or logging.getLogger("eventstore")
        self._lock = WriterLock(directory)
        self._segments: list[Segment] = []
        #: Random id written into every segment header when the store is made.
        self.store_id: bytes | None = None
        self._open = False
        self._head = 0
        # Submitted but not yet written and indexed: (first position, events).
        self._unwritten: list[tuple[int, Sequence[Event]]] = []
        # Of those, the ones the writer has not taken yet, with their futures.
        self._queue: list[tuple[int, Sequence[Event]]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._queued_events = 0
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._thread: LogThread | None = None
        # Reads in progress (read_runs, and fetch while it indexes a segment),
        # and the descriptors of segments compaction replaced while one was:
        # those stay open until the last read ends, so a read that began
        # before the switch goes on reading the files it began with (unlinked,
        # but whole), instead of a closed descriptor or, once the number is
        # reused, another file.
        self._readers = 0
        self._retired_fds: list[int] = []
        # A follower's look for a compaction's new files (see _look_for_rewrite).
        self._rewrite_seen = self._stopped_short = False
        self._fresh: list[Segment] | None = None
        self._gap_looks = 0
        self._looking: asyncio.Future[None] | None = None
        self._lost = False
        # Set when a follower takes up new files: the position it had read
        # to, which the new files must reach (see _refresh_files).
        self._must_reach: int | None = None
        # CUTS as this log found it at open (see eventstore/cuts.py).
        self._cuts = b""
        # Segments being indexed in the thread (see _index_in_thread), by id(),
        # and the task indexing all of them after connect (index_in_background).
        self._indexing: dict[int, asyncio.Future[Segment | None]] = {}
        self._indexer: asyncio.Task[None] | None = None
        # Opened from tail.index: the last segment, and the offset and first
        # position of the frame its walk began at; the frames before it are
        # not checked yet (see _check_prefix).
        self._unchecked: tuple[Segment, int, int] | None = None
        # May this open save tail.index?  Not while frames it skipped are
        # unchecked (the file it opened from is then left as it is), nor
        # once their check found damage (which removed the file).
        self._tail_ok = True
        self._closing: asyncio.Future[None] | None = None
        self._wfd: int | None = None
        # Where the writer appends next in the last segment.  Readers use
        # ``Segment.end`` instead, which moves only when a round is indexed.
        self._wend = 0
        # Size of the active segment file: past ``_wend`` it holds zeros.
        self._filled = 0
        self._prefill = durability == "fsync"
        self._failed: StorageError | None = None
        # An fdatasync of the active segment that failed: after one, the
        # kernel may have dropped the dirty pages it could not write (marked
        # clean, never written), so a later fdatasync that succeeds says
        # nothing about them.  Never retried: the writes it covered stay in
        # doubt until the store is opened again (see _datasync).
        self._sync_error: OSError | None = None
        #: Set by compaction between its COMMIT and taking up the new
        #: segments: while set, the segment list may name files that moved.
        self.switch_unfinished = False
        self._last_flush = 0.0
        self._resolved: asyncio.Future[None] | None = None
        # Windows of frames read by fetch(), least recently used first, with
        # their size in bytes: (first position, raw events) per frame.
        self._cache: OrderedDict[
            tuple[int, int], tuple[list[tuple[int, list[msgspec.Raw]]], int]
        ] = OrderedDict()
        self._cached_bytes = 0
        self._roll_waiters: list[asyncio.Future[None]] = []
        # submit() checks one flag instead of three conditions.
        self._accepting = False
        self._durability_none = durability == "none"
        self._roll_pending = False
        self._submits = 0
        self._loop_create_future: Callable[[], asyncio.Future[None]] = lambda: (
            asyncio.get_running_loop().create_future()
        )
        # True while the writer task is inside the log's thread: "none" mode's
        # inline writes from submit() must not run beside it.
        self._busy = False

    # -- lifecycle ---------------------------------------------------------------
    @property
    def head(self) -> int:
        return self._head

    @property
    def segments(self) -> list[Segment]:
        return list(self._segments)

    def compacted_through(self) -> int | None:
        """The last position of the range compaction rewrote, None if none was."""
        segments = self._segments
        end = None
        for i, seg in enumerate(segments):
            if seg.gaps_allowed:
                end = segments[i + 1].first - 1 if i + 1 < len(segments) else self._head
        return end

    async def holds_user(self, username: str) -> bool:
        # The whole log, compacted segments too: a chat line a compaction
        # kept may have been cleared from the reads since.  forget_user asks
        # this of every name no read knows, so only the frames whose bytes
        # hold the name's (UTF-8, as any msgpack string holds it) are
        # decoded.  Unless an upcaster is registered: an old event it turns
        # into one of the user's may keep the name otherwise.
        needle = None if has_upcasters() else username.encode("utf-8")
        async with contextlib.aclosing(self._groups(1, None, needle)) as groups:
            async for group in groups:
                for _, events in group:
                    for event in events:
                        if getattr(event, "username", None) == username:
                            return True
        return False

    async def open(self) -> None:
        closing = self._closing
        if closing is not None:
            # A close() goes on in its task, also once all its callers are
            # cancelled (and _open is False only once it has started): it
            # still holds the lock and the files this open takes, and would
            # release this open's thread and files if it went on after it.
            if not closing.done() and closing.get_loop() is asyncio.get_running_loop():
                await asyncio.wait({closing})
            if self._closing is closing:
                self._closing = None
        if self._open:
            return
        thread = self._thread = LogThread("eventstore-log")
        loop = asyncio.get_running_loop()
        try:
            await thread.call(self._open_files)
        except asyncio.CancelledError:
            # _open_files may still be running (or not yet started) in the
            # thread: undo it there, after it, or it would take the lock and
            # the files once this cleanup had run.
            thread.call_detached(self._close_files)
            thread.stop(wait=False)
            self._thread = None
            raise
        except BaseException as err:
            self._close_files()
            thread.stop(wait=False)
            self._thread = None
            if isinstance(err, OSError) and not isinstance(err, StorageError):
                # A full disk, a file or directory without permission, EIO:
                # said as the store's error (every error it raises is a
                # StorageError), naming the file.
                where = (
                    f"{err.filename}: "
                    if err.filename
                    else f"{self.directory}: cannot open the store: "
                )
                raise ConnectionError(f"{where}{err.strerror or err}") from err
            raise
        self._open = True
        self._failed = None
        self._sync_error = None
        self.switch_unfinished = False
        self._resolved = loop.create_future()
        self._resolved.set_result(None)
        if not self.read_only:
            self._wake = asyncio.Event()
            self._last_flush = time.monotonic()
            self._writer = loop.create_task(self._run_writer(), name="eventstore-writer")
            self._loop_create_future = loop.create_future
            self._accepting = True

    def _open_files(self) -> None:
        """Lock, list, check and recover (runs in the log's thread)."""
        d = self.directory
        if os.path.exists(d) and not os.path.isdir(d):
            raise ConnectionError(f"{d}: is a file, not a store directory")
        if self.read_only:
            if not os.path.isdir(d):
                raise ConnectionError(f"{d}: no such store directory")
        else:
            if not os.path.isdir(d):
                parent = os.path.dirname(os.path.abspath(d))
                try:
                    os.makedirs(d, mode=DIR_MODE)
                except OSError as err:
                    raise ConnectionError(f"{d}: cannot create the store directory: {err}") from err
                fsync_dir(parent)
            self._lock.acquire()
            unfinished = unfinished_import(d)
            if unfinished is not None:
                self._lock.release()
                raise ConnectionError(unfinished)
        try:
            self._load_segments()
        except BaseException:
            self._lock.release()
            raise

    def _load_segments(self) -> None:
        d = self.directory
        recover_compaction(d, self.logger, read_only=self.read_only)
        if not self.read_only:
            settle_cuts(d)
        self._cuts = cuts_seen(d)
        names, stray = list_segments(d)
        for name in stray:
            if name.endswith(".seg.tmp") and not self.read_only:
                # A roll that crashed before its rename: never part of the log.
                os.unlink(os.path.join(d, name))
                self.logger.warning("%s: removed unfinished segment %s", d, name)
        previous = 0
        for first, name in names:
            path = os.path.join(d, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                if not self.read_only:
                    raise
                # Listed, then gone: a compaction's switch began meanwhile.
                raise ConnectionError(
                    f"{d}: a compaction is being committed; try again in a moment"
                ) from None
            seg = Segment(first, path, fd, 0, next_position=first)
            if first == names[-1][0] and os.fstat(fd).st_size < HEADER_SIZE:
                # Only a damaged disk leaves this (segments appear by rename,
                # complete), but it holds no event: drop it like a torn tail.
                os.close(fd)
                if not self.read_only:
                    self.logger.warning(
                        "%s: removed a last segment with an incomplete header", path
                    )
                    os.unlink(path)
                    fsync_dir(d)
                continue
            self._segments.append(seg)
            header = unpack_header(os.pread(fd, HEADER_SIZE, 0), path)
            check_fingerprint(header, path)
            if header.first_position != first:
                raise IntegrityError(
                    f"{path}: header says first position {header.first_position}, "
                    f"the file name says {first}"
                )
            if first <= previous:
                raise IntegrityError(f"{path}: segment starts at or before the previous one")
            previous = first
            seg.flags = header.flags
            seg.end = os.fstat(fd).st_size
            if self.store_id is None:
                self.store_id = header.store_id
            elif header.store_id != self.store_id:
                raise IntegrityError(
                    f"{path}: segment of another store (id {header.store_id.hex()}, "
                    f"the others have {self.store_id.hex()})"
                )
        if not self._segments:
            if self.read_only:
                self._head = 0
                return
            # A new store: its id ties every segment and snapshot to it.
            self.store_id = os.urandom(STORE_ID_SIZE)
            self._create_segment(1)
        oldest = self._segments[0]
        if oldest.first != 1 and not oldest.gaps_allowed:
            # Only compaction's segments may begin after a gap (its first one
            # is named after the first event it kept): here a file is lost.
            raise IntegrityError(
                f"{oldest.path}: the first segment starts at position {oldest.first}, so "
                f"positions 1..{oldest.first - 1} are missing (a segment file lost?); see "
                "eventstore verify"
            )
        if not self.read_only:
            self._drop_orphan_segment()
        for before, after in zip(self._segments, self._segments[1:], strict=False):
            if not before.indexed:  # one walked (above) knows where its frames end
                before.next_position = after.first
        self._scan_tail(self._segments[-1])
        self._head = self._segments[-1].next_position - 1
        if not self.read_only:
            self._wfd = os.open(self._segments[-1].path, os.O_WRONLY)
            self._wend = self._segments[-1].end
            self._filled = os.fstat(self._wfd).st_size
            last = self._segments[-1]
            if unpack_header(os.pread(last.fd, HEADER_SIZE, 0), last.path).fingerprint != (
                SCHEMA_FINGERPRINT
            ):
                self._begin_own_segment()

    def _begin_own_segment(self) -> None:
        """Write on in a segment stamped with this code's event schema.

        The last segment was written by code of another schema (an upgrade,
        or a rollback).  Appended to, it would hold this code's events under
        that code's fingerprint: code that cannot read them would take them
        for damage instead of refusing the segment by its fingerprint
        (segment.check_fingerprint), and its repair would cut them away.
        """
        last = self._segments[-1]
        if last.next_position > last.first:
            # It holds frames: sealed as a roll seals it, and a new one begun
            # (_roll adds it to the segments).
            self._seal(self._wend)
            self._roll(self._head + 1)
            self._wend = HEADER_SIZE
            return
        # Empty, and named after the next position: replaced by one of this
        # code's (the rename puts it in place whole), with the same flags.
        assert self._wfd is not None
        os.close(self._wfd)
        self._wfd = None
        self._segments.pop()
        os.close(last.fd)
        fresh = self._create_segment(last.first, flags=last.flags, replacing=True)
        self._wfd = os.open(fresh.path, os.O_WRONLY)
        self._wend = self._filled = HEADER_SIZE

    def _drop_orphan_segment(self) -> None:
        """Remove an empty last segment that does not follow on from the one before.

        A roll that failed after its rename, and whose clean-up failed too
        (see _create_segment), leaves one, named after positions no event
        has.  Writing on into it would leave a gap of missing positions
        between the two.  It holds no event: removing it loses nothing.
        Costs a walk of the previous segment, only when the last is empty
        (after a roll: compaction, or a close right after one).
        """
        if len(self._segments) < 2:
            return
        prev, last = self._segments[-2], self._segments[-1]
        if last.end > HEADER_SIZE + PREFILL_BYTES or any(
            os.pread(last.fd, last.end - HEADER_SIZE, HEADER_SIZE)
        ):
            return  # it holds frames (or damage, which the tail scan reports)
        walked = _scratch(prev)
        walker, err = _index_frames(walked, HEADER_SIZE, prev.first, prev.end, prev.gaps_allowed)
        if err is not None:
            return  # damage in the previous segment: replay and verify report it
        walked.end, walked.next_position = walker.offset, walker.next_position
        _publish_index(prev, walked)
        if walker.next_position >= last.first or prev.gaps_allowed:
            return
        self.logger.warning(
            "%s: removed an empty segment that does not follow on from the one before "
            "(that one ends at position %d; left by a roll that failed)",
            last.path,
            walker.next_position - 1,
        )
        os.close(last.fd)
        os.unlink(last.path)
        fsync_dir(self.directory)
        self._segments.pop()

    def _scan_tail(self, seg: Segment) -> None:
        """Walk the last segment's frames, index them, and cut a torn tail.

        Zeros after the last frame (space a writer filled in "fsync" mode)
        are not a torn tail: they stay, and the writer writes over them.
        """
        size = os.fstat(seg.fd).st_size
        seg.frame_pos = array("q")
        seg.frame_off = array("q")
        self._unchecked, self._tail_ok = None, True  # not left by an open that failed
        if self.read_only:
            # A writer may be at work in this segment: read as a follower does.
            # Without one, zeros after the last frame are checked as a writer
            # would check them: frames after zeroed ones are damage, not hidden.
            live = lock_holder(self.directory) is not None
            hint = self._fitting_tail_index(seg, size)
            if hint is not None:
                # From the saved frame, as a writer opens.  A reader checks
                # none of the frames before it (the writer does, and reads
                # check each frame they read); anything but a clean end or
                # a writer's half frame after it means the whole walk below.
                seg.frame_pos, seg.frame_off = hint.positions[:-1], hint.offsets[:-1]
                seg.end, seg.next_position = hint.offsets[-1], hint.positions[-1]
                seg.indexed = True
                try:
                    self._continue_scan(seg, live=live)
                    return
                except IntegrityError:
                    seg.frame_pos, seg.frame_off = array("q"), array("q")
                    seg.last_frame, seg.last_header = 0, b""
            seg.end, seg.next_position, seg.indexed = HEADER_SIZE, seg.first, True
            self._continue_scan(seg, live=live)
            return
        if self._resume_from_tail_index(seg, size):
            return
        walker, err = _index_frames(seg, HEADER_SIZE, seg.first, size, seg.gaps_allowed)
        if err is not None and not self._is_torn(seg, err, size):
            raise IntegrityError(f"{seg.path}: {err.reason} at offset {err.offset}")
        # Every error leaves the walker just past the last good frame.
        good = walker.offset
        if err is not None and good < size:
            self.logger.warning(
                "%s: cut a torn tail of %d bytes at offset %d (%s)",
                seg.path,
                size - good,
                good,
                err.reason if err else "incomplete frame",
            )
            fd = os.open(seg.path, os.O_WRONLY)
            try:
                os.ftruncate(fd, good)
                os.fsync(fd)
            finally:
                os.close(fd)
        seg.end = good
        seg.next_position = walker.next_position
        seg.indexed = True

    def _resume_from_tail_index(self, seg: Segment, size: int) -> bool:
        """Walk the last segment from the frame tail.index names, if it still can.

        True if the walk from there reached a clean end: ``seg`` is then
        indexed (the saved entries, then the walk's), and the frames before
        that one are checked later, in the background (_check_prefix).
        False for anything else, with ``seg`` as it was: the caller walks
        the whole segment and decides on what it finds, as without the file.
        """
        hint = self._fitting_tail_index(seg, size)
        if hint is None:
            return False
        start, position = hint.offsets[-1], hint.positions[-1]
        seg.frame_pos, seg.frame_off = hint.positions[:-1], hint.offsets[:-1]
        walker, err = _index_frames(seg, start, position, size, seg.gaps_allowed)
        if err is not None:
            seg.frame_pos, seg.frame_off = array("q"), array("q")
            return False
        seg.end, seg.next_position, seg.indexed = walker.offset, walker.next_position, True
        self._unchecked, self._tail_ok = (seg, start, position), False
        return True

    def _fitting_tail_index(self, seg: Segment, size: int) -> TailIndex | None:
        """tail.index, if it is the last segment's and names a frame still there."""
        if seg.gaps_allowed or self.store_id is None:
            # Compacted: its frames may skip positions, so a walk from a
            # wrong entry could not tell.  (The last segment is one only if
            # compaction dropped everything after it.)
            return None
        hint = read_tail_index(self.directory, self.store_id, seg.first)
        if hint is None:
            return None
        start = hint.offsets[-1]
        if start + FRAME_HEADER_SIZE > size or (
            os.pread(seg.fd, FRAME_HEADER_SIZE, start) != hint.frame_header
        ):
            return None  # not the frame it was saved with: another file, or cut
        return hint

    def _is_torn(self, seg: Segment, err: FrameError, size: int) -> bool:
        """Is ``err`` the shape a crash mid-write leaves at the end of the log?"""
        return is_torn_tail(os.pread(seg.fd, size - err.offset, err.offset), err)

    def _create_segment(self, first: int, flags: int = 0, *, replacing: bool = False) -> Segment:
        """Create a segment durably: temp file, fsync, rename, fsync the directory.

        ``replacing``: a segment of that name exists, and the rename puts
        this one in its place; a failure then removes only the temp file.
        """
        name = segment_name(first)
        path = os.path.join(self.directory, name)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            try:
                assert self.store_id is not None
                write_all(fd, pack_header(first, self.store_id, flags=flags))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            fsync_dir(self.directory)
            rfd = os.open(path, os.O_RDONLY)
        except BaseException as err:
            # Not one of the log's segments yet (a failed round takes back only
            # those): left behind, an empty segment named after positions the
            # round never wrote would make the next open skip to them.
            with contextlib.suppress(OSError):
                # Replacing, ``path`` is the old segment or, once renamed, the
                # whole new one: either way the log's, not a leftover.
                for leftover in (tmp,) if replacing else (tmp, path):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leftover)
                fsync_dir(self.directory)
            if type(err) is OSError and err.filename is None:
                # os.write and os.fsync name no file: "[Errno 28] No space left
                # on device" alone does not say what could not be made.
                raise OSError(err.errno, err.strerror, tmp) from err
            raise
        seg = Segment(first, path, rfd, flags, next_position=first)
        seg.indexed = True
        self._segments.append(seg)
        return seg

    async def close(self) -> None:
        """Flush, sync, release the files and the lock (see EventLog.close).

        The work runs in a task of its own: a caller cancelled half-way
        through does not leave a writer, a thread and the lock behind with
        the log already marked closed; a second close() waits for the same
        work.
        """
        if self._closing is None:
            if not self._open:
                return
            work = asyncio.ensure_future(self._close())
            # A callback, not the caller's finally: a caller cancelled before
            # the work is done must not leave it named here once it is, or
            # the next close() (after another open) would only wait for it.
            work.add_done_callback(self._closed)
            self._closing = work
        await asyncio.shield(self._closing)

    def _closed(self, closing: asyncio.Future[None]) -> None:
        if self._closing is closing:
            self._closing = None
        if not closing.cancelled():
            closing.exception()  # retrieved: _close logged it; its callers may be gone

    async def _close(self) -> None:
        self._open = False
        self._accepting = False
        # Walks of old segments (and a follower's look) stop first: their
        # next call would find the thread stopped, with nobody left to hear.
        walks = [
            job
            for job in (self._indexer, self._looking, *self._indexing.values())
            if job is not None
        ]
        for job in walks:
            job.cancel()
        await asyncio.gather(*walks, return_exceptions=True)
        self._indexer = self._looking = None
        if self._writer is not None:
            assert self._wake is not None
            self._wake.set()
            # Whatever stopped the writer was logged and failed its callers
            # (_run_writer); close() still has files and a lock to release.
            # asyncio.wait, not await: a writer cancelled from outside must
            # not make close() raise CancelledError as if it were cancelled.
            await asyncio.wait({self._writer})
            if not self._writer.cancelled():
                self._writer.exception()  # retrieved: _run_writer logged it
            self._writer = None
        failure: StorageError | None = None
        if self._sync_error is not None and self.durability != "fsync":
            # In "flush" and "none" mode a failed fdatasync covered
            # acknowledged writes; one that succeeds now would not show that
            # they reached the disk, so it is not tried again.
            why = self._sync_error.strerror or self._sync_error
            failure = StorageError(
                f"{self.directory}: cannot make the last writes durable: an fdatasync "
                f"failed ({why}); writes acknowledged before it may be lost"
            )
        elif self._failed is not None and self.durability == "none" and self._unwritten:
            # Accepted without waiting, as "none" does, and never written:
            # nobody has heard of it yet.  (Callers of the other modes got
            # the error from their write.)
            lost = sum(len(events) for _, events in self._unwritten)
            failure = StorageError(
                f"{self.directory}: {lost} accepted events were not written: {self._failed}"
            )
        if self._thread is not None:
            thread, self._thread = self._thread, None
            closed = False
            try:
                if self._wfd is not None and self._sync_error is None:
                    # Whatever the mode, close() leaves everything accepted
                    # durable (and no zeros after the last frame).  In
                    # "flush" and "none" mode this is the only fsync: its
                    # failure is the caller's to hear, as file.close() raises
                    # when its last flush fails.  Also after a failed write:
                    # the writes acknowledged before it (a failed round left
                    # none of its own bytes) are owed this fsync all the same.
                    try:
                        await thread.call(self._seal, self._wend)
                    except OSError as err:
                        why = err.strerror or err
                        if self.durability == "fsync":
                            # Every acknowledged write was synced already;
                            # what failed is cutting the zeros after the
                            # last frame, which the next open leaves as
                            # free space.
                            self.logger.warning(
                                "%s: cannot cut the zeros after the last frame: %s",
                                self.directory,
                                why,
                            )
                        else:
                            # Said along with the accepted events "none" mode
                            # never wrote, if any: both are the caller's news.
                            also = f"; and {failure}" if failure is not None else ""
                            failure = StorageError(
                                f"{self.directory}: cannot make the last writes durable: "
                                f"{why}{also}"
                            )
                    else:
                        if self._failed is None:
                            await thread.call(self._save_tail_index)
                await thread.call(self._close_files)
                closed = True
            finally:
                if not closed:  # close() was cancelled: finish it in the thread
                    thread.call_detached(self._close_files)
                thread.stop(wait=closed)
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(ConnectionError("the log was closed before this write"))
        self._waiters = []
        self._queue = []
        self._unwritten = []
        self._cache.clear()
        self._cached_bytes = 0
        self._readers = 0  # reads still paused belong to this open: see read_runs
        # The next open builds its state anew: a loss found by this one (a
        # rebuild that failed, or never ran) is not that state's.
        self._lost = False
        self._must_reach = None
        self._gap_looks = 0
        self._unchecked, self._tail_ok = None, True
        if failure is not None:
            self.logger.error("%s", failure)
            raise failure

    def _save_tail_index(
        self, seg: Segment | None = None, entries: tuple[array[int], array[int]] | None = None
    ) -> None:
        """Save ``seg``'s frame index (default: the last segment's) for the next
        open (see tailindex), in the log's thread.

        Every frame it names must be synced already: close() calls it after
        its last fdatasync, save_tail_index() only in "fsync" mode.  Its
        failure costs the next open a walk, so it is logged, not raised.
        """
        seg = self._segments[-1] if seg is None else seg
        positions, offsets = (seg.frame_pos, seg.frame_off) if entries is None else entries
        if not self._tail_ok:
            # This open skipped frames no check has passed yet: the file it
            # opened from stays as it is (it names the same synced frames),
            # so the next open skips them too, and checks them again.
            return
        try:
            if self.store_id is None or not offsets or seg.gaps_allowed:
                remove_tail_index(self.directory)
                return
            header = os.pread(seg.fd, FRAME_HEADER_SIZE, offsets[-1])
            write_tail_index(self.directory, self.store_id, seg.first, positions, offsets, header)
        except OSError as err:
            self.logger.warning(
                "%s: cannot save %s (the next open walks the whole last segment): %s",
                self.directory,
                TAIL_INDEX,
                err.strerror or err,
            )

    def _drop_tail_index(self) -> None:
        """Remove tail.index, so that the next open walks the whole last
        segment; a failure is logged."""
        try:
            remove_tail_index(self.directory)
        except OSError as err:
            self.logger.warning(
                "%s: cannot remove %s: %s", self.directory, TAIL_INDEX, err.strerror or err
            )

    async def save_tail_index(self) -> None:
        """Save tail.index now, so that a start after a crash walks only the
        frames written since (the store calls this after each snapshot).

        Only in "fsync" mode, where every frame the index names has been
        synced.  In the other modes a power cut can lose frames before the
        one the file names while that one survives: an open from the file
        would then leave the hole to the background check, where a full walk
        refuses the log (docs/format.md, "Recovery").  Those modes save it
        on close() only, after its fdatasync.
        """
        thread = self._thread
        if (
            self.read_only
            or self.durability != "fsync"
            or not self._open
            or self._failed is not None
            or not self._tail_ok
            or thread is None
        ):
            return
        seg = self._segments[-1]
        # Copied here, on the loop: the writer notes new frames in them
        # between two of the thread's calls.
        entries = (array("q", seg.frame_pos), array("q", seg.frame_off))
        await thread.call(self._save_tail_index, seg, entries)

    def _close_files(self) -> None:
        # Quietly, the writer's descriptor too: close() may report a
        # write-back error (NFS does), and raising here skipped the release
        # of the lock, held then until the process ended.  What was written
        # is already synced, or its fsync failed and close() says so.
        wfd, self._wfd = self._wfd, None
        fresh = [seg.fd for seg in self._fresh or []]
        _close_quietly(
            ([] if wfd is None else [wfd])
            + [seg.fd for seg in self._segments]
            + self._retired_fds
            + fresh
        )
        self._segments = []
        self._retired_fds = []
        self._fresh = None
        self._rewrite_seen = self._stopped_short = False
        self._lock.release()

    # -- writing -------------------------------------------------------------------
    def submit(self, events: Sequence[Event]) -> tuple[int, asyncio.Future[None]]:
        # The hot path of every write: kept to a few attribute operations.
        if not self._accepting:
            return self._refuse(events)
        first = self._head + 1
        n = len(events)
        self._head += n
        batch = (first, events)
        self._unwritten.append(batch)
        queue = self._queue
        queue.append(batch)
        self._queued_events += n
        wake = self._wake
        assert wake is not None and self._resolved is not None
        if self._durability_none:
            if self._roll_pending:
                # A round that starts a new segment waits for the writer's
                # thread.  Make this caller wait for it too: a caller that
                # never yields would otherwise never let the writer run, and
                # the queue (re-encoded at every attempt) would grow without
                # bound.  This is the one moment "none" makes a caller wait.
                fut = self._loop_create_future()
                self._waiters.append(fut)
                wake.set()
                return first, fut
            self._submits += 1
            if not self._busy and (
                self._queued_events >= NONE_FLUSH_EVENTS
                or (
                    not self._submits & 63
                    and time.monotonic() - self._last_flush >= NONE_FLUSH_INTERVAL
                )
            ):
                # The caller may never yield to the writer task: write here.
                # (If that round must start a new segment, it goes to the
                # writer's thread after all: see _write_round_inline.)
                self._write_round_inline()
            elif len(queue) == 1:
                # Woken when the queue stops being empty; the writer empties
                # it whole each round, so a longer queue has a wake pending.
                wake.set()
            return first, self._resolved
        # Rejected: in "flush" mode, writing here when nothing else is queued
        # (no task switch to the writer) made one awaiting producer 1.9x
        # faster (96k -> 183k writes/s) but 64 producers 2.3x slower (336k ->
        # 148k), because every caller then pays its own encode and pwrite
        # instead of sharing a round.  Group commit wins where it matters.
        fut = self._loop_create_future()
        self._waiters.append(fut)
        if len(queue) == 1:
            wake.set()
        return first, fut

    @property
    def stopped(self) -> StorageError | None:
        return self._failed

    def _stopped(self) -> ConnectionError:
        return ConnectionError(
            f"{self.directory}: the log stopped after a failed write ({self._failed}); "
            "close() and connect() again to recover"
        )

    def _refuse(self, events: Sequence[Event]) -> tuple[int, asyncio.Future[None]]:
        if not self._open:
            raise ConnectionError(f"{self.directory}: the log is not open")
        if self.read_only:
            raise ConnectionError(f"{self.directory}: the log is open read-only")
        assert self._failed is not None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_exception(self._failed)
        return self._head + 1, fut

    def _take_round(self) -> tuple[list[tuple[int, Sequence[Event]]], list[asyncio.Future[None]]]:
        batches, self._queue = self._queue, []
        waiters, self._waiters = self._waiters, []
        self._queued_events = 0
        return batches, waiters

    def _write_round_inline(self) -> None:
        batches, waiters = self._take_round()
        try:
            frames = self._encode(batches)
        except StorageError as err:
            self._fail(err, waiters)
            return
        if self._would_roll(frames):
            # Starting a segment blocks (fsyncs): hand the round back to the
            # writer task, which does that in its thread.
            self._queue[:0] = batches
            self._waiters[:0] = waiters
            self._queued_events += sum(len(b[1]) for b in batches)
            self._roll_pending = True
            assert self._wake is not None
            self._wake.set()
            return
        try:
            self._finish_round(self._write(frames, sync=False))
        except StorageError as err:
            self._fail(err, waiters)
            return
        self._last_flush = time.monotonic()
        _resolve(waiters)

    async def _run_writer(self) -> None:
        try:
            await self._writer_loop()
        except BaseException as err:
            # Nobody may wait for ever on a writer that is gone.
            failure = (
                err
                if isinstance(err, StorageError)
                else StorageError(f"{self.directory}: the writer stopped: {err!r}")
            )
            if self._failed is None:
                self._fail(failure, [])
            for fut in self._roll_waiters:
                if not fut.done():
                    fut.set_exception(failure)
            self._roll_waiters = []
            raise

    async def _writer_loop(self) -> None:
        assert self._wake is not None and self._thread is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue and self._failed is None:
                batches, waiters = self._take_round()
                try:
                    frames = self._encode(batches)
                    if self.durability == "fsync" or self._would_roll(frames):
                        self._busy = True
                        try:
                            result = await self._thread.call(
                                self._write, frames, self.durability == "fsync"
                            )
                        finally:
                            self._busy = False
                    else:
                        result = self._write(frames, sync=False)
                    self._finish_round(result)
                except StorageError as err:
                    self._fail(err, waiters)
                    break
                except BaseException as err:
                    # A bug, or the task cancelled: the round's callers are
                    # known only here, and must not wait for ever.
                    self._fail(
                        StorageError(f"{self.directory}: the writer stopped: {err!r}"), waiters
                    )
                    raise
                self._last_flush = time.monotonic()
                self._roll_pending = False
                _resolve(waiters)
            if not self._queue and self._failed is None:
                # flush() callers that arrived while a round was in flight.
                _resolve(self._waiters)
                self._waiters = []
            if self._roll_waiters and not self._queue:
                await self._roll_between_rounds()
            if not self._open:
                if self._queue and self._failed is None:
                    # Submitted while the roll above ran in the thread, before
                    # close() stopped accepting: accepted, so written ("none"
                    # mode has acknowledged it already).
                    self._wake.set()
                    continue
                return
            if self.durability == "none":
                # Let callers pile up a round; they are not waiting for it.
                await asyncio.sleep(0.01)

    def _would_roll(self, frames: list[tuple[int, int, bytes]]) -> bool:
        size = sum(len(f[2]) for f in frames)
        return self._wend > HEADER_SIZE and self._wend + size > self.segment_size

    async def roll(self) -> None:
        """Seal the active segment; later events go to a new one.

        Compaction rewrites only sealed segments; forgetting a user rolls
        first so that the user's recent events can be rewritten too.  Runs in
        the writer task, between rounds, so it never races a write.
        """
        if not self._open or self.read_only:
            raise ConnectionError(f"{self.directory}: the log is not open for writing")
        if self._failed is not None:
            raise self._stopped()
        assert self._wake is not None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._roll_waiters.append(fut)
        self._wake.set()
        await fut

    async def _roll_between_rounds(self) -> None:
        assert self._thread is not None
        waiters, self._roll_waiters = self._roll_waiters, []
        first = self._written_head() + 1
        self._busy = True
        try:
            if self._wend > HEADER_SIZE:  # an empty segment is sealed enough
                await self._thread.call(self._seal_and_roll, first)
        except OSError as err:
            if self._sync_error is err and self.durability != "fsync":
                # The seal's fdatasync is the first to cover what "flush" and
                # "none" acknowledged since the store opened (or since the
                # last roll): those writes may be lost, and no later
                # fdatasync can tell (see _sync_error).  Accept no more.
                self._fail(
                    StorageError(
                        f"{self.directory}: cannot make the log durable: fdatasync failed "
                        f"({err.strerror or err}); writes acknowledged before it may be lost"
                    ),
                    waiters,
                )
                return
            failure = StorageError(f"{self.directory}: cannot start a new segment: {err}")
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(failure)
            return
        finally:
            self._busy = False
        _resolve(waiters)

    def _seal_and_roll(self, first: int) -> None:
        self._seal(self._wend)
        self._roll(first)
        self._wend = HEADER_SIZE

    def _seal(self, end: int) -> None:
        """Cut the zeros after ``end`` (the last frame) and sync the active segment.

        Before a roll: once a later segment exists, this one is sealed, and
        only the last segment may end in zeros.
        """
        assert self._wfd is not None
        if self._filled > end:
            os.ftruncate(self._wfd, end)
            self._filled = end
        self._datasync()

    def _datasync(self) -> None:
        """fdatasync the active segment; a failure is remembered (see _sync_error)."""
        assert self._wfd is not None
        try:
            os.fdatasync(self._wfd)
        except OSError as err:
            self._sync_error = err
            raise

    def _encode(self, batches: list[tuple[int, Sequence[Event]]]) -> list[tuple[int, int, bytes]]:
        """Encode a round as frames of consecutive events: (first, count, bytes).

        An event that cannot be encoded (the store checks events before they
        get here; a direct caller of submit() may not) fails the round with
        StorageError, as a failed write does: its positions are taken.
        """
        run_first = batches[0][0] if batches else 0
        run: list[Event] = list(chain.from_iterable([events for _, events in batches]))
        try:
            return encode_frames(run_first, run)
        except (msgspec.EncodeError, TypeError, OverflowError, ValueError) as err:
            raise StorageError(f"{self.directory}: cannot encode an event: {err}") from err

    def _write(
        self, frames: list[tuple[int, int, bytes]], sync: bool
    ) -> list[tuple[Segment, int, int, int, int]]:
        """Write frames at the end of the log; roll segments as needed.

        Returns (segment, first position, count, offset, end) per frame for
        the loop to index.  On an error every byte of this round is taken
        back (segments it created are removed, the segment it began in is cut
        to where it began) and StorageError is raised: a failed round leaves
        no trace in the log.
        """
        assert self._wfd is not None
        placed: list[tuple[Segment, int, int, int, int]] = []
        begin = offset = self._wend
        seg = began_in = self._segments[-1]
        try:
            for first, count, data in frames:
                if offset > HEADER_SIZE and offset + len(data) > self.segment_size:
                    self._seal(offset)
                    seg = self._roll(first)
                    offset = HEADER_SIZE
                self._pwrite_all(data, offset)
                placed.append((seg, first, count, offset, offset + len(data)))
                offset += len(data)
            if offset > self._filled:
                self._filled = offset
                if self._prefill:
                    self._fill_ahead(offset)
            if sync:
                self._datasync()
        except OSError as err:
            if err.filename is not None and err.filename != seg.path:
                # From _roll: the new segment could not be made (pwrite and
                # fdatasync name no file; _create_segment names its own).
                failure = StorageError(
                    f"{err.filename}: cannot start a new segment: {err.strerror or err}"
                )
            else:
                failure = StorageError(
                    f"{seg.path}: write at offset {offset} failed: {err.strerror or err}"
                )
            self._take_back(began_in, begin)
            raise failure from err
        self._wend = offset
        return placed

    def _fill_ahead(self, end: int) -> None:
        """Append PREFILL_BYTES of zeros after ``end`` (the round just grew the file).

        So that the next rounds' fdatasyncs find the size already set.  Only
        an optimisation: if the disk has no room for the zeros, they are cut
        again and the log goes on without filling ahead.
        """
        fill = min(self.segment_size, end + PREFILL_BYTES)
        if fill <= end:
            return
        try:
            self._pwrite_all(memoryview(_ZEROS)[: fill - end], end)
        except OSError as err:
            self._prefill = False
            self.logger.warning(
                "%s: cannot fill ahead with zeros (%s); writing without", self.directory, err
            )
            assert self._wfd is not None
            os.ftruncate(self._wfd, end)
            return
        self._filled = fill

    def _take_back(self, began_in: Segment, begin: int) -> None:
        """Undo a failed round: drop segments it created, cut the first one back."""
        # Found by identity: compaction may have changed the sealed segments
        # (and so the indexes) while this round was being written.
        n_segments = self._segments.index(began_in) + 1
        with contextlib.suppress(OSError):
            for seg in self._segments[n_segments:]:
                os.close(seg.fd)
                os.unlink(seg.path)
            if len(self._segments) > n_segments:
                del self._segments[n_segments:]
                assert self._wfd is not None
                fd, self._wfd = self._wfd, None  # not left naming a closed descriptor
                os.close(fd)
                self._wfd = os.open(self._segments[-1].path, os.O_WRONLY)
                fsync_dir(self.directory)
            assert self._wfd is not None
            os.ftruncate(self._wfd, begin)
            self._filled = begin

    def _pwrite_all(self, data: bytes | memoryview, offset: int) -> None:
        assert self._wfd is not None
        view = memoryview(data)
        while view:
            n = os.pwrite(self._wfd, view, offset)
            view = view[n:]
            offset += n

    def _roll(self, first: int) -> Segment:
        seg = self._create_segment(first)
        assert self._wfd is not None
        os.close(self._wfd)
        self._wfd = os.open(seg.path, os.O_WRONLY)
        self._filled = HEADER_SIZE
        return seg

    def _finish_round(self, placed: list[tuple[Segment, int, int, int, int]]) -> None:
        """Index frames just written and drop their events from memory."""
        last = 0
        for seg, first, count, offset, end in placed:
            seg.note(first, offset)
            seg.next_position = first + count
            seg.end = end
            last = first + count - 1
        del self._unwritten[: bisect_right(self._unwritten, last, key=itemgetter(0))]

    def _fail(self, err: StorageError, waiters: list[asyncio.Future[None]]) -> None:
        """A write failed: fail its callers and every later one, accept no more."""
        self._failed = err
        self._accepting = False
        self.logger.error("%s", err)
        for fut in waiters + self._waiters:
            if not fut.done():
                fut.set_exception(err)
        self._waiters = []
        self._queue = []

    # -- reading -------------------------------------------------------------------
    async def read_runs(
        self, from_position: int = 0, to_position: int | None = None
    ) -> AsyncIterator[tuple[int, list[Event]]]:
        async with contextlib.aclosing(self.read_groups(from_position, to_position)) as groups:
            async for group in groups:
                for first, events in group:
                    if None in events:  # holes of a compacted frame
                        for run in _split_at_holes(first, events):
                            yield run
                    else:
                        yield first, events  # type: ignore[misc]

    def read_groups(
        self, from_position: int = 0, to_position: int | None = None
    ) -> AsyncGenerator[Group, None]:
        return self._groups(from_position, to_position, None)

    async def _groups(
        self, from_position: int, to_position: int | None, needle: bytes | None
    ) -> AsyncGenerator[Group, None]:
        """read_groups; with ``needle``, only frames whose bytes hold it are
        decoded (a batch of frames without it yields nothing)."""
        if not self._open:
            raise ConnectionError(f"{self.directory}: the log is not open")
        # The thread stands for this open: a read left paused across close()
        # and a new open() must not go on with descriptor numbers that now
        # name other files, nor count among the new open's readers.
        thread = self._thread
        self._readers += 1
        try:
            async for group in self._read_groups(from_position, to_position, thread, needle):
                yield group
        finally:
            self._reader_done(thread)

    def _reader_done(self, thread: LogThread | None) -> None:
        if thread is not self._thread:
            return  # counted by an open since closed (close() reset the count)
        self._readers -= 1
        if not self._readers and self._retired_fds:
            fds, self._retired_fds = self._retired_fds, []
            self._close_fds(fds)

    def _close_fds(self, fds: list[int]) -> None:
        """Close segment descriptors after the thread's queued calls (which may use them)."""
        if self._thread is not None:
            self._thread.call_detached(_close_quietly, fds)
        else:
            _close_quietly(fds)

    async def _read_groups(
        self,
        from_position: int,
        to_position: int | None,
        thread: LogThread | None,
        needle: bytes | None = None,
    ) -> AsyncIterator[Group]:
        stop = self._head if to_position is None else min(to_position, self._head)
        if max(from_position, 1) > stop:
            return  # an empty range (a frame holding both ends would cut it wrong)
        # Take the boundary and the batches above it at the same moment: the
        # writer may move batches from memory to disk while this generator
        # is suspended, and they must be read from one place or the other.
        unwritten = list(self._unwritten)
        written = unwritten[0][0] - 1 if unwritten else self._head
        disk_stop = min(stop, written)
        prev: Segment | None = None  # the previous segment, if read to its end
        segs = list(self._segments)
        last = 0  # the last position yielded
        for i, seg in enumerate(segs):
            if seg.first > disk_stop:
                prev = None
                continue
            if seg.next_position <= from_position:
                prev = None
            else:
                if (
                    prev is not None
                    and seg.first != prev.next_position
                    and not (prev.gaps_allowed or seg.gaps_allowed)
                ):
                    raise IntegrityError(
                        f"{seg.path}: segment starts at position {seg.first}, but the previous "
                        f"segment ends at {prev.next_position - 1} (events missing)"
                    )
                async for group in self._read_segment(
                    seg, from_position, disk_stop, thread, needle
                ):
                    # The runs of a group come from one segment, whose walk
                    # saw their positions rise; only its first can go back.
                    first = group[0][0]
                    if first <= last:
                        # Compaction allows gaps, never overlaps: a position
                        # read twice, the second time going back.
                        raise IntegrityError(
                            f"{seg.path}: holds position {first}, but an earlier segment "
                            f"held positions up to {last} (segments overlap)"
                        )
                    end, events = group[-1]
                    last = end + len(events) - 1
                    yield group
                prev = seg if disk_stop >= seg.next_position - 1 else None
            # The read wants positions past this segment's last event and
            # before the next segment: what its walk found missing there (a
            # walk after a start from a snapshot, which read neither) is
            # damage, not positions without events.
            if seg.next_position <= disk_stop and i + 1 < len(segs):
                after = segs[i + 1]
                if from_position < after.first and (why := _damage_after(seg, after)):
                    raise IntegrityError(f"{why}; see eventstore verify")
        if stop > written:
            in_memory: Group = []
            for first, batch in unwritten:
                lo = max(from_position, first)
                hi = min(stop, first + len(batch) - 1)
                if lo <= hi:
                    in_memory.append((lo, list(batch[lo - first : hi - first + 1])))
            if in_memory:
                yield in_memory

    def _written_head(self) -> int:
        return self._unwritten[0][0] - 1 if self._unwritten else self._head

    async def _read_segment(
        self, seg: Segment, lo: int, hi: int, thread: LogThread | None, needle: bytes | None
    ) -> AsyncIterator[Group]:
        end = seg.end
        start, first_pos = HEADER_SIZE, seg.first
        building = not seg.indexed
        if seg.indexed and seg.frame_pos:
            i = max(0, bisect_right(seg.frame_pos, lo) - 1)
            start, first_pos = seg.frame_off[i], seg.frame_pos[i]
        if building:
            seg.frame_pos, seg.frame_off = array("q"), array("q")
        walker = FrameWalker(start, first_pos, gaps_allowed=seg.gaps_allowed)
        offset = start
        pause_at = time.monotonic() + READ_SLICE
        try:
            while offset < end:
                want = min(max(READ_CHUNK, walker.wanted()), end - offset)
                if thread is None or self._thread is not thread:
                    raise ConnectionError(f"{self.directory}: the log was closed during a read")
                data = await thread.call(os.pread, seg.fd, want, offset)
                pause_at = time.monotonic() + READ_SLICE  # that await was a pause
                if not data:
                    break
                offset += len(data)
                frames, bad = walker.scan(data)
                firsts, counts = frames.firsts, frames.counts
                k = len(firsts)
                if building:
                    _note_frames(seg, frames)
                a = 0
                while a < k and firsts[a] + counts[a] <= lo:
                    a += 1
                b = bisect_right(firsts, hi, a)
                # Frames are decoded RUN_EVENTS events at a time, in one call,
                # and yielded as one group of runs.
                j, n_events = a, 0
                while j < b:
                    n_events += counts[j]
                    j += 1
                    if n_events >= RUN_EVENTS or j == b:
                        if (
                            needle is None
                            or frames.buf.find(needle, frames.starts[a], frames.ends[j - 1]) != -1
                        ):
                            yield _decode_runs(seg.path, frames, a, j, lo, hi, seg.holes)
                            if time.monotonic() >= pause_at:
                                await asyncio.sleep(0)
                                pause_at = time.monotonic() + READ_SLICE
                        a, n_events = j, 0
                if b < k:
                    return  # past hi: what follows is not asked for, bad or not
                if bad is not None:
                    raise bad
            bad = walker.finish()
        except FrameError as err:
            raise IntegrityError(f"{seg.path}: {err.reason} at offset {err.offset}") from None
        if bad is not None:
            raise IntegrityError(f"{seg.path}: {bad.reason} at offset {bad.offset}")
        if building:
            seg.indexed = True
            seg.next_position = walker.next_position
            seg.end = walker.offset  # before any zeros

    async def index_for(self, positions: Sequence[int]) -> None:
        """Index, in the log's thread, the segments not indexed yet that hold ``positions``.

        Then a lookup of those positions does not walk a segment on the
        event loop (about 100 ms for a compacted year of a busy channel).
        """
        # Looked up again after each walk: a follower's refresh may have
        # taken up new files meanwhile, and closed those of the old list.
        while pending := self._unindexed(positions):
            await self._index_in_thread(pending[0])
            if not pending[0].indexed:
                break  # not walked after all: _locate indexes what is left

    async def fetch(self, positions: Sequence[int]) -> list[Event]:
        await self.index_for(positions)
        # No await from here on: what is in memory and what on disk cannot
        # change under the loop.  (A segment compaction put in place during
        # the indexing above is indexed on the loop, by _locate.)
        written = self._written_head()
        out: list[Event] = []
        for pos in positions:
            if pos > written:
                out.append(self._from_memory(pos))
            else:
                out.append(self._from_disk(pos))
        return out

    def _from_memory(self, pos: int) -> Event:
        for first, events in self._unwritten:
            if first <= pos < first + len(events):
                return events[pos - first]
        raise QueryError(f"{self.directory}: no event at position {pos}")

    def _no_event(self, pos: int) -> StorageError:
        """The error for a read of ``pos`` on disk that no frame holds.

        A QueryError, unless ``pos`` lies where a walk found events missing
        (see _damage_after): then the log is damaged, and saying only that
        there is no event there would send the operator looking elsewhere.
        """
        segs = self._segments
        i = bisect_right(segs, pos, key=attrgetter("first")) - 1
        if 0 <= i < len(segs) - 1 and pos >= segs[i].next_position:
            why = _damage_after(segs[i], segs[i + 1])
            if why is not None:
                return IntegrityError(f"no event at position {pos}: {why}; see eventstore verify")
        return QueryError(f"{self.directory}: no event at position {pos}")

    def _locate(self, pos: int) -> tuple[Segment, int] | None:
        """The segment and frame index whose frame may hold ``pos``."""
        segs = self._segments
        lo, hi = 0, len(segs)
        while lo < hi:
            mid = (lo + hi) // 2
            if segs[mid].first <= pos:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return None
        seg = segs[lo - 1]
        if not seg.indexed:
            self._index_segment(seg)
        i = bisect_right(seg.frame_pos, pos) - 1
        return None if i < 0 else (seg, i)

    def _index_segment(self, seg: Segment) -> None:
        """Build a sealed segment's frame index, here and now (see _build_index)."""
        self._take_index(seg, _build_index(seg))

    def _take_index(self, seg: Segment, built: Segment | None) -> None:
        """Publish an index a walk built, and log what the walk found at its end.

        Logged once, by whichever walk is first (the background one after
        connect, or a read's): positions the walk found missing are damage
        that neither connect() nor a replay from a snapshot reads, and the
        reads that want them fail (see _no_event).
        """
        if not _publish_index(seg, built):
            return
        segs = self._segments
        i = bisect_right(segs, seg.first, key=attrgetter("first")) - 1
        if 0 <= i < len(segs) - 1 and segs[i] is seg:
            why = _damage_after(seg, segs[i + 1])
            if why is not None:
                self.logger.warning(
                    "%s (reads of those positions will fail; see eventstore verify)", why
                )

    def _unindexed(self, positions: Sequence[int]) -> list[Segment]:
        """The segments not indexed yet that hold some of ``positions`` on disk."""
        segs = self._segments
        if all(seg.indexed for seg in segs):
            return []
        written = self._written_head()
        firsts = [seg.first for seg in segs]
        found: dict[int, Segment] = {}
        for pos in positions:
            i = bisect_right(firsts, pos) - 1
            if pos <= written and i >= 0 and not segs[i].indexed:
                found[i] = segs[i]
        return list(found.values())

    async def _index_in_thread(self, seg: Segment, *, background: bool = False) -> None:
        """Index a sealed segment in the log's thread, off the event loop.

        After a snapshot, old segments are indexed on first use; walking a
        64 MiB segment's frames takes about 55 ms, which on the loop would
        stall every other task of the bot.  Counted as a read: compaction
        leaves the segment's descriptor open until it is done.
        """
        thread = self._thread
        if thread is None:
            raise ConnectionError(f"{self.directory}: the log is not open")
        key = id(seg)  # the walk holds ``seg``, so the id is not reused meanwhile
        job = self._indexing.get(key)
        if job is None:
            # Reads that want the same segment meanwhile wait for this walk.
            job = self._indexing[key] = asyncio.ensure_future(
                self._walk(thread, seg, background=background)
            )
            job.add_done_callback(lambda _: self._indexing.pop(key, None))
        try:
            # Shielded: one waiter cancelled must not cancel the others' walk.
            built = await asyncio.shield(job)
        except asyncio.CancelledError:
            if job.cancelled() and not self._open:  # by close(), not this caller's cancel
                raise ConnectionError(
                    f"{self.directory}: the log was closed during a read"
                ) from None
            raise
        self._take_index(seg, built)

    def index_in_background(self) -> None:
        """Index the sealed segments not indexed yet, newest first, in the log's thread.

        After a start from a snapshot only the segments the replay read are
        indexed; the first read of an older one would wait for its walk.
        Damage found on the way is logged here and raised to the reads of
        that segment; a segment cut short, or whose frames end before the
        next one starts, is logged when its index is taken (_take_index),
        and reads of the positions it lacks raise IntegrityError.  Writers
        only: a read-only open is most often a tool that reads once (the
        CLI) and indexes what it reads as it goes.
        """
        if (
            self._indexer is None
            and self._open
            and not self.read_only
            and (self._unchecked is not None or not all(s.indexed for s in self._segments))
        ):
            self._indexer = asyncio.get_running_loop().create_task(
                self._index_all(), name="eventstore-index"
            )

    async def _index_all(self) -> None:
        try:
            await self._check_prefix()  # the newest frames first
        except ConnectionError:
            return  # closed meanwhile
        except StorageError as err:  # the disk failing a read
            self.logger.warning("%s (see eventstore verify)", err)
        for seg in reversed(list(self._segments)):
            if seg.indexed or not self._open:
                continue
            try:
                await self._index_in_thread(seg, background=True)
            except ConnectionError:
                return  # closed meanwhile
            except StorageError as err:  # damage, or the disk failing a read
                self.logger.warning("%s (reads of it will fail; see eventstore verify)", err)

    async def _walk(
        self, thread: LogThread, seg: Segment, *, background: bool = False
    ) -> Segment | None:
        """Walk a sealed segment's frames INDEX_CHUNK bytes per call in ``thread``.

        The calls go through the same queue as writes, which then wait for
        one chunk, not for the whole segment.  A ``background`` walk also
        steps aside, between chunks, for the walks reads are waiting for: a
        first read of an old segment right after connect would otherwise
        share the thread with it and wait twice as long.  Counted as a read:
        compaction leaves the segment's descriptor open until the walk is done.
        """
        self._readers += 1
        try:
            scratch = _scratch(seg)
            walked = await self._walk_frames(
                thread, seg, scratch, seg.end, True, background, lambda: seg.indexed
            )
            if walked is None:
                return None  # indexed meanwhile, by a read
            _check_walk(seg, scratch, *walked)
            return scratch
        finally:
            self._reader_done(thread)

    async def _walk_frames(
        self,
        thread: LogThread,
        seg: Segment,
        scratch: Segment,
        end: int,
        gaps_allowed: bool,
        background: bool,
        given_up: Callable[[], bool],
    ) -> tuple[FrameWalker, FrameError | None] | None:
        """Index ``seg``'s frames from its header to ``end`` into ``scratch``,
        a chunk per call in ``thread`` (see _walk); None if ``given_up()``
        turned true between two chunks."""
        offset, position = HEADER_SIZE, seg.first
        stop = min(end, offset + INDEX_CHUNK)
        key = id(seg)
        while not given_up():
            while background and (wanted := [job for k, job in self._indexing.items() if k != key]):
                await asyncio.wait(wanted)
            if self._thread is not thread:
                raise ConnectionError(f"{self.directory}: the log was closed during a read")
            try:
                walker, err = await thread.call(
                    _index_frames, scratch, offset, position, stop, gaps_allowed
                )
            except OSError as failure:
                raise StorageError(
                    f"{seg.path}: cannot read at offset {offset}: {failure.strerror or failure}"
                ) from failure
            if stop == end or (err is not None and not err.short):
                return walker, err
            if walker.offset == offset and not walker.pending:
                # No frame, and none cut: zeros where a frame should
                # start (damage in a sealed segment).  Read on from the
                # same offset to the end in one call, which tells; the
                # same chunk again would find the same zeros for ever.
                stop = end
                continue
            # The frame this chunk's end cut is read whole by the next
            # call, however long it is.
            cut_frame_end = stop + walker.wanted() if walker.pending else stop
            offset, position = walker.offset, walker.next_position
            stop = min(end, max(offset + INDEX_CHUNK, cut_frame_end))
        return None

    async def _check_prefix(self) -> None:
        """Check the last segment's frames an open from tail.index did not walk.

        As the background walk of older segments does: headers and
        checksums, in the log's thread.  What it finds wrong is logged
        (reads of the frames concerned fail on their own checksum), and
        tail.index is removed, so that the next open walks those frames and
        refuses the log, as without the file.  An index that disagrees with
        the frames is replaced by the walk's.  Not run by close(): a close
        before it is done leaves the file as this open found it.
        """
        unchecked = self._unchecked
        thread = self._thread
        if unchecked is None or thread is None:
            return
        seg, stop, position = unchecked

        def replaced() -> bool:
            # By compaction, which read every one of its frames to prove
            # its rewrite: nothing is left to check.
            return not any(s is seg for s in self._segments)

        self._readers += 1
        try:
            scratch = _scratch(seg)
            walked = await self._walk_frames(thread, seg, scratch, stop, False, True, replaced)
        finally:
            self._reader_done(thread)
        self._unchecked = None
        if walked is None:
            self._tail_ok = True
            return
        walker, err = walked
        if err is not None:
            why = f"{err.reason} at offset {err.offset}"
        elif walker.offset != stop or walker.next_position != position:
            why = (
                f"the frames before offset {stop} end at offset {walker.offset} and "
                f"position {walker.next_position - 1}, but the frame at {stop} starts "
                f"at position {position}"
            )
        else:
            k = bisect_left(seg.frame_off, stop)
            if seg.frame_off[:k] != scratch.frame_off or seg.frame_pos[:k] != scratch.frame_pos:
                self.logger.warning(
                    "%s: %s did not match the frames before offset %d; rebuilt",
                    seg.path,
                    TAIL_INDEX,
                    stop,
                )
                seg.frame_off = scratch.frame_off + seg.frame_off[k:]
                seg.frame_pos = scratch.frame_pos + seg.frame_pos[k:]
            self._tail_ok = True
            return
        # At once, not at close(): after a crash too, the next open must
        # walk these frames, and refuse the log as a full walk does.
        self._drop_tail_index()
        self.logger.warning(
            "%s: %s (reads of the events there will fail, and the next open refuses "
            "the log; see eventstore verify)",
            seg.path,
            why,
        )

    def frame_checksum(self, position: int) -> int | None:
        """The checksum field of the last frame starting at or before ``position``.

        Snapshots record it to prove they belong to this log.  "At or before"
        because compaction may have dropped the event at ``position`` itself.
        """
        if position > self._written_head():
            return None
        found = self._locate(position)
        if found is None:
            return 0  # compaction dropped every event up to ``position``
        frame = self._find_frame(*found, position)
        return frame[4]

    def _find_frame(self, seg: Segment, i: int, pos: int) -> tuple[int, int, int, bytes, int]:
        """The last frame of ``seg`` starting at or before ``pos``, from index entry ``i``.

        Returns (first position, count, offset, the bytes read from that offset
        (at least its header), checksum field).
        """
        start = seg.frame_off[i]
        stop = seg.frame_off[i + 1] if i + 1 < len(seg.frame_off) else seg.end
        window = os.pread(seg.fd, stop - start, start)
        best = None
        o = 0
        while o + FRAME_HEADER_SIZE <= len(window):
            length, crc, first, count = FRAME_HEADER.unpack_from(window, o)
            if first > pos:
                break
            best = (first, count, start + o, window[o:], crc)
            o += FRAME_HEADER_SIZE + length
        if best is None:
            raise IntegrityError(f"{seg.path}: no frame header at offset {start}")
        return best

    async def flush(self) -> None:
        """Return once everything submitted so far has been written (any mode)."""
        if self._failed is not None and self._unwritten:
            # Never written, and never will be: returning would pass them for
            # written ("none" mode's callers have not heard of the failure).
            raise self._stopped()
        if not self._unwritten or self._failed is not None:
            return
        assert self._wake is not None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._wake.set()
        await fut

    def _from_disk(self, pos: int) -> Event:
        found = self._locate(pos)
        if found is None:
            raise self._no_event(pos)
        seg, i = found
        key = (seg.first, seg.frame_off[i])
        for attempt in (1, 2):
            cached = self._cache.get(key)
            if cached is None:
                cached = self._read_window(seg, i)
                self._cache[key] = cached
                self._cached_bytes += cached[1]
                while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
                    _, (_, dropped) = self._cache.popitem(last=False)
                    self._cached_bytes -= dropped
            else:
                self._cache.move_to_end(key)
            for first, raws in cached[0]:
                if first <= pos < first + len(raws):
                    raw = raws[pos - first]
                    if raw == _NIL and seg.holes:
                        raise self._no_event(pos)  # a hole of a compacted frame
                    return decode_event(raw, f"{seg.path} position {pos}")
            if attempt == 1:
                # The last window of the active segment grows as rounds are
                # written: a cached copy may predate ``pos``.
                self._cached_bytes -= self._cache.pop(key)[1]
        raise self._no_event(pos)

    def _read_window(self, seg: Segment, i: int) -> tuple[list[tuple[int, list[msgspec.Raw]]], int]:
        """Read and check the frames between index entries ``i`` and ``i + 1``.

        One pread of a few KiB (usually from the page cache) on the loop:
        cheaper than a thread hop.  Each frame is only split into its events'
        raw bytes; fetch() decodes just the events asked for, so a row costs
        about the same whether its frame holds one event or a thousand.
        """
        start = seg.frame_off[i]
        stop = seg.frame_off[i + 1] if i + 1 < len(seg.frame_off) else seg.end
        data = os.pread(seg.fd, stop - start, start)
        walker = FrameWalker(start, seg.frame_pos[i], gaps_allowed=True)
        window: list[tuple[int, list[msgspec.Raw]]] = []
        try:
            for info, payload in walker.feed(data):
                raws = split_batch(payload, f"{seg.path} offset {info.offset}")
                if len(raws) != info.count:
                    raise IntegrityError(
                        f"{seg.path}: frame at offset {info.offset} holds {len(raws)} "
                        f"events, its header says {info.count}"
                    )
                if seg.holes and (raws[0] == _NIL or raws[-1] == _NIL):
                    # As decode_batch rules: a hole is inside a frame, or the
                    # frame is damaged (and a read of it says so, not "no event").
                    raise IntegrityError(
                        f"{seg.path}: frame at offset {info.offset} begins or ends "
                        "with a hole (nil)"
                    )
                window.append((info.first_position, raws))
        except FrameError as err:
            raise IntegrityError(f"{seg.path}: {err.reason} at offset {err.offset}") from None
        if walker.pending:
            raise IntegrityError(f"{seg.path}: incomplete frame at offset {walker.offset}")
        return window, len(data) + RAW_BYTES * sum(len(raws) for _, raws in window)

    def replace_sealed(self, count: int) -> None:
        """Take up the segments compaction put in place of the first ``count``."""
        old = self._segments[:count]
        limit = self._segments[count].first
        fresh: list[Segment] = []
        for first, name in list_segments(self.directory)[0]:
            if first >= limit:
                break
            fresh.append(_open_sealed(os.path.join(self.directory, name), first)[0])
        following = [*fresh[1:], self._segments[count]]
        for before, after in zip(fresh, following, strict=False):
            before.next_position = after.first
        # Slice assignment: the writer thread may append a rolled segment at
        # the end of this same list meanwhile.
        self._segments[:count] = fresh
        self._cache.clear()
        self._cached_bytes = 0
        fds = [seg.fd for seg in old]
        if self._readers:
            self._retired_fds += fds
        else:
            self._close_fds(fds)

    # -- followers -------------------------------------------------------------------
    async def refresh(self) -> int:
        """Pick up what a writer appended since (read-only logs); return the new head.

        Concurrent calls share one look, run in a task of its own: two
        looks at once would each take up (and close) the other's files, and
        a caller cancelled half-way must not leave files opened and not held.
        A call shares only a look that began after it: one already under way
        may have measured the files before the writer's last write, and the
        caller (who flushed a writer, say) must see what was on disk when it
        called.
        """
        if not self._open:
            raise ConnectionError(f"{self.directory}: the log is not open")
        if not self.read_only:
            # The writer knows its log; the disk may not yet hold what it
            # accepted, and a head read from it would hand positions out again.
            return self._head
        looking = self._looking
        if looking is not None and not looking.done():
            # Under way since before this call (another caller's, the follow
            # task's, or one whose caller was cancelled): wait, then look again.
            await asyncio.wait({looking})
            if not self._open:
                raise ConnectionError(f"{self.directory}: the log was closed during a refresh")
            if self._stopped_short:
                # It stopped at the end of files a compaction replaced: the
                # caller reads those first (refresh_pending), then calls
                # again.  Looking again now would take up the new files
                # before what only the old ones hold was read.
                return self._head
            looking = self._looking  # another waiter may have begun the next look
        if looking is None or looking.done():
            looking = self._looking = asyncio.ensure_future(self._look())
        await asyncio.shield(looking)
        return self._head

    async def _look(self) -> None:
        assert self._thread is not None
        await self._thread.call(self._look_for_rewrite)
        # Taken from the log, not from the call's result: a look cancelled
        # meanwhile (its loop ending) leaves them for close().
        fresh, self._fresh = self._fresh, None
        if fresh is not None:
            self._take_segments(fresh)
        await self._thread.call(self._refresh_files)

    @property
    def history_lost(self) -> bool:
        """True if a refresh() found events dropped that this reader never read.

        A compaction drops events (a clear, a forget, superseded statistics)
        whose effect the new files hold only folded into what they keep.  A
        reader that had read up to where the compaction's range ends saw
        them; one that had not (it looked too seldom, across a roll or a
        second compaction) built its state from a history with a hole, and
        should build it again from a snapshot or the start, then say so
        with history_rebuilt().
        """
        return self._lost

    def history_rebuilt(self) -> None:
        self._lost = False

    @property
    def refresh_pending(self) -> bool:
        return self._stopped_short

    def _look_for_rewrite(self) -> None:
        """Notice a compaction that replaced segments this reader holds, in two looks.

        The compaction replaced sealed segment files (some under the names
        of old ones) and removed others; going on with the old files would
        read their events again after the positions that followed them.
        The first look reads the held files to their end (their last
        events: a clear, a forget, which compaction may have dropped from
        the new files) and stops there: the head is the end of the old
        files, and ``refresh_pending`` asks the caller to read up to it and
        refresh again.  The next look opens the new files (``_fresh``);
        positions never change, so the reader goes on from its head.
        """
        if self._fresh is not None:  # left by a look cancelled before it took them
            _close_quietly([seg.fd for seg in self._fresh])
            self._fresh = None
        if cuts_seen(self.directory) != self._cuts:
            raise IntegrityError(
                f"{self.directory}: the log was cut since this reader opened it ({CUTS} "
                "changed: repaired, or an unfinished import undone), and its later "
                "positions may hold other events now; open the store again to read the "
                "log as it is now"
            )
        # Only the first look asks to be called again at once: while a
        # switch is still moving files, the next look waits its turn.
        self._stopped_short = False
        names, _ = list_segments(self.directory)
        if not self._segments or not self._replaced(names):
            self._rewrite_seen = False
            return
        if not self._rewrite_seen:
            last = self._segments[-1]
            self._continue_scan(last)
            self._head = last.next_position - 1
            self._rewrite_seen = self._stopped_short = True
            return
        if pending_commit(self.directory) is not None:
            return  # still moving files: the next look takes them
        fresh = self._rewritten_segments(names)
        if fresh is not None and not (
            _by_compaction(self._segments, fresh) or _empty_last_replaced(self._segments, fresh)
        ):
            _close_quietly([seg.fd for seg in fresh])
            raise IntegrityError(
                f"{self.directory}: segment files this reader holds were removed or "
                "replaced, and not by a compaction (it writes new compacted segments): the "
                "log was cut (repaired, or an unfinished import undone), and its later "
                "positions may hold other events now; open the store again to read the "
                "log as it is now"
            )
        self._fresh = fresh
        if self._fresh is not None:
            self._rewrite_seen = False

    def _rewritten_segments(self, names: list[tuple[int, str]]) -> list[Segment] | None:
        """The directory's segments ``names``, opened anew; None if they moved meanwhile."""
        fresh: list[Segment] = []
        try:
            for first, name in names:
                path = os.path.join(self.directory, name)
                seg, header = _open_sealed(path, first)
                fresh.append(seg)
                check_fingerprint(header, path)
                if self.store_id is not None and header.store_id != self.store_id:
                    raise IntegrityError(f"{path}: segment of another store")
        except FileNotFoundError:
            # Removed between the listing and the open: a switch began.
            _close_quietly([seg.fd for seg in fresh])
            return None
        except BaseException:
            _close_quietly([seg.fd for seg in fresh])
            raise
        if not fresh:
            return None
        # A switch may have begun while the files were opened: take them
        # only if they are still, all of them, the directory's segments.
        if pending_commit(self.directory) is not None or list_segments(self.directory)[0] != names:
            _close_quietly([seg.fd for seg in fresh])
            return None
        if not all(_same_file(seg.path, seg.fd) for seg in fresh):
            _close_quietly([seg.fd for seg in fresh])
            return None
        for before, after in pairwise(fresh):
            before.next_position = after.first  # walked when first read, as after open()
        # The last one is scanned as it grows (_refresh_files), from its header.
        fresh[-1].end = HEADER_SIZE
        fresh[-1].indexed = True
        return fresh

    def _replaced(self, names: list[tuple[int, str]]) -> bool:
        """Has a file this reader holds been removed or replaced, or one put before its last?"""
        on_disk = dict(names)
        for seg in self._segments:
            name = on_disk.get(seg.first)
            if name is None or not _same_file(os.path.join(self.directory, name), seg.fd):
                return True
        last = self._segments[-1].first
        known = {seg.first for seg in self._segments}
        return any(first < last and first not in known for first in on_disk)

    def _take_segments(self, fresh: list[Segment]) -> None:
        """Hold ``fresh`` (from _rewritten_segments) in place of the old segments; on the loop."""
        read_to = self._head  # the end of the old files, read by now
        self._must_reach = read_to
        old, self._segments = self._segments, fresh
        through = self.compacted_through()
        if through is not None and through > read_to:
            self._lost = True
        # The cache is keyed by segment and offset, which now name other frames.
        self._cache.clear()
        self._cached_bytes = 0
        fds = [seg.fd for seg in old]
        # A walk a read started may not have begun yet (it counts itself
        # as a reader when it does): its segment's descriptor must stay.
        if self._readers or self._indexing:
            self._retired_fds += fds
        else:
            self._close_fds(fds)

    def _refresh_files(self) -> None:
        names, _ = list_segments(self.directory)
        if self._segments and (pending_commit(self.directory) is not None or self._replaced(names)):
            # A compaction is moving files, or moved them since the look in
            # _rewritten_segments: the next refresh takes them up whole.
            return
        known = {seg.first for seg in self._segments}
        for first, name in names:
            if first in known:
                continue
            if self._segments and first < self._segments[-1].first:
                continue  # compaction rewrote older segments; handled on reopen
            path = os.path.join(self.directory, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                break  # removed since the listing: the next look sees why
            header = unpack_header(os.pread(fd, HEADER_SIZE, 0), path)
            check_fingerprint(header, path)
            if self.store_id is None:
                self.store_id = header.store_id
            elif header.store_id != self.store_id:
                os.close(fd)
                raise IntegrityError(f"{path}: segment of another store")
            if self._segments:
                last = self._segments[-1]
                self._continue_scan(last)
                if last.next_position < first and not (
                    last.gaps_allowed or header.flags & FLAG_COMPACTED
                ):
                    # A listing taken while the writer rolls can show a new
                    # segment without the one before it: look again later.
                    # One missing look after look is gone for good.
                    os.close(fd)
                    self._gap_looks += 1
                    if self._gap_looks >= GAP_LOOKS:
                        raise IntegrityError(
                            f"{path}: segment starts at position {first}, but the previous "
                            f"segment ends at {last.next_position - 1} (events missing)"
                        )
                    break
            self._gap_looks = 0
            self._segments.append(Segment(first, path, fd, header.flags, next_position=first))
            self._segments[-1].indexed = True
        if not self._segments:
            return
        seg = self._segments[-1]
        self._continue_scan(seg)
        head = seg.next_position - 1
        if self._must_reach is not None:
            if head < self._must_reach:
                # Compaction keeps the head (its new last segment starts
                # after it), so files that end before what was read were
                # cut: by repair, or an import undone.  New events would
                # take positions whose old events this reader has applied.
                raise IntegrityError(
                    f"{self.directory}: the log now ends at position {head}, before position "
                    f"{self._must_reach} this reader has read (it was cut: repaired, or an "
                    "unfinished import undone); open the store again to read the log as it "
                    "is now"
                )
            self._must_reach = None
        self._head = head

    def _check_unchanged(self, seg: Segment) -> None:
        """Refuse to go on if the last frame this reader walked has changed.

        A writer whose write fails takes the round's frames back (truncates),
        and a repair cuts the log; a reader may have read those frames
        already, and new, different ones then take their place.  Reading on
        from where it stopped would keep events that are not in the log.
        """
        if seg.last_header and (
            os.pread(seg.fd, FRAME_HEADER_SIZE, seg.last_frame) != seg.last_header
        ):
            raise IntegrityError(
                f"{seg.path}: the frame at offset {seg.last_frame}, already read, has "
                "changed or is gone (a writer took back a failed write, or the log was "
                "repaired); open the store again to read the log as it is now"
            )

    def _continue_scan(self, seg: Segment, live: bool = True) -> None:
        """Index frames appended to ``seg`` since it was last scanned (readers).

        A frame the writer is still copying can look damaged, and by the time
        ``_is_torn`` reads the tail again it may be complete and followed by
        the next one, which looks like damage before a valid frame.  So a
        walk that stops on what looks like damage is tried again; only one
        that stops at the same offset twice is reported.  ``live=False``:
        no writer holds the store, so zero-filled space is checked too.
        """
        self._check_unchanged(seg)
        stuck_at = -1
        while True:
            size = os.fstat(seg.fd).st_size
            walker, err = _index_frames(
                seg, seg.end, seg.next_position, size, seg.gaps_allowed, live=live
            )
            seg.end, seg.next_position = walker.offset, walker.next_position
            if err is None or self._is_torn(seg, err, size):
                if seg.end > HEADER_SIZE:
                    seg.last_header = os.pread(seg.fd, FRAME_HEADER_SIZE, seg.last_frame)
                return
            if err.offset == stuck_at:
                raise IntegrityError(f"{seg.path}: {err.reason} at offset {err.offset}")
            stuck_at = err.offset
