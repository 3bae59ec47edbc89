"""Compaction of the PostgreSQL log: a delete of what no read can see, in one transaction.

What goes, as in the segment log's compaction (``compaction.py``):

* the rows of messages removed by ``clear_old_messages``, of user counts
  removed by a retention decision (``UserCountsTrimmed``), and every row of a
  forgotten user: statistics, actions, chat lines;
* ``UserForgotten`` rows themselves, once no row of that user is left before
  them: the name must not survive in any row;
* superseded statistics.  Of a user's statistics rows (``UserStatsSaved``,
  ``UserStatsSet``, ``SessionEnded``) only the last is kept, rewritten in
  place (an UPDATE of its tag and payload, in the same transaction) into one
  ``UserStatsSet`` holding the user's statistics as every read returns them;
  the channel's peaks likewise fold into one ``ChannelStatsSet``.

Folding is optional for a delete-only compaction; we fold because
statistics rows are about half of a bot's log (one per chat line), so a
compaction that kept them would reclaim little.  The rewritten row is
absolute, so any reader that reaches it gets the right statistics whatever
it read before it: folding is as safe for a follower as a delete.

What stays: positions.  Kept rows keep theirs, rewritten rows keep theirs,
and the head row is never touched, so no position is handed out twice and
ids (positions) of surviving rows are the same as before.
``MessagesCleared`` and ``UserCountsTrimmed`` rows stay too (a few bytes,
and no names).

Why it is safe.  The projections are rebuilt twice up to the same position:
from the log as it is, and from the log as it would be after the delete and
the rewrites.  If their ``state()`` differ, nothing is changed and
IntegrityError is raised.  The comparison is made inside the transaction
that deletes, after it took the append lock.

The lock.  Appends take the next positions by updating the single row of
``eventstore_head`` (pglog.APPEND), so a lock that conflicts with that
UPDATE stops every writer of every process.  We take the table in SHARE ROW
EXCLUSIVE mode: it conflicts with the ROW EXCLUSIVE lock every UPDATE takes
(an append that already holds it finishes first; the next one waits for our
commit), and with itself (two compactions take turns), but not with plain
SELECTs, so readers and followers go on.  The head row's lock (``SELECT ...
FOR UPDATE``) would stop the appends as well, but a transaction that waited
for a row lock does not see catalog changes committed meanwhile (its
negative cache still says the books tables do not exist after the first
compaction created them), while acquiring a table lock processes them.
Holding the lock for a whole replay of a large log would stall the bots for
that long, so the work is split:

1. Without a lock: read the log up to its head H0, twice (once to learn what
   every read sees at H0 and where each user's statistics end, once to
   decide row by row and to build the projections of the new log), and note
   the compaction count (``eventstore_compactions``).
2. One transaction.  First the compaction lock, a transaction-level advisory
   lock that only compactions of this store take (its key is COMPACTION_LOCK
   and the oid of the store's events table): from here no other compaction
   commits, while appends go on.  Check that no other compaction committed
   since step 1 (only a compaction changes rows at or below a head, so the
   rows up to H0 are exactly those step 1 read).  Delete and rewrite those
   rows and update the books: appends never touch rows at or below a head,
   so none waits for this.  Then take the append lock; read the rows
   appended since H0, up to the head H, and apply them to both projections;
   compare; commit.

So the proof is made on the log as it is at H, under the append lock, and
nothing else changes before the commit makes it all visible at once.  The
append lock is held only for the tail since H0 and the comparison of the
two read models' whole state (``Projections.same_state``, on their arrays:
about 1 ms at 400,000 events of the busy-channel workload; through
``state()``, an object a row, it took 80 ms).  The DELETE and the books came
after the append lock until they were found to hold it for 1.9 s of a first
compaction at a million events (0.7 s the DELETE, 1.2 s the books' INSERT,
on a host at half speed), which every writer waited out.  Comparing only
what the tail touched would shorten the lock further; not done, as the full
comparison is the proof.  Rejected: one long transaction in REPEATABLE READ
without the lock (writers could append between the proof and the delete,
and nothing would have checked that their rows fold the same on the
compacted log); an advisory lock in place of the append lock (appends do
not take it); the whole replay under the lock (simplest, but it stalls
every bot for as long as a replay takes, seconds on a large log).  A
process of a version from before the compaction lock compacts under the
append lock alone, so it can commit while this one works.  This one then
finds rows gone, or the epoch changed once it has the append lock, or the
server breaks a deadlock between the two by rolling this one back: each
time it rolls back and plans again.  If the server rolls the other one
back instead, that one fails and changes nothing.  While the two wait for
each other (about a second, the server's ``deadlock_timeout``) the other
one holds the append lock, and every writer waits.  The transaction sets
``idle_in_transaction_session_timeout`` (LOCK_IDLE_TIMEOUT): a client that
stops between two of its statements loses its session, and its locks,
after that long, instead of holding every writer until it goes on.

Followers.  Other processes read forward by position and never go back: a
deleted row simply is not in any later page, and a rewritten row is read in
its new form.  A follower that had already read part of the compacted range
when the compaction committed folds the old rows it read with the new ones
after them.  For cleared messages, trimmed counts and folded statistics that
mix gives the same state: an absolute row overrides whatever came before it,
and a clear keeps the newest rows, among which the deleted ones never were
(tests/test_pg_compaction.py checks random histories cut at every
position).  A forgotten user's rows are different: a follower that read
some of them but not yet the ``UserForgotten`` row keeps the user until it
reconnects, and one that read older chat lines may keep a line that a later
clear dropped while the user's lines still counted.  Compaction right
after ``forget_user`` keeps this window to the time a follower takes to
read one notification (longer if its event loop is busy).  A read of chat
lines or actions that asks for a deleted row rebuilds that process's read
models (``EventStore._fetch_rows``); short of that, rejected here: making
followers detect every compaction behind them and rebuild (the store would
replay from scratch while serving reads, after nearly every compaction).
The segment log's followers do detect it, and rebuild: they see compaction
only at their next look at the directory, which may be a second later, and
they first read the files they hold to their end, so they rebuild only
when a compaction reached past what they had read
(``SegmentLog.history_lost``).

The books (pglog.BOOKKEEPING_DDL), written in the same transaction:
``eventstore_compactions`` gets one row per compaction (which also makes
concurrent compactions detect each other), ``eventstore_deleted`` the ranges
of positions deleted, merged with those of earlier compactions, so that
``verify`` can tell a gap left by compaction from a row that went missing.
We keep ranges rather than a count: a count says that rows are missing, the
ranges say which, and they cost 16 bytes per gap (gaps are never more than
the rows kept, and adjacent deletions share one range).
"""

