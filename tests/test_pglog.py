"""The PostgreSQL log: many writers, one gap-free log, on a real server.

Writer processes (pg_writer.py) append concurrently through EventStore and
print every acknowledged batch; the tests then read the log back and check
that every acknowledged batch is there exactly once and whole, that
positions run 1..N without a gap, and that every instance folds the log into
the same projections.  Writers killed with SIGKILL in the middle of a
transaction leave nothing half-written.  The server comes from pgserver.py.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from eventstore import (
    ConnectionError,
    EventStore,
    IntegrityError,
    MigrationError,
    QueryError,
    ValidationError,
)
from eventstore.events import MessageSaved, UserActionLogged, UserStatsSaved, event_tag
from eventstore.pglog import PostgresLog, redact_dsn
from eventstore.validation import MAX_INT

# (Import from pgserver inside functions: a module imported before pytest
# registers it as a plugin cannot have its asserts rewritten, and says so.)
pytest_plugins = ["pgserver"]

HERE = Path(__file__).parent
ROOT = HERE.parent
TEXT = re.compile(r"w(\d+)-t(\d+)-(\d+)-(\d+)/(\d+)")


# -- writer processes ---------------------------------------------------------------------
@dataclass
class Ack:
    writer: int
    task: int
    n: int
    first: int
    size: int


@dataclass
class Writer:
    """One pg_writer.py process and what it printed."""

    writer: int
    proc: subprocess.Popen[str]
    acks: list[Ack] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    state: tuple[int, Any] | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None

    @property
    def app(self) -> str:
        return app_name(self.writer)

    def drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            kind, _, rest = line.strip().partition(" ")
            if kind == "ack":
                self.acks.append(Ack(*map(int, rest.split())))
            elif kind == "ready":
                self.ready.set()
            elif kind == "done":
                self.done.set()
            elif kind == "state":
                position, data = rest.split()
                self.state = (int(position), pickle.loads(base64.b64decode(data)))
            else:
                self.errors.append(line)
        self.ready.set()
        self.done.set()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        assert self.reader is not None
        self.reader.join()

    def go(self) -> None:
        """Wait until the writer is connected, then let it write (or finish)."""
        # Its connect() replays the whole log first: in the kill test's later
        # rounds millions of events, which took over a minute on a machine
        # busy with other work.
        assert self.ready.wait(300), f"writer {self.writer} did not start"
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> tuple[int, Any]:
        """Let a writer that is done refresh and report its state; wait for it to exit."""
        self.go()
        assert self.proc.wait(60) == 0, self.errors
        assert self.reader is not None
        self.reader.join()
        assert self.state is not None, self.errors
        return self.state


def app_name(writer: int) -> str:
    return f"pg_writer_{writer}"


def spawn(
    dsn: str,
    writer: int,
    tasks: int,
    count: int,
    max_batch: int,
    stderr: Path,
    insert_rows: int | None = None,
) -> Writer:
    from pgserver import with_params

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(stderr, "a") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "pg_writer.py"),
                with_params(dsn, application_name=app_name(writer)),
                str(writer),
                str(tasks),
                str(count),
                str(max_batch),
                *([] if insert_rows is None else [str(insert_rows)]),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            text=True,
        )
    w = Writer(writer, proc)
    w.reader = threading.Thread(target=w.drain, daemon=True)
    w.reader.start()
    return w


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


# -- checking the log ---------------------------------------------------------------------
async def read_log(dsn: str) -> tuple[list[tuple[int, Any]], dict[str, Any]]:
    """Every (position, event) of the log, and the projections of a fresh instance."""
    store = EventStore(dsn, read_only=True)
    async with store:
        events = [item async for item in store.read()]
        state = store.projections.state()
    return events, state


async def check_log(dsn: str, acks: list[Ack]) -> list[tuple[int, Any]]:
    """Assert gap-free positions, whole batches, each once, every ack present."""
    events, _ = await read_log(dsn)
    positions = [pos for pos, _ in events]
    assert positions == list(range(1, len(events) + 1)), "positions have a gap"
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT position FROM eventstore_head") == len(events)
    finally:
        await conn.close()
    batches: dict[tuple[int, int, int], list[tuple[int, int, int]]] = defaultdict(list)
    for pos, ev in events:
        if isinstance(ev, MessageSaved):
            m = TEXT.fullmatch(ev.message)
            assert m, ev
            w, t, n, i, size = map(int, m.groups())
            batches[w, t, n].append((i, size, pos))
    for key, items in batches.items():
        size = items[0][1]
        # All or nothing, each event once, in order and contiguous.
        assert [i for i, _, _ in items] == list(range(size)), f"batch {key} is {items}"
        assert [p for _, _, p in items] == list(range(items[0][2], items[0][2] + size)), key
    for ack in acks:
        items = batches.get((ack.writer, ack.task, ack.n))
        assert items, f"acknowledged batch {ack} is missing"
        assert (items[0][2], len(items)) == (ack.first, ack.size), ack
    return events


# -- many processes ---------------------------------------------------------------------------
def test_four_writer_processes_share_one_gap_free_log(pg_database: str, tmp_path: Path) -> None:
    stderr = tmp_path / "stderr.txt"
    admin = AdminConn(pg_database)
    writers: list[Writer] = []
    try:
        rollbacks_before = admin.rollbacks()
        writers += [spawn(pg_database, w, 3, 40, 6, stderr) for w in range(4)]
        for w in writers:  # all connected before any writes: they overlap
            assert w.ready.wait(60), stderr.read_text()
        for w in writers:
            w.go()
        for w in writers:
            assert w.done.wait(90), f"writer {w.writer} did not finish: {stderr.read_text()}"
            assert not w.errors, w.errors
        states = [w.finish() for w in writers]
        # Writing rolls nothing back: the kill test counts rollbacks as interrupted
        # transactions.
        wait_for(lambda: all(admin.backends(w.app) == 0 for w in writers), 10, "the backends")
        assert admin.rollbacks() == rollbacks_before
    finally:
        for w in writers:
            if w.proc.poll() is None:
                w.kill()
        admin.close()
    acks = [ack for w in writers for ack in w.acks]
    assert len(acks) == 4 * 3 * 40
    events = asyncio.run(check_log(pg_database, acks))
    # Every event is an acknowledged batch or a write of the adapter's methods.
    assert sum(isinstance(ev, MessageSaved) for _, ev in events) == sum(a.size for a in acks)
    assert sum(isinstance(ev, UserActionLogged) for _, ev in events) == 4 * 3 * 14
    # Writers interleaved: no writer's batches form one block.
    owners = [ev.username for _, ev in events if isinstance(ev, MessageSaved)]
    assert sum(a != b for a, b in pairwise(owners)) > 10
    # Every instance converged on the same projections, as did a fresh one.
    _, fresh = asyncio.run(read_log(pg_database))
    for position, state in states:
        assert position == len(events)
        assert state == fresh


def test_sigkilled_writers_lose_nothing_acknowledged_and_leave_no_partial_batch(
    pg_database: str, tmp_path: Path
) -> None:
    """Kill writers at random moments while the others go on; check the log after."""
    rng = random.Random(20240611)
    stderr = tmp_path / "stderr.txt"
    admin = AdminConn(pg_database)
    rollbacks_before = admin.rollbacks()

    def start(writer: int) -> Writer:
        # Rounds of up to 10,000 events commit as one statement, which a kill
        # cannot cut in two: the server has the whole statement or none of it.
        # Three writers in four commit every round of more than 8 events as a
        # transaction of several INSERTs, which a kill can interrupt.
        w = spawn(pg_database, writer, 3, 0, 40, stderr, None if writer % 4 == 0 else 8)
        w.go()
        return w

    live = [start(w) for w in range(4)]
    dead: list[Writer] = []
    next_id = len(live)
    kills = interrupted = 0
    try:
        while kills < 16 and not (kills >= 5 and interrupted >= 2):
            for w in live:
                wait_for(lambda w=w: len(w.acks) >= 3 or w.errors, 30, f"acks of {w.writer}")
                assert not w.errors, [*w.errors, stderr.read_text()]
            time.sleep(rng.uniform(0.05, 0.3))
            victim = live.pop(rng.randrange(len(live)))
            victim.kill()
            kills += 1
            dead.append(victim)
            # Its backends notice the closed socket, roll back and exit.
            wait_for(lambda v=victim: admin.backends(v.app) == 0, 10, "the victim's backends")
            interrupted = admin.rollbacks() - rollbacks_before
            # The others are not stuck behind the killed writer's lock.
            counts = [len(w.acks) for w in live]
            for w, c in zip(live, counts, strict=True):
                wait_for(lambda w=w, c=c: len(w.acks) > c, 10, f"writer {w.writer} to go on")
            live.append(start(next_id))
            next_id += 1
    finally:
        for w in live:
            w.kill()
            dead.append(w)
        admin.close()
    # Some kills (each a rollback counted by the server) landed inside a transaction.
    print(f"{kills} kills, {interrupted} of them inside a transaction")
    assert interrupted >= 1, f"none of {kills} kills interrupted a transaction"
    for w in dead:
        assert not w.errors, w.errors
    acks = [ack for w in dead for ack in w.acks]
    events = asyncio.run(check_log(pg_database, acks))
    assert len(events) >= sum(a.size for a in acks)


class AdminConn:
    """A synchronous view of pg_stat_* for the kill test."""

    def __init__(self, dsn: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(asyncpg.connect(dsn))

    def rollbacks(self) -> int:
        return int(
            self.loop.run_until_complete(
                self.conn.fetchval(
                    "SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()"
                )
            )
        )

    def backends(self, app: str) -> int:
        return int(
            self.loop.run_until_complete(
                self.conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app
                )
            )
        )

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


# -- one process, several instances ----------------------------------------------------------
async def test_a_store_reads_its_own_writes_while_another_writes(pg_database: str) -> None:
    a, b = EventStore(pg_database), EventStore(pg_database)
    async with a, b:
        stop = asyncio.Event()
        bob_wrote = 0

        async def chatter() -> None:
            nonlocal bob_wrote
            while not stop.is_set():
                await b.save_message("bob", f"b{bob_wrote}")
                bob_wrote += 1

        task = asyncio.create_task(chatter())
        try:
            for i in range(40):
                await a.save_message("alice", f"a{i}")
                mine = [
                    r for r in await a.get_recent_messages(limit=10**6) if r["username"] == "alice"
                ]
                assert mine[0]["message"] == f"a{i}"
                await a.log_user_action("alice", "said", f"a{i}")
                [action] = await a.get_user_actions(username="alice", limit=1)
                assert action["details"] == f"a{i}"
        finally:
            stop.set()
            await task
        assert bob_wrote > 0
        # Once both have caught up, they answer alike, ids (positions) included.
        await a.refresh()
        await b.refresh()
        assert await a.get_recent_messages(limit=50) == await b.get_recent_messages(limit=50)


async def test_a_second_instance_follows_by_notification_not_polling(pg_database: str) -> None:
    # follow=30: were the follower polling, it would see each write 30 s late.
    writer, follower = EventStore(pg_database), EventStore(pg_database, follow=30.0)
    async with writer, follower:

        async def caught_up() -> None:
            while follower.position < writer.position:
                await asyncio.sleep(0.002)

        latencies = []
        for i in range(5):
            start = time.perf_counter()
            await writer.save_message("alice", f"m{i}")
            await asyncio.wait_for(caught_up(), 5)
            latencies.append(time.perf_counter() - start)
        assert max(latencies) < 2, latencies
        assert follower.projections.state() == writer.projections.state()


async def test_closing_while_notifications_pour_in_does_not_hang(pg_database: str) -> None:
    """Regression: asyncio.wait_for (Python <= 3.11) could swallow the follower's
    cancellation when a notification arrived at the same moment, and close() hung."""
    async with EventStore(pg_database) as busy:
        stop = False

        async def chatter() -> None:
            while not stop:
                await busy.save_message("bob", "x")

        tasks = [asyncio.create_task(chatter()) for _ in range(4)]
        try:
            for i in range(15):
                store = EventStore(pg_database)
                await store.connect()
                await store.save_message("alice", f"m{i}")
                await asyncio.sleep(0.02)
                # asyncio.wait, not wait_for: it must not hang on the very bug it looks for.
                closing = asyncio.create_task(store.close())
                done, _ = await asyncio.wait({closing}, timeout=10)
                assert closing in done, f"close() hung (round {i})"
        finally:
            stop = True
            await asyncio.gather(*tasks)


async def test_reads_cancelled_mid_query_leave_the_store_usable(pg_database: str) -> None:
    async with EventStore(pg_database) as store:
        for i in range(20):
            await store.save_message("alice", f"m{i}")
        for delay in (0, 0.0005, 0.001, 0.002, 0.005):
            tasks = [asyncio.create_task(store.get_recent_messages(limit=20)) for _ in range(10)]
            await asyncio.sleep(delay)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert len(await store.get_recent_messages(limit=20)) == 20
        await store.save_message("alice", "after")
        assert (await store.get_recent_messages(limit=1))[0]["message"] == "after"


async def test_concurrent_appends_share_transactions_and_get_their_own_positions(
    pg_database: str,
) -> None:
    log = PostgresLog(pg_database)
    await log.open()
    try:
        batches = [
            [MessageSaved(i, "u", f"m{i}-{j}") for j in range(1 + i % 3)] for i in range(200)
        ]
        firsts = await asyncio.gather(*(log.append(batch) for batch in batches))
        spans = sorted(
            (first, first + len(batch)) for first, batch in zip(firsts, batches, strict=True)
        )
        assert spans[0][0] == 1 and all(a[1] == b[0] for a, b in pairwise(spans))
        assert log.head == spans[-1][1] - 1 == sum(len(b) for b in batches)
        for first, batch in zip(firsts, batches, strict=True):
            assert await log.fetch(range(first, first + len(batch))) == batch
        conn = await asyncpg.connect(pg_database)
        try:
            # now() is the transaction's start: one value per transaction.
            transactions = await conn.fetchval(
                "SELECT count(DISTINCT recorded_at) FROM eventstore_events"
            )
        finally:
            await conn.close()
        assert transactions <= 10, f"200 appends took {transactions} transactions"
    finally:
        await log.close()


async def test_big_batches_and_small_rounds_keep_batches_whole(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eventstore import pglog

    monkeypatch.setattr(pglog, "ROUND_EVENTS", 5)  # rounds of about 5 events
    log = PostgresLog(pg_database, insert_rows=10)  # a round of 11+ is several INSERTs
    await log.open()
    try:
        batches = [
            [MessageSaved(i, "u", f"m{i}-{j}") for j in range(i % 4 * 8 + 1)] for i in range(40)
        ]
        firsts = await asyncio.gather(*(log.append(batch) for batch in batches))
        for first, batch in zip(firsts, batches, strict=True):
            assert await log.fetch(range(first, first + len(batch))) == batch
        conn = await asyncpg.connect(pg_database)
        try:
            per_transaction = await conn.fetch(
                "SELECT count(*) AS n, min(position) AS lo, max(position) AS hi "
                "FROM eventstore_events GROUP BY recorded_at"
            )
        finally:
            await conn.close()
        # Each transaction holds consecutive positions; none is split across two.
        spans = sorted((r["lo"], r["hi"]) for r in per_transaction)
        assert all(r["hi"] - r["lo"] + 1 == r["n"] for r in per_transaction)
        for first, batch in zip(firsts, batches, strict=True):
            inside = [s for s in spans if s[0] <= first <= s[1]]
            assert inside and inside[0][1] >= first + len(batch) - 1, "a batch was split"
        assert len(spans) >= 10  # rounds were cut at about ROUND_EVENTS
    finally:
        await log.close()


def test_a_round_is_cut_into_statements_by_rows_and_by_bytes() -> None:
    from eventstore.pglog import _statements

    sizes = [b"x" * n for n in (10, 10, 10, 50, 10, 200, 10, 10, 10, 10, 10)]
    # At most 4 rows and 40 bytes a statement; a row over 40 bytes goes alone.
    assert _statements(sizes, 4, 40) == [(0, 3), (3, 4), (4, 5), (5, 6), (6, 10), (10, 11)]
    assert _statements(sizes, 100, 10**9) == [(0, 11)]
    assert _statements([b"x"], 1, 1) == [(0, 1)]


async def test_long_chat_lines_are_appended_in_statements_of_bounded_size(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL takes no parameter over 1 GiB: a round of 10,000 chat lines
    of 1 MiB in one INSERT failed whole.  Rounds and statements are bounded
    by bytes too (here 64 KiB for the 64 MiB of the default)."""
    from eventstore import pglog

    monkeypatch.setattr(pglog, "ROUND_BYTES", 64 * 1024)
    log = PostgresLog(pg_database, insert_bytes=64 * 1024)
    statements: list[int] = []
    real_insert = log._insert

    async def counted(conn: Any, first: int, chunk: Any) -> None:
        statements.append(sum(len(p) for p in chunk[1]))
        await real_insert(conn, first, chunk)

    monkeypatch.setattr(log, "_insert", counted)
    rounds: list[int] = []
    real_commit = log._commit

    async def measured(round_: Any) -> int:
        rounds.append(sum(batch.size for batch in round_))
        return await real_commit(round_)

    monkeypatch.setattr(log, "_commit", measured)
    await log.open()
    try:
        line = "y" * 20_000
        batches = [
            [MessageSaved(i, "u", f"{line}{i}-{j}") for j in range(i % 5 + 1)] for i in range(30)
        ]
        firsts = await asyncio.gather(*(log.append(batch) for batch in batches))
        for first, batch in zip(firsts, batches, strict=True):
            assert await log.fetch(range(first, first + len(batch))) == batch
        assert statements, "no round was cut into statements"
        assert all(size <= 64 * 1024 for size in statements), statements
        # A round takes batches up to the bound (its first, whatever its size).
        biggest = max(sum(len(m.message) for m in b) + 100 * len(b) for b in batches)
        assert len(rounds) > 1 and all(size <= 64 * 1024 + biggest for size in rounds), rounds
        assert log.head == sum(len(b) for b in batches)
    finally:
        await log.close()


