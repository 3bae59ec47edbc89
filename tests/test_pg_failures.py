"""The PostgreSQL log when things go wrong: cancellations, lost connections,
stale views, odd URLs.  Each test is a reproduction of a bug found in review;
the server comes from pgserver.py, as for test_pglog.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest
from typer.testing import CliRunner

from cli.main import app
from eventstore import ConnectionError, EventStore, QueryError, StorageError, ValidationError
from eventstore.events import MessageSaved
from eventstore.pglog import DEAD_PEER_SECONDS, PostgresLog, _is_ambiguous, is_dsn, redact_dsn
from eventstore.replay import replay

# (Import from pgserver inside functions: see test_pglog.py.)
pytest_plugins = ["pgserver"]


async def _backends(dsn: str, app: str, *, expect: int | None = None) -> int:
    """How many server connections ``app`` has (waiting up to 5 s for ``expect``)."""
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(100):
            n = int(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app
                )
            )
            if expect is None or n == expect:
                break
            await asyncio.sleep(0.05)  # a closed connection's backend exits soon after
        return n
    finally:
        await conn.close()


async def _hold_append_lock(dsn: str) -> asyncpg.Connection:
    """A connection in a transaction holding the head row: every append waits for it."""
    conn = await asyncpg.connect(dsn)
    await conn.execute("BEGIN")
    await conn.execute("UPDATE eventstore_head SET position = position")
    return conn


async def _wait_for_lock_wait(dsn: str, app: str) -> None:
    """Until a statement of ``app`` waits for a lock (the blocked append)."""
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(200):
            if await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = $1 AND wait_event_type = 'Lock'",
                app,
            ):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no statement of {app} waits for a lock")
    finally:
        await conn.close()


def _writer_task() -> asyncio.Task[object]:
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == "eventstore-pg-writer"]
    return task


# -- closing and cancelling ----------------------------------------------------------------
async def test_a_cancelled_close_still_closes_both_connections(pg_database: str) -> None:
    """Regression: close() cancelled while the writer committed left the read
    and the writer connections open, and a second close() returned at once."""
    from pgserver import with_params

    dsn = with_params(pg_database, application_name="eventstore_closing")
    log = PostgresLog(dsn)
    await log.open()
    assert await log.append([MessageSaved(1, "alice", "hi")]) == 1
    blocker = await _hold_append_lock(pg_database)
    try:
        blocked = asyncio.create_task(log.append([MessageSaved(2, "bob", "blocked")]))
        await _wait_for_lock_wait(pg_database, "eventstore_closing")
        # close() waits for the writer, which waits for the lock: time out.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(log.close(), 0.3)
    finally:
        await blocker.execute("ROLLBACK")
        await blocker.close()
    await log.close()  # waits for the same work to finish
    assert blocked.done() and blocked.result() == 2  # queued before close(): committed
    assert await _backends(pg_database, "eventstore_closing", expect=0) == 0
    await log.close()  # and once more: harmless
    # The log opens again after all that.
    await log.open()
    try:
        assert [e async for _, e in log.read()] == [
            MessageSaved(1, "alice", "hi"),
            MessageSaved(2, "bob", "blocked"),
        ]
    finally:
        await log.close()


async def test_a_second_store_close_waits_for_a_cancelled_one(pg_database: str) -> None:
    """The store's close() after a cancelled one returns once the log is closed."""
    from pgserver import with_params

    dsn = with_params(pg_database, application_name="eventstore_closing_store")
    store = EventStore(dsn)
    await store.connect()
    await store.save_message("alice", "hi")
    blocker = await _hold_append_lock(pg_database)
    try:
        blocked = asyncio.create_task(store.save_message("bob", "blocked"))
        await _wait_for_lock_wait(pg_database, "eventstore_closing_store")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(store.close(), 0.3)
        assert not store.is_connected
        second = asyncio.create_task(store.close())
        await asyncio.sleep(0.2)
        assert not second.done()  # waits for the same work, which waits for the writer
    finally:
        await blocker.execute("ROLLBACK")
        await blocker.close()
    await second
    assert blocked.done()  # the log's close() let the writer commit it first
    assert await _backends(pg_database, "eventstore_closing_store", expect=0) == 0
    await store.close()