from __future__ import annotations

import asyncio
import logging
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec

from projections import Projections

from .compaction import CompactReport, Planner
from .errors import ConnectionError, IntegrityError, StorageError
from .events import (
    Event,
    event_name,
    event_tag,
)
from .pglog import (
    BOOKKEEPING_DDL,
    LOCK_IDLE_TIMEOUT,
    PostgresLog,
    count_compactions,
    decode_rows,
)

__all__ = ["PostgresCompactReport", "bigint_array", "compact_postgres", "merge_ranges"]

#: Called with (steps done, steps in total).
Progress = Callable[[int, int], None]

#: How often a compaction plans again when another one committed meanwhile.
ATTEMPTS = 3
#: PostgreSQL's SQLSTATE for a deadlock it broke by rolling one transaction back.
DEADLOCK_DETECTED = "40P01"
# LOCK_IDLE_TIMEOUT (from pglog, shared with its appends of several
# statements): seconds the compaction's transaction may sit idle between its
# statements (while this process decodes the tail and compares) before the
# server ends the session, which rolls it back and releases its locks.  The
# client work between two statements takes milliseconds; see _commit for
# why there is a limit at all.

_encoder = msgspec.msgpack.Encoder()


@dataclass
class PostgresCompactReport(CompactReport):
    """A CompactReport of the PostgreSQL log.

    No segments: ``segments_*`` stay 0.  ``bytes_*`` are payload bytes of
    the rows up to ``through_position``; PostgreSQL reuses the table space
    of deleted rows for new ones after (auto)vacuum, but not the pages of the
    primary key on positions, which only grow (docs/cli.md, "Space": a
    ``REINDEX`` now and then gives them back).
    """

    #: Every position up to this one was considered (the head when it committed).
    through_position: int = 0
    #: Rows rewritten in place (folded statistics).
    rows_rewritten: int = 0