async def test_an_append_of_several_statements_whose_session_ends_says_why(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's reason, not the rollback's "cannot call
    Transaction.__aexit__()" that followed it on the dead connection."""
    log = PostgresLog(pg_database, insert_rows=1)  # three INSERTs for three events
    await log.open()
    real_insert = log._insert
    admin = await asyncpg.connect(pg_database)
    calls: list[int] = []

    async def ended_before_the_second(conn: Any, first: int, chunk: Any) -> None:
        calls.append(first)
        if len(calls) == 2:
            pid = conn.get_server_pid()
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            # Gone before the INSERT is sent: asyncpg, mid-send, may report
            # only its own state ("another operation is in progress").
            while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
        await real_insert(conn, first, chunk)

    monkeypatch.setattr(log, "_insert", ended_before_the_second)
    try:
        with pytest.raises(ConnectionError) as raised:
            await log.append([MessageSaved(i, "u", "x") for i in range(3)])
        message = str(raised.value)
        # The server's word when asyncpg kept it (it does for an answer it
        # was waiting for; a session ended between two statements it reports
        # as closed), never the rollback's.
        assert "__aexit__" not in message, message
        assert re.search(
            r"events \(if it was lost during COMMIT they may be in the log\): "
            r"(terminating connection due to administrator command|connection is closed)",
            message,
        ), message
        assert log.head == 0 and await log.append([MessageSaved(9, "u", "y")]) == 1
    finally:
        await admin.close()
        await log.close()


async def test_an_append_of_several_statements_that_stalls_does_not_stall_the_others(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round of several INSERTs holds the head row across round trips.

    A client whose loop blocks between two of them held every other
    writer's appends for as long; the server now ends its session after
    LOCK_IDLE_TIMEOUT idle in the transaction, which rolls the round back.
    """
    from eventstore import pglog

    monkeypatch.setattr(pglog, "LOCK_IDLE_TIMEOUT", 0.3)
    log = PostgresLog(pg_database, insert_rows=2)  # a round of 3+ is several INSERTs
    await log.open()
    stalled = threading.Event()
    waited: list[float] = []
    inserts = 0
    real_insert = log._insert

    async def stalling_insert(*args: Any) -> None:
        nonlocal inserts
        inserts += 1
        if inserts == 2:  # between two INSERTs, with the head row taken
            stalled.set()
            time.sleep(3)  # this process's loop is blocked
        await real_insert(*args)

    def other_writer() -> None:
        async def run() -> None:
            other = PostgresLog(pg_database)
            await other.open()
            try:
                assert stalled.wait(10)
                start = time.monotonic()
                await other.append([MessageSaved(1, "bob", "still here")])
                waited.append(time.monotonic() - start)
            finally:
                await other.close()

        asyncio.run(run())

    try:
        await log.append([MessageSaved(0, "a", "before")])
        monkeypatch.setattr(log, "_insert", stalling_insert)
        thread = threading.Thread(target=other_writer)
        thread.start()
        with pytest.raises(ConnectionError, match=r"sits idle in its transaction for over 0\.3 s"):
            await log.append([MessageSaved(2, "a", f"big {i}") for i in range(5)])
        await asyncio.to_thread(thread.join, 20)
        assert waited and waited[0] < 2, waited
        monkeypatch.setattr(log, "_insert", real_insert)
        first = await log.append([MessageSaved(3, "a", f"again {i}") for i in range(5)])
        events = [ev async for _, run in log.read_runs(1) for ev in run]
        # Nothing of the stalled round: it was rolled back.
        assert [ev.message for ev in events] == ["before", "still here"] + [
            f"again {i}" for i in range(5)
        ]
        assert first == 3
    finally:
        await log.close()


async def test_first_connects_at_once_create_the_tables_once(pg_database: str) -> None:
    logs = [PostgresLog(pg_database) for _ in range(8)]
    await asyncio.gather(*(log.open() for log in logs))
    try:
        firsts = await asyncio.gather(
            *(log.append([MessageSaved(i, "u", str(i))]) for i, log in enumerate(logs))
        )
        assert sorted(firsts) == list(range(1, 9))
    finally:
        await asyncio.gather(*(log.close() for log in logs))


# -- the log's reads ------------------------------------------------------------------------
async def test_reads_page_through_runs_and_skip_deleted_positions(pg_schema: str) -> None:
    log = PostgresLog(pg_schema, page_rows=7)
    await log.open()
    try:
        events = [MessageSaved(i, "u", f"m{i}") for i in range(1, 31)]
        assert await log.append(events) == 1
        assert await log.delete_positions([3, 4, 15, 29, 100]) == 4
        expected = [p for p in range(1, 31) if p not in (3, 4, 15, 29)]
        got: list[int] = []
        async for first, run in log.read_runs():
            assert run == events[first - 1 : first - 1 + len(run)]  # consecutive positions
            got += range(first, first + len(run))
        assert got == expected
        assert [p async for p, _ in log.read(10, 20)] == [p for p in expected if 10 <= p <= 20]
        assert await log.fetch([30, 1, 5, 1]) == [events[29], events[0], events[4], events[0]]
        with pytest.raises(QueryError, match="position 3"):
            await log.fetch([1, 3])
        with pytest.raises(QueryError, match=r"position 999 \(and 1 more\)"):
            await log.fetch([999, 1000])
        # Positions are never handed out twice, even once the newest is deleted.
        assert await log.delete_positions([30]) == 1
        assert await log.append([MessageSaved(0, "u", "next")]) == 31
    finally:
        await log.close()


async def test_rows_hold_the_tag_the_user_and_the_event_alone(pg_schema: str) -> None:
    import msgspec

    from eventstore.events import ChannelPeakRaised, Event

    async with EventStore(pg_schema) as store:
        await store.save_message("alice", "hi")
        await store.update_channel_stats(max_users=3)
        await store.save_message("nul\x00name", "kept exactly")
        assert [r["username"] for r in await store.get_recent_messages()] == [
            "nul\x00name",
            "alice",
        ]
    conn = await asyncpg.connect(pg_schema)
    try:
        rows = await conn.fetch(
            "SELECT position, tag, username, payload FROM eventstore_events ORDER BY position"
        )
    finally:
        await conn.close()
    decoder = msgspec.msgpack.Decoder(Event)
    events = [decoder.decode(row["payload"]) for row in rows]
    assert [type(e) for e in events] == [MessageSaved, ChannelPeakRaised, MessageSaved]
    assert [row["tag"] for row in rows] == [event_tag(type(e)) for e in events]
    # NUL cannot be in a PostgreSQL text value: the column is NULL, the payload exact.
    assert [row["username"] for row in rows] == ["alice", None, None]


async def test_a_damaged_row_is_named_by_its_position(pg_schema: str) -> None:
    async with EventStore(pg_schema) as store:
        for i in range(10):
            await store.save_message("alice", f"m{i}")
    conn = await asyncpg.connect(pg_schema)
    try:
        await conn.execute("UPDATE eventstore_events SET payload = '\\x94ff' WHERE position = 6")
    finally:
        await conn.close()
    with pytest.raises(IntegrityError, match="position 6"):
        await EventStore(pg_schema).connect()


async def test_pages_are_cut_by_bytes_too(pg_schema: str) -> None:
    from eventstore import pglog

    big = "x" * (pglog.PAGE_BYTES // 3)
    log = PostgresLog(pg_schema)
    await log.open()
    try:
        await log.append([MessageSaved(i, "u", big if i % 2 else "small") for i in range(9)])
        runs = [(first, len(run)) async for first, run in log.read_runs()]
        # Three big payloads pass PAGE_BYTES: a page ends after the third.
        assert runs == [(1, 6), (7, 3)]
    finally:
        await log.close()


async def test_a_compacted_page_comes_as_one_run_with_holes(pg_schema: str) -> None:
    """A page with gaps is one run with None where rows were deleted (as a
    compacted segment frame's): a list per run between the gaps made the
    garbage collector run in full every page or two."""
    async with EventStore(pg_schema) as store:
        for i in range(40):
            await store.save_user_stats(f"u{i % 3}", chat_lines=1, last_seen=i)
            await store.save_message(f"u{i % 3}", f"m{i}", timestamp=i)
        await store.compact()  # keeps the messages and each user's last update
    log = PostgresLog(pg_schema)
    await log.open()
    try:
        runs = [run async for run in log.read_runs()]
        groups = [group async for group in log.read_groups()]
        pages = [page async for page in log.read_pages()]
    finally:
        await log.close()
    assert len(groups) == 1 and len(groups[0]) == 1 and len(pages) == 1  # one page
    first, run = groups[0][0]
    held = [(p, e) for p, e in enumerate(run, first) if e is not None]
    assert held == [(p, e) for start, r in runs for p, e in enumerate(r, start)]
    assert held == list(zip(*pages[0], strict=True))
    assert run.count(None) == 80 - len(held) - (first - 1) > 30
    assert len(runs) > 30 and all(None not in r for _, r in runs)
    assert [p for p, e in held if isinstance(e, MessageSaved)] == list(range(2, 81, 2))


async def test_a_sparse_compacted_page_comes_as_runs(pg_schema: str) -> None:
    """Rows spread over more than HOLES_SPAN times their number come as runs:
    a run of holes would then be mostly None."""
    async with EventStore(pg_schema) as store:
        for i in range(200):
            await store.save_user_stats(f"u{i // 40}", chat_lines=1, last_seen=i)
        await store.compact()  # keeps each user's last update: positions 40, 80, ...
    log = PostgresLog(pg_schema)
    await log.open()
    try:
        groups = [group async for group in log.read_groups()]
    finally:
        await log.close()
    assert len(groups) == 1
    assert [(first, len(run)) for first, run in groups[0]] == [
        (p, 1) for p in (40, 80, 120, 160, 200)
    ]
    assert all(run[0] is not None for _, run in groups[0])


# -- lifecycle and errors -----------------------------------------------------------------
async def test_a_newer_schema_version_or_fingerprint_is_refused(pg_schema: str) -> None:
    async with EventStore(pg_schema) as store:
        await store.save_message("alice", "hi")
    conn = await asyncpg.connect(pg_schema)
    try:
        await conn.execute("UPDATE eventstore_schema SET version = 2")
        with pytest.raises(MigrationError, match="schema version 2; this code knows versions up"):
            await EventStore(pg_schema).connect()
        await conn.execute("UPDATE eventstore_schema SET version = 1, fingerprint = '\\x0102'")
        with pytest.raises(MigrationError, match="fingerprint 0102"):
            await EventStore(pg_schema, read_only=True).connect()
    finally:
        await conn.close()


async def test_read_only_store_follows_and_refuses_writes(pg_schema: str) -> None:
    with pytest.raises(ConnectionError, match="no event store here"):
        await EventStore(pg_schema, read_only=True).connect()
    async with EventStore(pg_schema) as writer, EventStore(pg_schema, read_only=True) as reader:
        with pytest.raises(ConnectionError, match="read-only"):
            await reader.save_message("alice", "hi")
        with pytest.raises(ConnectionError, match="read-only"):
            await reader.log.append([MessageSaved(1, "a", "b")])
        await writer.save_message("alice", "hi")
        await reader.refresh()
        assert [r["message"] for r in await reader.get_recent_messages()] == ["hi"]


async def test_lost_connections_are_replaced(pg_schema: str) -> None:
    from pgserver import with_params

    dsn = with_params(pg_schema, application_name="eventstore_victim")
    async with EventStore(dsn) as store:
        await store.save_message("alice", "before")
        conn = await asyncpg.connect(pg_schema)
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'eventstore_victim'"
            )
        finally:
            await conn.close()
        assert killed == 2  # the read (and LISTEN) connection and the writer's
        await asyncio.sleep(0.2)  # asyncpg notices the closed sockets
        await store.save_message("alice", "after")
        assert [r["message"] for r in await store.get_recent_messages()] == ["after", "before"]
        assert store.is_connected


async def test_an_unreachable_database_is_a_connection_error_without_the_password(
    pg_dsn: str,
) -> None:
    from pgserver import with_database

    dsn = with_database(pg_dsn, "no_such_database").replace("postgres@", "postgres:s3cret@")
    with pytest.raises(ConnectionError, match="cannot connect") as info:
        await EventStore(dsn).connect()
    assert "s3cret" not in str(info.value)


async def test_a_port_out_of_range_is_a_connection_error() -> None:
    # asyncpg raises OverflowError for it, which is neither ValueError nor OSError.
    with pytest.raises(ConnectionError, match="cannot connect") as info:
        await EventStore("postgresql://postgres:s3cret@127.0.0.1:99999/db").connect()
    assert "s3cret" not in str(info.value)


async def test_another_programs_table_of_the_same_name_is_refused_and_nothing_created(
    pg_schema: str,
) -> None:
    conn = await asyncpg.connect(pg_schema)
    try:
        await conn.execute("CREATE TABLE eventstore_events (x integer)")
        with pytest.raises(IntegrityError, match="but eventstore_events exists: not a store"):
            await EventStore(pg_schema).connect()
        made = await conn.fetch(
            "SELECT t FROM unnest($1::text[]) AS t WHERE to_regclass(t) IS NOT NULL",
            ["eventstore_schema", "eventstore_head", "eventstore_events"],
        )
        assert [r[0] for r in made] == ["eventstore_events"]
    finally:
        await conn.close()


async def test_stores_in_two_schemas_of_one_database_are_apart(pg_dsn: str, pg_admin: Any) -> None:
    from pgserver import with_params

    pg_admin.execute(
        pg_dsn, "CREATE SCHEMA IF NOT EXISTS bot_one; CREATE SCHEMA IF NOT EXISTS bot_two"
    )
    one, two = (
        with_params(pg_dsn, search_path="bot_one"),
        with_params(pg_dsn, search_path="bot_two"),
    )
    async with EventStore(one) as a, EventStore(two) as b:
        await a.save_message("alice", "in one")
        await b.save_message("bob", "in two")
        assert [r["message"] for r in await a.get_recent_messages()] == ["in one"]
        assert [r["message"] for r in await b.get_recent_messages()] == ["in two"]
        assert isinstance(a.log, PostgresLog) and isinstance(b.log, PostgresLog)
        assert {a.log.channel, b.log.channel} == {"eventstore.bot_one", "eventstore.bot_two"}


def test_submit_is_not_for_shared_logs() -> None:
    log = PostgresLog("postgresql://nobody@/nowhere")
    with pytest.raises(NotImplementedError, match="use append"):
        log.submit([MessageSaved(1, "a", "b")])


def test_a_postgres_url_selects_the_postgres_log_without_connecting() -> None:
    for url in ("postgresql://bot@db.example/chat", "postgres://bot@db.example/chat"):
        store = EventStore(url, durability="none")
        assert isinstance(store.log, PostgresLog)
        assert store.log.shared and store.path is None


def test_redact_dsn_hides_passwords() -> None:
    dsn = "postgresql://bot:s3cret@db:5432/chat?sslmode=require&password=other"
    redacted = redact_dsn(dsn)
    assert "s3cret" not in redacted and "other" not in redacted
    assert redacted.startswith("postgresql://bot:***@db:5432/chat?sslmode=require")
    assert redact_dsn("postgresql://bot@db/chat") == "postgresql://bot@db/chat"
    assert redacted.endswith("&password=***")
    # A local socket URL keeps its empty authority.
    assert redact_dsn("postgresql:///bot?sslmode=bogus") == "postgresql:///bot?sslmode=bogus"
    assert redact_dsn("postgres:///bot?password=x") == "postgres:///bot?password=***"


def test_eventstore_imports_without_asyncpg() -> None:
    code = (
        "import sys\n"
        "import eventstore, eventstore.pglog\n"
        "assert 'asyncpg' not in sys.modules, 'imported asyncpg'\n"
        "sys.modules['asyncpg'] = None  # as if it were not installed\n"
        "eventstore.EventStore(':memory:')\n"
        "try:\n"
        "    eventstore.EventStore('postgresql://bot@db/chat')\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "pip install 'eventstore[postgres]'" in out.stdout


def test_without_server_binaries_the_fixture_fails_rather_than_skips(tmp_path: Path) -> None:
    (tmp_path / "test_needs_pg.py").write_text(
        "import pgserver\n"
        "pgserver.find_bin_dir = lambda: None  # as on a machine without PostgreSQL\n"
        "pytest_plugins = ['pgserver']\n"
        "def test_needs_a_server(pg_dsn):\n"
        "    pass\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "EVENTSTORE_PG_DSN"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore",
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 error" in out.stdout and "skipped" not in out.stdout, out.stdout
    assert "PostgreSQL server binaries" in out.stdout and "apt-get install postgresql" in out.stdout


async def test_append_checks_totals_on_the_log_as_it_is_now(pg_database: str) -> None:
    """Another process's increments count: append() catches up before it checks."""
    a, b = EventStore(pg_database), EventStore(pg_database)
    async with a, b:
        await b.save_user_stats("ann", chat_lines=1)  # b knows ann, with 1 line
        await a.append([UserStatsSaved("ann", 1, chat_lines=MAX_INT - 10)])
        with pytest.raises(ValidationError, match="chat_lines: 'ann' has"):
            await b.append([UserStatsSaved("ann", 2, chat_lines=100)])
        await b.refresh()
        stats = await b.get_user_stats("ann")
        assert stats is not None and stats["total_chat_lines"] == MAX_INT - 9