async def test_a_writer_cancelled_from_outside_fails_appends_and_close_still_closes(
    pg_database: str,
) -> None:
    """Regression: with the writer task cancelled (a shutdown cancelling every
    task) and the log still open, appends queued for ever, and close() raised
    CancelledError and left the connections open."""
    from pgserver import with_params

    dsn = with_params(pg_database, application_name="eventstore_orphan")
    store = EventStore(dsn)
    await store.connect()
    await store.save_message("alice", "one")
    writer = _writer_task()
    # An append the writer has in hand when it is cancelled fails, not hangs.
    in_hand = asyncio.create_task(store.log.append([MessageSaved(2, "alice", "in hand")]))
    await asyncio.sleep(0)  # queued, and the writer woken
    writer.cancel()
    with pytest.raises(ConnectionError, match="writer"):
        await asyncio.wait_for(in_hand, 5)
    # From now on appends fail at once, saying why.
    with pytest.raises(ConnectionError, match="writer task is gone"):
        await asyncio.wait_for(store.save_message("alice", "two"), 5)
    # Reads go on.
    assert [r["message"] for r in await store.get_recent_messages()][-1] == "one"
    await store.close()  # does not raise the writer's CancelledError
    assert await _backends(pg_database, "eventstore_orphan", expect=0) == 0
    async with EventStore(pg_database) as again:  # connect() again: writes work
        await again.save_message("alice", "three")
        assert (await again.get_recent_messages())[0]["message"] == "three"


async def test_a_shutdown_cancelling_every_task_during_close_leaves_nothing_open(
    pg_database: str,
) -> None:
    """Regression: with the close task cancelled too (here before it even
    started), the connections stayed open and a later close() closed nothing."""
    from pgserver import with_params

    dsn = with_params(pg_database, application_name="eventstore_shutdown")
    store = EventStore(dsn)
    await store.connect()
    await store.save_message("alice", "hi")
    closer = asyncio.create_task(store.close())
    while store.log._closing is None:  # type: ignore[attr-defined]
        await asyncio.sleep(0)
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert closer in others  # with the close task and the writer
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
    assert await _backends(pg_database, "eventstore_shutdown", expect=0) == 0
    await store.close()  # returns
    async with EventStore(dsn) as again:
        assert [r["message"] for r in await again.get_recent_messages()] == ["hi"]


async def test_close_returns_in_a_caller_not_cancelled_when_the_close_task_is(
    pg_database: str,
) -> None:
    """Regression: the close task cancelled (with the writer) and its caller
    not, close() raised a bare CancelledError into the caller, and the
    connections stayed open."""
    from pgserver import with_params

    dsn = with_params(pg_database, application_name="eventstore_inner")
    log = PostgresLog(dsn)
    await log.open()
    await log.append([MessageSaved(1, "alice", "hi")])
    closer = asyncio.create_task(log.close())
    while log._closing is None:
        await asyncio.sleep(0)
    await asyncio.sleep(0)  # the close task waits for the writer now
    log._closing.cancel()
    _writer_task().cancel()
    await closer  # returns
    assert await _backends(pg_database, "eventstore_inner", expect=0) == 0
    await log.close()


def test_a_store_connects_in_a_new_loop_after_asyncio_run_cancelled_its_close(
    pg_database: str,
) -> None:
    """Regression: asyncio.run ending cancelled the close task (its caller
    cancelled first, as by Ctrl-C), leaving the connections open; connect()
    in the next loop awaited that task and raised CancelledError."""
    from pgserver import with_params

    dsn = with_params(pg_database, application_name="eventstore_rerun")
    store = EventStore(dsn)

    async def first() -> None:
        await store.connect()
        await store.save_message("alice", "one")
        main = asyncio.current_task()
        assert main is not None

        async def interrupt() -> None:
            while store.log._closing is None:  # type: ignore[attr-defined]
                await asyncio.sleep(0)
            main.cancel()

        asyncio.get_running_loop().create_task(interrupt())
        await store.close()

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(first())
    assert asyncio.run(_backends(pg_database, "eventstore_rerun", expect=0)) == 0

    async def second() -> list[str]:
        await store.connect()
        try:
            await store.save_message("alice", "two")
            return [r["message"] for r in await store.get_recent_messages()]
        finally:
            await store.close()

    assert asyncio.run(second()) == ["two", "one"]
    assert asyncio.run(_backends(pg_database, "eventstore_rerun", expect=0)) == 0