# -- the plan ------------------------------------------------------------------------------


# The directory store's rules, so both backends compact alike (the tests
# reach the decision through this name).
_Planner = Planner


@dataclass
class _Plan:
    through: int
    epoch: int
    before: Projections
    after: Projections
    events: int
    delete: list[int]
    rewrite: dict[int, Event]
    dropped: dict[str, int]
    users_folded: int


async def _plan(
    log: PostgresLog, through: int, epoch: int, trim_before: int | None, step: Callable[[int], None]
) -> _Plan:
    # Pass 1: what every read sees at ``through``, and where each user's
    # statistics (and the channel's) were last changed.
    # By pages, not runs: after a compaction a page holds thousands of runs
    # between the gaps, and a list for each made the garbage collector run
    # in full every page or two (read_groups).
    before = Projections()
    planner = _Planner(trim_before)
    events = 0
    async for positions, page in log.read_pages(1, through):
        before.apply_all(zip(positions, page, strict=True))
        for position, event in zip(positions, page, strict=True):
            planner.observe(position, event)
        events += len(page)
        step(len(page))
    users_folded = planner.fold(before)

    # Pass 2: decide row by row, and fold the new log as it would read.
    after = Projections()
    delete: list[int] = []
    rewrite: dict[int, Event] = {}
    dropped: dict[str, int] = {}
    async for positions, page in log.read_pages(1, through):
        for position, event in zip(positions, page, strict=True):
            keep = planner.decide(position, event)
            if keep is None:
                delete.append(position)
                name = event_name(event)
                dropped[name] = dropped.get(name, 0) + 1
                continue
            if keep != event:
                rewrite[position] = keep
            after.apply(position, keep)
        step(len(page))
    return _Plan(
        through,
        epoch,
        before,
        after,
        events,
        delete,
        rewrite,
        dict(sorted(dropped.items())),
        users_folded,
    )


# -- the books ------------------------------------------------------------------------------


def merge_ranges(
    old: Iterable[tuple[int, int]], positions: Sequence[int]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Merge newly deleted ``positions`` (ascending) into the recorded ranges ``old``.

    ``old`` holds disjoint (first, last) ranges, none adjacent to another.
    Returns (first positions of old ranges to remove, ranges to insert) that
    turn ``old`` into the ranges of the union, again disjoint and never
    adjacent.
    """
    pieces: list[tuple[int, int, bool]] = [(a, b, True) for a, b in old]
    run_start = run_end = None
    for p in positions:
        if run_end is not None and p == run_end + 1:
            run_end = p
            continue
        if run_start is not None and run_end is not None:
            pieces.append((run_start, run_end, False))
        run_start = run_end = p
    if run_start is not None and run_end is not None:
        pieces.append((run_start, run_end, False))
    pieces.sort()
    remove: list[int] = []
    insert: list[tuple[int, int]] = []
    group: list[tuple[int, int, bool]] = []  # pieces that touch: one range
    end = 0

    def close() -> None:
        if not group or (len(group) == 1 and group[0][2]):
            return  # nothing, or an old range nothing touched
        remove.extend(a for a, _, was_old in group if was_old)
        insert.append((group[0][0], end))

    for piece in pieces:
        if group and piece[0] <= end + 1:
            group.append(piece)
            end = max(end, piece[1])
        else:
            close()
            group, end = [piece], piece[1]
    close()
    return remove, insert


#: The recorded ranges of deleted positions, as two columns (first, last).
_Books = tuple["array[int]", "array[int]"]


class _Change(NamedTuple):
    """The commit's large arrays, as SQL constants (see ``bigint_array``)."""

    delete: str  # the positions to delete
    remove: str  # the first positions of the books' ranges merged away
    insert_first: str  # the books' new ranges, as two columns
    insert_last: str
    removes: int  # how many ranges are merged away
    inserts: int  # how many are inserted


def _books_change(old: _Books, positions: list[int]) -> _Change:
    """``merge_ranges``, and the commit's arrays as SQL constants.

    Run in a worker thread, as every pass here is over hundreds of
    thousands of ranges after a first compaction.
    """
    first, last = old
    remove, insert = merge_ranges(zip(first, last, strict=True), positions)
    return _Change(
        bigint_array(positions),
        bigint_array(remove),
        bigint_array([a for a, _ in insert]),
        bigint_array([b for _, b in insert]),
        len(remove),
        len(insert),
    )


#: Integers per join in ``bigint_array``: each join holds the GIL throughout.
_JOIN_SLICE = 20_000


def bigint_array(values: Sequence[int]) -> str:
    """``values`` as a SQL constant of type ``bigint[]``, to write into a statement.

    A compaction names up to a million positions in one statement.  Passed
    as a parameter (a list of ints), asyncpg encoded them one by one on the
    event loop: 0.16-0.26 s for half a million in a probe, with the append
    lock held.  Built here, in a worker thread, the statement leaves the
    loop only a copy.  A constant, not a ``$1::text::bigint[]`` parameter:
    the server hashes a constant array for ``= ANY``, and that cast is no
    constant to it, so it walked the whole array for every row (a DELETE of
    half a million rows ran for minutes).  ``int.__repr__`` makes sure that
    only digits and minus signs are written into the SQL.  In slices, as
    one ``join`` is one C call, which keeps the loop's thread out until it
    returns.
    """
    step = _JOIN_SLICE
    digits = ",".join(
        [",".join(map(int.__repr__, values[i : i + step])) for i in range(0, len(values), step)]
    )
    return f"'{{{digits}}}'::bigint[]"


async def _books(conn: Any) -> tuple[int, _Books]:
    """The number of compactions so far, and the deleted ranges recorded."""
    epoch = await count_compactions(conn.fetchval)
    if not epoch:
        return 0, (array("q"), array("q"))  # only a compaction records deleted ranges
    rows = await conn.fetch(
        "SELECT first_position, last_position FROM eventstore_deleted ORDER BY first_position"
    )
    # Half a million rows after a first compaction, kept until the commit.
    # Turned into tuples on the loop, they held it for 0.2 s.  As asyncpg's
    # records, or as a list of tuples, every full collection of the garbage
    # collector walked them: in a probe of forget_user at a million events
    # (25 full collections), a list of the tuples made each take 46 ms.  An
    # array holds no objects, so the collector does not look inside it.
    return epoch, await asyncio.get_running_loop().run_in_executor(None, _as_columns, rows)


def _as_columns(rows: Sequence[Sequence[int]]) -> _Books:
    return array("q", [row[0] for row in rows]), array("q", [row[1] for row in rows])


# -- compaction ------------------------------------------------------------------------------


async def compact_postgres(
    log: PostgresLog,
    *,
    dry_run: bool = False,
    trim_before: int | None = None,
    progress: Progress | None = None,
    logger: logging.Logger | None = None,
) -> PostgresCompactReport:
    """Delete (and fold) what no read of ``log`` (open for writing) can see any more.

    ``trim_before`` (dry runs only) counts user counts older than it as
    already trimmed, to report what a retention decision would reclaim.
    Raises IntegrityError, changing nothing, if the compacted log would not
    give exactly the same projections.  ``progress(done, total)`` counts
    rows read.
    """
    logger = logger or logging.getLogger("eventstore")
    if log.read_only and not dry_run:
        raise StorageError(f"{log.where}: the log is open read-only; nothing compacted")
    lock = _AppendLock()
    try:
        async with log.dedicated() as conn:
            for _attempt in range(ATTEMPTS):
                through = int(await conn.fetchval("SELECT position FROM eventstore_head") or 0)
                epoch, ranges = await _books(conn)
                steps = _Steps(progress, through * 2)
                plan = await _plan(log, through, epoch, trim_before if dry_run else None, steps)
                report = await _measure(conn, plan, dry_run)
                if dry_run or (not plan.delete and not plan.rewrite):
                    return report
                if not plan.after.same_state(plan.before):
                    raise _refused(log)
                try:
                    committed = await _commit(conn, log, plan, ranges, lock)
                except _Stale:
                    committed = None
                except Exception as err:
                    if getattr(err, "sqlstate", None) != DEADLOCK_DETECTED:
                        raise
                    # With a compaction of a version that takes the append
                    # lock alone, while it waited for rows this one deleted:
                    # the server rolled one of the two back, this one.
                    committed = None
                lock.begun = lock.held = False  # its transaction ended
                if committed is None:
                    logger.info(
                        "%s: another compaction committed or ran meanwhile; planning again",
                        log.where,
                    )
                    continue
                report.through_position = committed
                logger.info(
                    "%s: compacted positions 1..%d: %d rows deleted, %d rewritten",
                    log.where,
                    committed,
                    len(plan.delete),
                    len(plan.rewrite),
                )
                return report
    except ConnectionError as err:
        if not lock.begun:
            raise  # before its transaction: nothing was changed, and the error says why
        # Perhaps the idle limit (LOCK_IDLE_TIMEOUT) at work, perhaps not:
        # asyncpg reports the server's ending of the session as a bare
        # "connection was closed", so the limit is named as a possibility.
        if lock.held:
            where = (
                "while it held the append lock (the server ends a compaction's session that "
                f"sits idle in its transaction for over {LOCK_IDLE_TIMEOUT:g} s, if its "
                "process stalls, so that the other writers go on)"
            )
        else:
            where = (
                "before it took the append lock, with only the compaction lock held (which "
                "other compactions wait for, not writers; the server ends a session that sits "
                f"idle in its transaction for over {LOCK_IDLE_TIMEOUT:g} s)"
            )
        raise ConnectionError(
            f"{err}; the compaction lost its connection in its transaction, {where}. Unless "
            "the connection went during the COMMIT itself, nothing was changed; compacting "
            "again is safe either way"
        ) from err
    raise StorageError(
        f"{log.where}: other compactions kept committing while this one planned "
        f"({ATTEMPTS} attempts); nothing was changed"
    )


class _Steps:
    """Counts rows read for a progress callback (two passes over the log)."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = max(1, total)
        self.done = 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)


def _refused(log: PostgresLog) -> IntegrityError:
    return IntegrityError(
        f"{log.where}: compaction refused: the compacted log would change what reads "
        "return; nothing was changed"
    )


async def _measure(conn: Any, plan: _Plan, dry_run: bool) -> PostgresCompactReport:
    """The report, with payload bytes before and after, from the plan."""
    before = await conn.fetchval(
        "SELECT coalesce(sum(octet_length(payload)), 0) FROM eventstore_events "
        "WHERE position <= $1",
        plan.through,
    )
    touched = await asyncio.get_running_loop().run_in_executor(
        None, bigint_array, plan.delete + list(plan.rewrite)
    )
    gone = await conn.fetchval(
        "SELECT coalesce(sum(octet_length(payload)), 0) FROM eventstore_events "
        f"WHERE position = ANY({touched})"
    )
    added = sum(len(_encoder.encode(event)) for event in plan.rewrite.values())
    return PostgresCompactReport(
        dry_run=dry_run,
        bytes_before=int(before),
        bytes_after=int(before) - int(gone) + added,
        events_before=plan.events,
        events_after=plan.events - len(plan.delete),
        dropped_by_type=plan.dropped,
        users_folded=plan.users_folded,
        through_position=plan.through,
        rows_rewritten=len(plan.rewrite),
    )


async def _append_lock(conn: Any, plan: _Plan, lock: _AppendLock) -> None:
    """Take the append lock; raise _Stale if a compaction committed since ``plan``.

    Only a compaction of a version without the compaction lock can have
    (it takes the append lock alone), and only before this lock is taken.
    Taking it also makes the server process catalog changes committed
    meanwhile, such as the books that compaction may have created.
    """
    await conn.execute("LOCK TABLE eventstore_head IN SHARE ROW EXCLUSIVE MODE")
    lock.held = True
    if await count_compactions(conn.fetchval) != plan.epoch:
        raise _Stale  # roll all of this back, and plan again


class _Stale(Exception):
    """Another compaction committed after this one's changes began: roll back, plan again."""


class _AppendLock:
    """How far a compaction's transaction got (for its error on a lost connection)."""

    #: In the transaction, with the compaction lock and the idle limit.
    begun = False
    #: Holding the append lock as well.
    held = False


#: The high half of the compaction lock's key (ASCII "evcl"); the low half is
#: the oid of the store's events table, so each store has a lock of its own.
COMPACTION_LOCK = int.from_bytes(b"evcl", "big")


async def _commit(
    conn: Any, log: PostgresLog, plan: _Plan, ranges: _Books, lock: _AppendLock
) -> int | None:
    """Prove and apply ``plan`` in one transaction; the head it covered, or None if stale."""
    # Before the lock: the books read with the plan are the books under the
    # lock, unless another compaction committed (the epoch check below), and
    # merging a year's ranges took 0.23 s that every writer waited out.
    # In a thread: a merge of half a million deleted positions (the first
    # compaction of a million events) held this process's event loop for
    # up to 0.8 s; in a thread the loop runs at each switch of the GIL.
    change = await asyncio.get_running_loop().run_in_executor(
        None, _books_change, ranges, plan.delete
    )
    async with conn.transaction():
        # This transaction holds locks across several round trips, so a
        # client that stops between two of them (its event loop blocked by
        # other work, the process stopped, its host hung or cut off) held
        # them until it went on, or until the server noticed a dead TCP peer
        # (hours, by default).  The soak of a bot fleet found the other
        # bots' appends waiting out the whole stall.  With this limit the
        # server ends such a session and rolls the compaction back: the next
        # night's compaction does the work instead.
        await conn.execute(
            f"SET LOCAL idle_in_transaction_session_timeout = {int(LOCK_IDLE_TIMEOUT * 1000)}"
        )
        # The compaction lock: compactions of this store take turns from
        # here, while appends go on.  See "The lock" above.
        await conn.execute(
            f"SELECT pg_advisory_xact_lock(({COMPACTION_LOCK}::bigint << 32) "
            "| to_regclass('eventstore_events')::oid::bigint)"
        )
        lock.begun = True  # until the transaction ends: see compact_postgres's error
        # The first lock of this transaction on a table: taking it makes the
        # server process the catalog changes committed while we waited above
        # (an advisory lock does not), without which a compaction that
        # waited for the first one would not see the books it created.  This
        # mode, the DELETE's own, lets appends and reads go on.
        await conn.execute("LOCK TABLE eventstore_events IN ROW EXCLUSIVE MODE")
        # The epoch alone: the books themselves (a range per run of deleted
        # positions, hundreds of thousands after a first compaction) were
        # read with the plan.  No other compaction commits until this
        # transaction ends, so the epoch cannot change after this.
        epoch = await count_compactions(conn.fetchval)
        if epoch != plan.epoch:
            return None  # rows up to plan.through may have changed: plan again

        # The rows up to plan.through: appends never touch them, and no other
        # compaction can now, so they change here before the append lock.
        # At a million events the DELETE and the books took 1.9 s, which
        # every writer waited out when they came after the lock.
        status = await conn.execute(
            f"DELETE FROM eventstore_events WHERE position = ANY({change.delete})"
        )
        deleted = int(str(status).rsplit(" ", 1)[-1])
        if deleted != len(plan.delete):
            await _append_lock(conn, plan, lock)  # raises _Stale if one committed meanwhile
            raise IntegrityError(
                f"{log.where}: compaction found {deleted} of the {len(plan.delete)} rows it "
                "was to delete (rows removed outside the store?); nothing was changed"
            )
        if plan.rewrite:
            positions = list(plan.rewrite)
            events = [plan.rewrite[p] for p in positions]
            status = await conn.execute(
                "UPDATE eventstore_events AS e SET tag = r.tag, payload = r.payload "
                "FROM unnest($1::bigint[], $2::smallint[], $3::bytea[]) "
                "AS r(position, tag, payload) WHERE e.position = r.position",
                positions,
                [event_tag(type(e)) for e in events],
                [_encoder.encode(e) for e in events],
            )
            if int(str(status).rsplit(" ", 1)[-1]) != len(positions):
                await _append_lock(conn, plan, lock)
                raise IntegrityError(
                    f"{log.where}: compaction could not rewrite every row it planned to; "
                    "nothing was changed"
                )

        if not await conn.fetchval("SELECT to_regclass('eventstore_compactions') IS NOT NULL"):
            # Created here, under the compaction lock: two first compactions
            # cannot race.  Next to the store's tables, not in the first
            # schema of this connection's search_path (a role's own schema,
            # "$user", comes first by default): a process whose path finds
            # the store but not the books would take every compaction's gap
            # for lost rows.  SET LOCAL lasts to the end of this transaction,
            # whose statements all name the store's tables.
            schema = await conn.fetchval(
                "SELECT quote_ident(n.nspname) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.oid = to_regclass('eventstore_events')"
            )
            await conn.execute(f"SET LOCAL search_path TO {schema}")
            await conn.execute(BOOKKEEPING_DDL)
        if change.removes:
            await conn.execute(
                f"DELETE FROM eventstore_deleted WHERE first_position = ANY({change.remove})"
            )
        if change.inserts:
            await conn.execute(
                "INSERT INTO eventstore_deleted (first_position, last_position) "
                f"SELECT * FROM unnest({change.insert_first}, {change.insert_last})"
            )

        # The append lock: until this transaction ends, no process appends.
        # See "The lock" above for why a table lock rather than the head
        # row's.  From here to the COMMIT, every writer waits: only the
        # rows appended since the plan are read, folded and compared.
        await _append_lock(conn, plan, lock)
        head = int(await conn.fetchval("SELECT position FROM eventstore_head"))
        rows = await conn.fetch(
            "SELECT position, payload FROM eventstore_events "
            "WHERE position > $1 AND position <= $2 ORDER BY position",
            plan.through,
            head,
        )
        if rows:
            positions = [int(r[0]) for r in rows]
            tail = decode_rows([r[1] for r in rows], positions, log.where)
            pairs = list(zip(positions, tail, strict=True))
            plan.before.apply_all(pairs)
            plan.after.apply_all(pairs)
        if not plan.after.same_state(plan.before):
            raise _refused(log)
        await conn.execute(
            "INSERT INTO eventstore_compactions (id, through, deleted, rewritten) "
            "VALUES ($1, $2, $3, $4)",
            plan.epoch + 1,
            head,
            len(plan.delete),
            len(plan.rewrite),
        )
    return head