def test_a_log_left_open_by_an_ended_loop_closes_and_opens_in_a_new_one(
    pg_database: str,
) -> None:
    """Regression: close() in a new loop raised "Event loop is closed" and kept
    the old loop's writer connection, and after open() the first append
    failed on it and stopped the writer."""
    from pgserver import with_params

    dsn = with_params(pg_database, application_name="eventstore_ended")
    log = PostgresLog(dsn)

    async def first() -> None:
        await log.open()
        await log.append([MessageSaved(1, "alice", "one")])  # the writer's connection too

    asyncio.run(first())  # ends with the log open
    asyncio.run(asyncio.wait_for(log.close(), 10))
    assert log._rconn is None and log._wconn is None

    async def again() -> list[object]:
        await log.open()
        try:
            await log.append([MessageSaved(2, "alice", "two")])
            return [e async for _, e in log.read()]
        finally:
            await log.close()

    assert asyncio.run(asyncio.wait_for(again(), 10)) == [
        MessageSaved(1, "alice", "one"),
        MessageSaved(2, "alice", "two"),
    ]


# -- failed appends and catch-ups -----------------------------------------------------------
async def test_a_lost_connection_during_an_append_does_not_stop_the_store(
    pg_database: str,
) -> None:
    """A failed append applied nothing (on this log nothing is applied before
    the commit), so reads and later writes go on instead of the store stopping."""
    from pgserver import with_params

    dsn = with_params(pg_database, application_name="eventstore_lost")
    async with EventStore(dsn) as store:
        await store.save_message("alice", "one")
        blocker = await _hold_append_lock(pg_database)
        try:
            lost = asyncio.create_task(store.save_message("alice", "two"))
            await _wait_for_lock_wait(pg_database, "eventstore_lost")
            await blocker.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'eventstore_lost' AND wait_event_type = 'Lock'"
            )
            with pytest.raises(ConnectionError, match="connection lost while appending"):
                await lost
        finally:
            await blocker.execute("ROLLBACK")
            await blocker.close()
        assert store.is_connected
        assert [r["message"] for r in await store.get_recent_messages()] == ["one"]
        await store.save_message("alice", "three")  # on a new writer connection
        assert [r["message"] for r in await store.get_recent_messages()] == ["three", "one"]


@pytest.mark.parametrize("failure", ["connection", "query"])
async def test_a_write_whose_catch_up_fails_returns_and_is_not_duplicated(
    pg_database: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    """Regression: the append committed, then reading it back failed, and the
    caller got the error of a failed write; a retrying bot wrote it twice.
    A query failing for a while (a lock timeout) passes too, as it does for
    the follower: it does not stop the store."""
    error = (
        ConnectionError("connection lost (the test's)")
        if failure == "connection"
        else QueryError("query failed: canceling statement due to lock timeout (the test's)")
    )
    async with EventStore(pg_database) as store:
        assert store._follower is not None
        store._follower.cancel()  # nothing but this test reads the log
        log = store.log
        real = log.read_groups
        failures = 1

        async def flaky(
            from_position: int = 0, to_position: int | None = None
        ) -> AsyncIterator[list[tuple[int, list[object]]]]:
            nonlocal failures
            if failures:
                failures -= 1
                raise error
            async for group in real(from_position, to_position):
                yield group  # type: ignore[misc]

        monkeypatch.setattr(log, "read_groups", flaky)
        with caplog.at_level(logging.WARNING, logger="eventstore"):
            await store.save_message("alice", "hello")  # committed: returns
        assert "positions 1..1 were committed" in caplog.text
        assert store.is_connected
        assert await store.refresh() == 1
        assert [r["message"] for r in await store.get_recent_messages()] == ["hello"]
        assert len([e async for _, e in log.read()]) == 1  # written once


async def test_a_write_whose_read_back_hits_an_undecodable_row_raises_and_stops(
    pg_database: str,
) -> None:
    """Regression: a row this code cannot decode (damage, or newer code)
    failed the read back, and the write returned normally as if from a
    passing loss while the store could never catch up again."""
    async with EventStore(pg_database) as store:
        assert store._follower is not None
        store._follower.cancel()  # the write, not the follower, meets the row
        await store.save_message("alice", "one")
        conn = await asyncpg.connect(pg_database)
        try:
            await conn.execute(
                "WITH h AS (UPDATE eventstore_head SET position = position + 1 RETURNING position) "
                "INSERT INTO eventstore_events (position, tag, payload) "
                "SELECT position, 1, '\\xdeadbeef'::bytea FROM h"
            )
        finally:
            await conn.close()
        with pytest.raises(StorageError) as info:
            await store.save_message("alice", "two")
        assert not isinstance(info.value, ConnectionError)
        message = str(info.value)
        assert "committed at positions 3..3" in message and "position 2" in message
        assert "do not retry" in message
        assert not store.is_connected  # stopped, saying why
        with pytest.raises(ConnectionError, match="stopped"):
            await store.save_message("alice", "three")
    conn = await asyncpg.connect(pg_database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM eventstore_events") == 3  # written once
    finally:
        await conn.close()


# -- deciding on a shared log -----------------------------------------------------------------
async def test_forget_user_decides_on_the_log_not_on_a_stale_view(pg_database: str) -> None:
    """Regression: forget_user asked knows_user() of what this process had
    read, and returned False for a user another process had just written."""
    p, q = EventStore(pg_database), EventStore(pg_database)
    async with p, q:
        assert p._follower is not None
        p._follower.cancel()  # P is busy elsewhere: it has not looked since connect()
        await q.save_message("alice", "written by Q")
        await q.save_message("bob", "stays")
        assert not p.knows_user("alice")  # P's view is stale
        assert await p.forget_user("alice") is True
        assert not p.knows_user("alice")
        assert [r["username"] for r in await p.get_recent_messages()] == ["bob"]
        await q.refresh()
        assert [r["username"] for r in await q.get_recent_messages()] == ["bob"]


# -- URLs ------------------------------------------------------------------------------------
def test_the_url_scheme_is_matched_in_any_case() -> None:
    for url in ("PostgreSQL://bot@db/chat", "POSTGRES://bot@db/chat", "Postgresql://x"):
        assert is_dsn(url)
        store = EventStore(url)
        assert isinstance(store.log, PostgresLog) and store.path is None
    assert not is_dsn("postgresql:/bot") and not is_dsn("data/postgresql://")


@pytest.mark.parametrize(
    "url",
    [
        "postgress://bot:s3cret@db.example/bot",  # misspelt
        "postgresql+asyncpg://bot:s3cret@db/bot",  # SQLAlchemy's spelling
        "sqlite:///bot.db",
        "mysql://bot:s3cret@db/bot",
    ],
)
def test_a_url_of_another_scheme_is_refused_not_taken_for_a_directory(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Taken as a path, a writer would make a store under ./postgress:/...,
    # with the password in a directory name, and the bot would "work".
    monkeypatch.chdir(tmp_path)
    scheme = url.partition("://")[0]
    for make in (lambda: EventStore(url), lambda: asyncio.run(replay(url))):
        with pytest.raises(ValidationError, match=rf"{re.escape(scheme)}:// is not a store's URL"):
            make()
    result = CliRunner().invoke(app, ["demo", url])
    assert result.exit_code == 2
    assert f"{scheme}:// is not a store's URL" in result.output
    assert "s3cret" not in result.output
    assert not list(tmp_path.iterdir())


async def test_a_store_opens_with_an_upper_case_scheme(
    pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where a directory named after the URL would go
    scheme, rest = pg_database.split("://", 1)
    async with EventStore(f"{scheme.upper()}://{rest}") as store:
        await store.save_message("alice", "hi")
    assert not list(tmp_path.iterdir())
    conn = await asyncpg.connect(pg_database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM eventstore_events") == 1
    finally:
        await conn.close()


def test_redact_dsn_hides_passwords_however_the_url_is_spelled() -> None:
    cases = {
        # Unescaped '#', '?', '/', '@' and ':' in the password.
        "postgresql://bot:p#ss/w?rd@db/chat": "postgresql://bot:***@db/chat",
        "postgresql://bot:se:cr/et@db:5432/chat?sslmode=require": (
            "postgresql://bot:***@db:5432/chat?sslmode=require"
        ),
        "postgresql://bot:a@b@db/chat": "postgresql://bot:***@db/chat",
        "postgres://bot:abc?def@db/chat#x": "postgres://bot:***@db/chat#x",
        # The client key's password, and parameters in any case or escaped.
        "postgresql://bot@db/chat?sslpassword=topsecret&sslmode=require": (
            "postgresql://bot@db/chat?sslpassword=***&sslmode=require"
        ),
        "postgresql://bot@db/chat?PASSWORD=topsecret": "postgresql://bot@db/chat?PASSWORD=***",
        "postgresql://bot@db/chat?pass%77ord=topsecret": (
            "postgresql://bot@db/chat?pass%77ord=***"
        ),
        # Others are kept as written.
        "postgresql://bot@db/chat?application_name=a%20b": (
            "postgresql://bot@db/chat?application_name=a%20b"
        ),
    }
    for dsn, shown in cases.items():
        assert redact_dsn(dsn) == shown, dsn
    # An '@' in a query password goes with the value.
    shown = redact_dsn("postgresql://bot@db/chat?password=top@secret&sslmode=require")
    assert shown == "postgresql://bot@db/chat?password=***&sslmode=require"


def test_redact_dsn_tells_the_userinfo_from_an_at_sign_in_the_query() -> None:
    """Regression: the userinfo ended at the last '@' wherever it was, so a
    password parameter before an '@' in the query was shown, and
    ``?user=a@b`` was taken for a password."""
    cases = {
        "postgresql://bot:s3cr#et@db.example/bot": "postgresql://bot:***@db.example/bot",
        "postgresql://127.0.0.1:1/bot?user=bot@srv&password=s3cret&sslmode=disable": (
            "postgresql://127.0.0.1:1/bot?user=bot@srv&password=***&sslmode=disable"
        ),
        "postgresql://h/db?password=p@ss&sslpassword=k3y": (
            "postgresql://h/db?password=***&sslpassword=***"
        ),
        "postgresql://bot@h/db?application_name=bot@web1&sslpassword=k3y": (
            "postgresql://bot@h/db?application_name=bot@web1&sslpassword=***"
        ),
        "postgresql:///db?host=/tmp": "postgresql:///db?host=/tmp",
        "postgresql://host/db?user=a@b": "postgresql://host/db?user=a@b",
        "postgresql://[::1]:5432,h2:5433/db?user=a@b": "postgresql://[::1]:5432,h2:5433/db?user=a@b",
        # A '=' in the password, so no '@' before the first '=': hide more, not less.
        "postgresql://bot:a=b@host/db": "postgresql://bot:***@host/db",
        "postgresql://bot:a?b=c@host/db": "postgresql://bot:***@host/db",
        "postgresql://bot:12/b=c@host/db": "postgresql://bot:***@host/db",
    }
    for dsn, shown in cases.items():
        assert redact_dsn(dsn) == shown, dsn


async def test_a_url_asyncpg_cannot_read_shows_no_piece_of_the_password(pg_dsn: str) -> None:
    """Regression: asyncpg's ValueError, copied into the message, quoted the
    piece of an unescaped password it had taken for the port."""
    dsn = pg_dsn.replace("postgres@", "postgres:se:cr/et@", 1)
    assert dsn != pg_dsn
    with pytest.raises(ConnectionError, match="cannot connect") as info:
        await EventStore(dsn).connect()
    shown = "".join(traceback.format_exception(info.value))  # the causes too
    for piece in ("se:cr", "cr/et"):
        assert piece not in shown, piece
    assert "postgres:***@" in str(info.value)
    assert "(ValueError; its message is hidden because the URL is ambiguous" in str(info.value)


async def test_the_drivers_message_is_shown_as_it_is_for_a_url_read_one_way(
    pg_dsn: str,
) -> None:
    """Regression: every candidate password was replaced by '***' in the
    driver's message (a password 'bot' made 'role "***"' of 'role "bot"',
    which showed it; '1' starred every digit), and any ValueError was hidden
    when the URL held a password, with advice that did not apply."""
    from pgserver import with_params

    async def error(dsn: str) -> str:
        with pytest.raises(ConnectionError, match="cannot connect") as info:
            await EventStore(dsn).connect()
        return str(info.value)

    # The server's message (the password is not the problem: the role is).
    shown = await error(pg_dsn.replace("postgres@", "bot:bot@", 1))
    assert 'role "bot" does not exist' in shown and "bot:***@" in shown
    # The socket's.
    shown = await error("postgresql://bot:1@127.0.0.1:1/bot")
    assert "127.0.0.1', 1)" in shown and "bot:***@127.0.0.1:1/" in shown
    # asyncpg's own about the URL, which a password does not hide any more.
    with_password = pg_dsn.replace("postgres@", "postgres:s3cret@", 1)
    shown = await error(with_params(with_password, sslmode="verify-fulll"))
    assert "`sslmode` parameter must be one of" in shown and "s3cret" not in shown


def test_appends_queued_in_a_loop_that_ended_are_not_committed_by_the_next(
    pg_database: str,
) -> None:
    """Regression: a loop stopped (not asyncio.run) with appends queued and a
    close() pending; the next loop's writer committed those appends for
    callers that were gone, then failed on their closed loop's futures, and
    its own append never returned."""
    import asyncpg

    log = PostgresLog(pg_database)
    first = asyncio.new_event_loop()
    left: list[asyncio.Future[object]] = []  # tasks the first loop never finishes

    async def stop_mid_write() -> None:
        await log.open()
        blocker = await asyncpg.connect(pg_database)
        await blocker.execute("BEGIN")
        await blocker.execute("UPDATE eventstore_head SET position = position")
        # The writer's round blocks on the head row; two more queue behind it.
        old, queued = [MessageSaved(1, "a", "old")], [MessageSaved(1, "a", "queued")]
        left.extend(asyncio.ensure_future(log.append(old)) for _ in "ab")
        await asyncio.sleep(0.3)
        left.extend(asyncio.ensure_future(log.append(queued)) for _ in "ab")
        await asyncio.sleep(0.05)
        left.append(asyncio.ensure_future(log.close()))
        await asyncio.sleep(0.05)

    first.run_until_complete(stop_mid_write())
    first.close()  # its tasks never finish

    async def next_loop() -> list[str]:
        admin = await asyncpg.connect(pg_database)
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await admin.close()
        await log.open()
        try:
            await asyncio.wait_for(log.append([MessageSaved(2, "b", "new")]), 10)
            return [ev.message async for _, ev in log.read()]  # type: ignore[union-attr]
        finally:
            await log.close()

    messages = asyncio.run(next_loop())
    # The round the server had (old) may commit: its statement was sent.
    # What was only queued in the ended loop is not sent by the next one.
    assert "new" in messages and "queued" not in messages, messages


@pytest.mark.parametrize(
    ("url", "ambiguous"),
    [
        ("postgresql://bot@h/db?sslrootcert=/x#y", False),  # a '#' but no password
        ("postgresql:///db?host=/tmp", False),
        ("postgresql://bot:p%40ss@h/db", False),
        ("postgresql://h/db?password=se&x=1", False),
        ("postgresql://bot:pw@h/db#x", True),
        ("postgresql://h/db?password=se&cr3t", True),  # '&' inside the password
        ("postgresql://bot:se:cr/et@db/bot", True),
    ],
)
def test_only_urls_read_two_ways_hide_the_drivers_message(url: str, ambiguous: bool) -> None:
    assert _is_ambiguous(url) is ambiguous


# -- a server that stops answering -------------------------------------------------------------
async def _tcp_proxy(dsn: str) -> tuple[asyncio.Server, str]:
    """A TCP port on 127.0.0.1 that forwards to the server of ``dsn``; the DSN through it.

    The test server listens on a Unix socket alone, where there is no
    network to lose; a client's TCP options need a TCP connection.
    """
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    host = query.pop("host", parts.hostname or "127.0.0.1")
    port = int(query.pop("port", parts.port or 5432))

    async def upstream() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await upstream()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    bound = server.sockets[0].getsockname()[1]
    netloc = f"{parts.username or 'postgres'}@127.0.0.1:{bound}"
    return server, urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))


async def test_connections_give_up_a_server_that_stops_answering(pg_database: str) -> None:
    """Both connections are set to fail after DEAD_PEER_SECONDS without an answer.

    Without it, a server host that vanished (no FIN, no RST) left a query
    waiting for ever, and every later append of the process and close()
    behind it.  What this checks is the kernel's settings on the sockets;
    a run by hand with a firewall dropping every packet to and from the
    server (iptables) showed what they do: the append failed with
    ConnectionError after 30.5 s, and the next one, once the packets passed
    again, succeeded (before: still waiting after 120 s, and the next append
    too).
    """
    server, dsn = await _tcp_proxy(pg_database)
    try:
        async with EventStore(dsn) as store:
            await store.save_message("alice", "hi")  # opens the writer's connection
            log = store.log
            assert isinstance(log, PostgresLog)
            for conn in (log._rconn, log._wconn):
                sock = conn._transport.get_extra_info("socket")
                assert sock.family == socket.AF_INET
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                tcp = socket.IPPROTO_TCP
                assert sock.getsockopt(tcp, socket.TCP_KEEPIDLE) == DEAD_PEER_SECONDS // 2
                assert sock.getsockopt(tcp, socket.TCP_KEEPINTVL) == DEAD_PEER_SECONDS // 6
                assert sock.getsockopt(tcp, socket.TCP_KEEPCNT) == 3
                assert sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT) == DEAD_PEER_SECONDS * 1000
            assert [m["message"] for m in await store.get_recent_messages()] == ["hi"]
    finally:
        server.close()
        await server.wait_closed()
