"""The legacy SQLite database: import, export and their round trip."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from eventstore import EventStore, QueryError, StorageError, ValidationError
from eventstore.events import (
    ChannelStatsSet,
    MessageSaved,
    UserActionLogged,
    UserCountLogged,
    UserStatsSet,
)
from eventstore.legacy import (
    LEGACY_SCHEMA,
    LegacyReader,
    StoreNotEmptyError,
    _id_order,
    export_jsonl,
    export_sqlite,
    import_sqlite,
    read_legacy,
)
from eventstore.lockfile import lock_holder

T0 = 1_760_000_000

# The tables the store does not keep, as the bot creates them.
EXTRA_TABLES = """
CREATE TABLE current_status (id INTEGER PRIMARY KEY CHECK (id = 1), chat_users INTEGER,
    connected_users INTEGER, updated INTEGER);
CREATE TABLE outbound_messages (id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp INTEGER,
    username TEXT, message TEXT, sent INTEGER DEFAULT 0);
CREATE TABLE api_tokens (token TEXT PRIMARY KEY, created INTEGER, revoked INTEGER);
INSERT INTO current_status VALUES (1, 5, 9, 1760000000);
INSERT INTO outbound_messages (timestamp, username, message) VALUES (1760000000, 'alice', 'hi');
INSERT INTO api_tokens VALUES ('secret', 1760000000, 0);
"""

# Before November 2025 the channel row had no max_connected columns.
PRE_NOVEMBER_CHANNEL = """
CREATE TABLE channel_stats (id INTEGER PRIMARY KEY CHECK (id = 1), max_users INTEGER DEFAULT 0,
    max_users_timestamp INTEGER, last_updated INTEGER);
"""

USERS = [
    ("alice", T0, T0 + 500, 42, 3600, T0 + 400),
    ("bob", T0 + 10, T0 + 900, 7, 120, None),
    ("zoë", T0 + 20, T0 + 20, 0, 0, None),
]
# Ids in legacy order.  Row 3 is back-dated (older than rows 1 and 2), and
# rows 4 and 5 share a timestamp: order must follow time, ties the legacy id.
ACTIONS = [
    (1, T0 + 100, "alice", "join", None),
    (2, T0 + 200, "bob", "join", None),
    (3, T0 + 50, "bob", "pm", "!stats"),
    (4, T0 + 300, "alice", "leave", None),
    (5, T0 + 300, "bob", "leave", "quit"),
]
COUNTS = [(1, T0, 1, 3), (2, T0 + 300, 2, 4), (3, T0 + 300, 1, 5), (4, T0 + 600, 0, 2)]
MESSAGES = [
    (1, T0 + 100, "alice", "hello"),
    (2, T0 + 100, "bob", "héllo ✓"),
    (3, T0 + 90, "alice", ""),
    (4, T0 + 400, "zoë", "bye"),
]
CHANNEL = (1, 12, T0 + 250, 20, T0 + 260, T0 + 260)


def build(
    path: Path,
    *,
    schema: str = LEGACY_SCHEMA,
    extra: str = "",
    users: list[tuple[Any, ...]] | None = None,
    actions: list[tuple[Any, ...]] | None = None,
    counts: list[tuple[Any, ...]] | None = None,
    messages: list[tuple[Any, ...]] | None = None,
    channel: tuple[Any, ...] | None = CHANNEL,
) -> Path:
    """A legacy file with the given rows, written by stdlib sqlite3 as the bot would."""
    conn = sqlite3.connect(path)
    conn.executescript(schema + extra)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def fill(table: str, rows: list[tuple[Any, ...]] | None) -> None:
        if table in tables and rows:
            marks = ", ".join("?" * len(rows[0]))
            conn.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)

    fill("user_stats", USERS if users is None else users)
    fill("user_actions", ACTIONS if actions is None else actions)
    fill("user_count_history", COUNTS if counts is None else counts)
    fill("recent_chat", MESSAGES if messages is None else messages)
    if channel is not None and "channel_stats" in tables:
        width = len(list(conn.execute("PRAGMA table_info(channel_stats)")))
        fill("channel_stats", [channel[:width]])
    conn.commit()
    conn.close()
    return path


def legacy_rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


def no_id(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "id"} for row in rows]


async def reads(store: EventStore) -> dict[str, Any]:
    """Everything the store's reads return, ids left out."""
    users = await store.get_all_user_stats()
    out: dict[str, Any] = {
        "users": users,
        "channel": await store.get_channel_stats(),
        "actions": no_id(await store.get_user_actions(limit=1_000_000)),
        "counts": no_id(await store.get_user_count_history()),
        "messages": no_id(await store.get_recent_messages(limit=1_000_000)),
    }
    for user in users:
        name = user["username"]
        out[f"actions of {name}"] = no_id(await store.get_user_actions(name, limit=1_000_000))
    for kind in ("join", "leave", "pm"):
        out[f"{kind} actions"] = no_id(await store.get_user_actions(None, kind, limit=1_000_000))
    return out


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def legacy_db(tmp_path: Path) -> Path:
    return build(tmp_path / "bot.db", extra=EXTRA_TABLES)


# -- reading ---------------------------------------------------------------------------


def test_read_legacy_orders_stats_first_then_history_by_time(legacy_db: Path) -> None:
    data = read_legacy(legacy_db)
    kinds = [type(e) for e in data.events]
    assert kinds[:4] == [UserStatsSet] * 3 + [ChannelStatsSet]
    history = data.events[4:]
    # Merged by (timestamp, legacy id); each table keeps its legacy id order,
    # even where a back-dated row (action 3, message 3) breaks time order.
    assert [(type(e).__name__[:4], e.timestamp - T0) for e in history] == [  # type: ignore[union-attr]
        ("User", 0),  # count 1
        ("User", 100),  # action 1
        ("Mess", 100),  # message 1
        ("Mess", 100),  # message 2
        ("Mess", 90),  # message 3
        ("User", 200),  # action 2
        ("User", 50),  # action 3
        ("User", 300),  # count 2
        ("User", 300),  # count 3
        ("User", 300),  # action 4
        ("User", 300),  # action 5
        ("Mess", 400),  # message 4
        ("User", 600),  # count 4
    ]
    actions = [e for e in history if isinstance(e, UserActionLogged)]
    assert [(a.timestamp - T0, a.username, a.action_type, a.details) for a in actions] == [
        (t - T0, user, kind, details) for _, t, user, kind, details in ACTIONS
    ]
    messages = [e for e in history if isinstance(e, MessageSaved)]
    assert [m.message for m in messages] == [m[3] for m in MESSAGES]
    counts = [e for e in history if isinstance(e, UserCountLogged)]
    assert [(c.chat_users, c.connected_users) for c in counts] == [c[2:] for c in COUNTS]
    assert data.report.rows == {
        "user_stats": 3,
        "channel_stats": 1,
        "user_actions": 5,
        "user_count_history": 4,
        "recent_chat": 4,
    }
    assert data.report.events == len(data.events) == 3 + 1 + 5 + 4 + 4


def test_a_table_whose_timestamps_go_backwards_keeps_its_id_order(tmp_path: Path) -> None:
    # Merging by timestamp must not reorder rows of one table: the store keeps
    # them in append order, so only the legacy id order reproduces legacy ties.
    actions = [(1, T0 + 10, "a", "join", None), (2, T0, "a", "pm", None)]
    path = build(tmp_path / "b.db", actions=actions, counts=[(1, T0 + 5, 1, 1)], messages=[])
    history = read_legacy(path).events[4:]
    assert [(type(e).__name__, e.timestamp) for e in history] == [  # type: ignore[union-attr]
        ("UserCountLogged", T0 + 5),
        ("UserActionLogged", T0 + 10),
        ("UserActionLogged", T0),
    ]
    assert [e.action_type for e in history if isinstance(e, UserActionLogged)] == ["join", "pm"]


@pytest.mark.parametrize("declared", ["INTEGER", "TEXT", "REAL", ""])
def test_rows_are_read_in_legacy_id_order_where_id_is_not_the_rowid(
    tmp_path: Path, declared: str
) -> None:
    schema = LEGACY_SCHEMA.replace(
        "CREATE TABLE IF NOT EXISTS recent_chat (\n    id INTEGER PRIMARY KEY AUTOINCREMENT,",
        f"CREATE TABLE IF NOT EXISTS recent_chat (\n    id {declared},",
    )
    assert schema != LEGACY_SCHEMA
    # Inserted as ids 2, 10, 1 (rowids 1, 2, 3), at the same second, and
    # ordered by their value whatever the column's type; then rows without
    # an integer id, which keep their insertion order, last.
    messages = [
        (2, T0, "a", "second"),
        (None, T0, "a", "no id"),
        ("10", T0, "a", "tenth"),
        (1, T0, "a", "first"),
        ("x", T0, "a", "text id"),
        (None, T0, "a", "no id again"),
    ]
    path = build(tmp_path / "ids.db", schema=schema, actions=[], counts=[], messages=messages)
    history = [e for e in read_legacy(path).events if isinstance(e, MessageSaved)]
    assert [e.message for e in history] == [
        "first",
        "second",
        "tenth",
        "no id",
        "text id",
        "no id again",
    ]


def test_the_bots_own_tables_are_read_in_rowid_order_without_a_sort(legacy_db: Path) -> None:
    conn = sqlite3.connect(legacy_db)
    for table in ("user_actions", "user_count_history", "recent_chat"):
        info = list(conn.execute(f"PRAGMA table_info({table})"))
        assert _id_order(info) == "rowid"
    conn.close()


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        (
            "DROP TABLE recent_chat; CREATE VIEW recent_chat AS SELECT * FROM user_actions;",
            r"recent_chat is a view, not a table",
        ),
        (
            "DROP TABLE recent_chat; CREATE TABLE recent_chat (id INTEGER PRIMARY KEY, "
            "timestamp INTEGER, username TEXT, message TEXT) WITHOUT ROWID;",
            r"table recent_chat has no row ids \(a WITHOUT ROWID table\?\)",
        ),
        (
            "ALTER TABLE recent_chat ADD COLUMN rowid TEXT;",
            r"table recent_chat has a column named like SQLite's row id",
        ),
    ],
)
def test_tables_the_import_cannot_read_by_row_id_are_named(
    tmp_path: Path, extra: str, error: str
) -> None:
    path = build(tmp_path / "odd.db", extra=extra, messages=[])
    with pytest.raises(ValidationError, match=error):
        read_legacy(path)


def test_a_hot_journal_is_named_in_the_error(tmp_path: Path) -> None:
    """A bot killed mid-transaction leaves a journal a read-only open cannot roll back."""
    path = build(tmp_path / "hot.db")
    script = f"""
import os, sqlite3
conn = sqlite3.connect({str(path)!r}, isolation_level=None)
conn.execute("PRAGMA journal_mode=DELETE")
conn.execute("BEGIN")
conn.execute("DELETE FROM recent_chat")
conn.execute("INSERT INTO user_count_history VALUES (NULL, 1, 2, 3)")
conn.execute("PRAGMA cache_size=1")
for i in range(2000):
    conn.execute("INSERT INTO recent_chat VALUES (NULL, 1, 'u', ?)", ("x" * 500,))
os._exit(0)  # no commit, no rollback: the journal stays hot
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    assert (tmp_path / "hot.db-journal").exists()
    before = path.read_bytes()
    with pytest.raises(ValidationError, match=r"hot\.db-journal is beside it"):
        read_legacy(path)
    assert path.read_bytes() == before


def test_extra_tables_are_ignored_and_reported(legacy_db: Path) -> None:
    report = read_legacy(legacy_db).report
    assert report.ignored_tables == ("api_tokens", "current_status", "outbound_messages")
    assert report.missing_tables == ()
    assert report.defaulted_columns == ()


def test_missing_file_and_non_database(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.db"):
        read_legacy(tmp_path / "nope.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all, just some text" * 100)
    with pytest.raises(ValidationError, match=r"junk\.db"):
        read_legacy(junk)


# -- importing ----------------------------------------------------------------------------


async def test_import_full_schema(legacy_db: Path) -> None:
    async with EventStore(":memory:") as store:
        report = await import_sqlite(store, legacy_db)
        assert report.events == 17
        assert report.first_position == 1
        assert store.position == 17
        assert report.ignored_tables == ("api_tokens", "current_status", "outbound_messages")

        # Statistics are the legacy values, absolute.
        for username, first, last, lines, seconds, session in USERS:
            assert await store.get_user_stats(username) == {
                "username": username,
                "first_seen": first,
                "last_seen": last,
                "total_chat_lines": lines,
                "total_time_connected": seconds,
                "current_session_start": session,
            }
        assert await store.get_channel_stats() == {
            "max_users": 12,
            "max_users_timestamp": T0 + 250,
            "max_connected": 20,
            "max_connected_timestamp": T0 + 260,
            "last_updated": T0 + 260,
        }

        # History: every read returns what the same query on the legacy file
        # returns, in the same order, ids aside.
        legacy_actions = legacy_rows(
            legacy_db,
            "SELECT timestamp, username, action_type, details FROM user_actions "
            "ORDER BY timestamp DESC, id DESC",
        )
        actions = await store.get_user_actions()
        assert [
            (a["timestamp"], a["username"], a["action_type"], a["details"]) for a in actions
        ] == legacy_actions
        legacy_bob = [r for r in legacy_actions if r[1] == "bob"]
        bob = await store.get_user_actions("bob")
        assert [(a["timestamp"], a["action_type"]) for a in bob] == [
            (r[0], r[2]) for r in legacy_bob
        ]

        counts = await store.get_user_count_history()
        assert [(c["timestamp"], c["chat_users"], c["connected_users"]) for c in counts] == (
            legacy_rows(
                legacy_db,
                "SELECT timestamp, chat_users, connected_users FROM user_count_history "
                "ORDER BY timestamp, id",
            )
        )
        messages = await store.get_recent_messages()
        assert [(m["timestamp"], m["username"], m["message"]) for m in messages] == legacy_rows(
            legacy_db,
            "SELECT timestamp, username, message FROM recent_chat ORDER BY timestamp DESC, id DESC",
        )
        # New ids: the log positions of the imported events.
        positions = [p async for p, e in store.read() if isinstance(e, MessageSaved)]
        assert sorted(m["id"] for m in messages) == positions


async def test_import_does_not_modify_the_legacy_file(legacy_db: Path) -> None:
    before = legacy_db.read_bytes()
    async with EventStore(":memory:") as store:
        await import_sqlite(store, legacy_db)
    assert legacy_db.read_bytes() == before
    assert sorted(p.name for p in legacy_db.parent.iterdir()) == ["bot.db"]


async def test_pre_november_file_defaults_max_connected(tmp_path: Path) -> None:
    schema = LEGACY_SCHEMA.replace(
        LEGACY_SCHEMA[
            LEGACY_SCHEMA.index("CREATE TABLE IF NOT EXISTS channel_stats") : LEGACY_SCHEMA.index(
                "CREATE TABLE IF NOT EXISTS user_count_history"
            )
        ],
        PRE_NOVEMBER_CHANNEL,
    )
    path = build(tmp_path / "old.db", schema=schema, channel=(1, 9, T0 + 5, T0 + 6))
    async with EventStore(":memory:") as store:
        report = await import_sqlite(store, path)
        assert report.defaulted_columns == (
            "channel_stats.max_connected",
            "channel_stats.max_connected_timestamp",
        )
        assert await store.get_channel_stats() == {
            "max_users": 9,
            "max_users_timestamp": T0 + 5,
            "max_connected": 0,
            "max_connected_timestamp": None,
            "last_updated": T0 + 6,
        }
        # The peaks go on rising from the imported values.
        await store.update_channel_stats(max_users=8, max_connected=3, timestamp=T0 + 7)
        assert (await store.get_channel_stats())["max_connected"] == 3
        assert (await store.get_channel_stats())["max_users"] == 9


async def test_missing_tables_are_empty_and_reported(tmp_path: Path) -> None:
    schema = LEGACY_SCHEMA[: LEGACY_SCHEMA.index("CREATE TABLE IF NOT EXISTS user_actions")]
    path = build(tmp_path / "stats-only.db", schema=schema)
    async with EventStore(":memory:") as store:
        report = await import_sqlite(store, path)
        assert report.missing_tables == (
            "channel_stats",
            "user_actions",
            "user_count_history",
            "recent_chat",
        )
        assert report.rows["user_stats"] == 3
        assert report.rows["user_actions"] == 0
        assert report.events == 3
        assert await store.get_channel_stats() == {
            "max_users": 0,
            "max_users_timestamp": None,
            "max_connected": 0,
            "max_connected_timestamp": None,
            "last_updated": None,
        }
        assert await store.get_user_actions() == []
        assert len(await store.get_all_user_stats()) == 3


async def test_missing_optional_columns_default_and_nulls_read_as_zero(tmp_path: Path) -> None:
    schema = """
    CREATE TABLE user_stats (username TEXT PRIMARY KEY, first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL, total_chat_lines INTEGER DEFAULT 0, nickname TEXT);
    CREATE TABLE user_actions (id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp INTEGER NOT NULL,
        username TEXT NOT NULL, action_type TEXT NOT NULL);
    """
    path = build(
        tmp_path / "v0.db",
        schema=schema,
        users=[("ann", T0, T0 + 1, None, "Annie"), ("ben", T0, T0 + 2, 5, None)],
        actions=[(1, T0, "ann", "join")],
    )
    async with EventStore(":memory:") as store:
        report = await import_sqlite(store, path)
        assert report.defaulted_columns == (
            "user_stats.total_time_connected",
            "user_stats.current_session_start",
            "user_actions.details",
        )
        assert report.ignored_columns == ("user_stats.nickname",)
        assert report.defaulted_values == {"user_stats.total_chat_lines": 1}
        ann = await store.get_user_stats("ann")
        assert ann is not None
        assert (ann["total_chat_lines"], ann["total_time_connected"]) == (0, 0)
        assert ann["current_session_start"] is None
        assert (await store.get_user_actions())[0]["details"] is None
        assert any("nickname" in line for line in report.describe())


async def test_missing_required_column_is_an_error_naming_it(tmp_path: Path) -> None:
    schema = LEGACY_SCHEMA.replace(
        "    timestamp INTEGER NOT NULL,\n    chat_users", "    chat_users"
    )
    path = build(tmp_path / "broken.db", schema=schema, counts=[])
    with pytest.raises(ValidationError, match=r"user_count_history has no column timestamp"):
        read_legacy(path)
    async with EventStore(":memory:") as store:
        with pytest.raises(ValidationError, match="timestamp"):
            await import_sqlite(store, path)
        assert store.position == 0


# Schemas without NOT NULL, so that the bad rows older bots wrote can be built.
LAX_SCHEMA = LEGACY_SCHEMA.replace(" NOT NULL", "")


@pytest.mark.parametrize(
    ("table", "row", "column", "problem"),
    [
        ("user_actions", (9, -5, "amy", "join", None), "timestamp", ">= 0"),
        ("user_actions", (9, "yesterday", "amy", "join", None), "timestamp", "must be an int"),
        ("user_actions", (9, T0, "amy", None, None), "action_type", "NULL"),
        ("user_actions", (9, T0, "", "join", None), "username", "must not be empty"),
        ("recent_chat", (9, T0 + 0.5, "amy", "hi"), "timestamp", "float"),
        ("recent_chat", (9, T0, None, "hi"), "username", "NULL"),
        ("recent_chat", (9, T0, "amy", b"hi"), "message", "bytes"),
        ("user_count_history", (9, T0, -1, 2), "chat_users", ">= 0"),
        ("user_count_history", (9, T0, 1, None), "connected_users", "NULL"),
        ("user_stats", ("amy", None, T0, 0, 0, None), "first_seen", "NULL"),
        ("user_stats", ("amy", T0, T0, -3, 0, None), "total_chat_lines", ">= 0"),
        ("user_stats", ("amy", T0, T0, 0, 0, "soon"), "current_session_start", "int"),
        ("channel_stats", (1, 5, "noon", 0, None, None), "max_users_timestamp", "int"),
    ],
)
async def test_bad_rows_are_rejected_naming_table_row_and_column(
    tmp_path: Path, table: str, row: tuple[Any, ...], column: str, problem: str
) -> None:
    path = build(tmp_path / "bad.db", schema=LAX_SCHEMA, channel=None)
    conn = sqlite3.connect(path)
    conn.execute(f"INSERT INTO {table} VALUES ({', '.join('?' * len(row))})", row)
    conn.commit()
    rowid = conn.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0]
    conn.close()
    with pytest.raises(ValidationError) as info:
        read_legacy(path)
    message = str(info.value)
    assert f"table {table}, row id {rowid}" in message
    assert column in message
    assert problem in message
    async with EventStore(":memory:") as store:
        with pytest.raises(ValidationError):
            await import_sqlite(store, path, batch_size=1)
        # The bad row is the last one read: nothing before it was appended.
        assert store.position == 0
        assert await store.get_all_user_stats() == []


async def test_text_that_is_not_utf8_is_rejected(tmp_path: Path) -> None:
    path = build(tmp_path / "latin1.db")
    conn = sqlite3.connect(path)
    # A Latin-1 byte stored as TEXT: SQLite does not check encodings.
    conn.execute(
        "INSERT INTO recent_chat VALUES (7, ?, 'amy', CAST(X'6361666509' || X'e9' AS TEXT))",
        (T0,),
    )
    conn.commit()
    conn.close()
    with pytest.raises(ValidationError, match=r"recent_chat, row id 7.*message.*UTF-8"):
        read_legacy(path)


async def test_channel_table_with_several_rows_is_rejected(tmp_path: Path) -> None:
    schema = LEGACY_SCHEMA.replace(" CHECK (id = 1)", "")
    path = build(tmp_path / "two.db", schema=schema)
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO channel_stats (id, max_users) VALUES (2, 1)")
    conn.commit()
    conn.close()
    with pytest.raises(ValidationError, match=r"channel_stats has 2 rows"):
        read_legacy(path)


async def test_non_empty_store_is_refused_unless_forced(legacy_db: Path) -> None:
    clock = Clock(T0 + 10_000)
    async with EventStore(":memory:", clock=clock) as store:
        await store.save_user_stats("alice", chat_lines=1000)
        await store.save_user_stats("dave", chat_lines=3)
        await store.save_message("dave", "already here", timestamp=T0 + 150)
        before = await reads(store)
        position = store.position

        with pytest.raises(StoreNotEmptyError, match="force") as info:
            await import_sqlite(store, legacy_db)
        assert isinstance(info.value, ValidationError)
        assert store.position == position
        assert await reads(store) == before

        report = await import_sqlite(store, legacy_db, force=True)
        assert report.first_position == position + 1
        # A user in the file gets the file's statistics; others keep theirs.
        alice = await store.get_user_stats("alice")
        assert alice is not None and alice["total_chat_lines"] == 42
        dave = await store.get_user_stats("dave")
        assert dave is not None and dave["total_chat_lines"] == 3
        # History is added to the store's, in time order.
        messages = [m["message"] for m in await store.get_recent_messages()]
        assert messages == ["bye", "already here", "héllo ✓", "hello", ""]


async def test_import_in_batches_reports_progress(legacy_db: Path) -> None:
    seen: list[int] = []
    async with EventStore(":memory:") as store:
        report = await import_sqlite(store, legacy_db, batch_size=5, progress=seen.append)
        assert seen == [5, 10, 15, 17]
        assert report.events == 17
        with pytest.raises(ValueError, match="batch_size"):
            await import_sqlite(store, legacy_db, force=True, batch_size=0)


async def test_import_needs_a_connected_store(legacy_db: Path) -> None:
    store = EventStore(":memory:")
    with pytest.raises(ConnectionError):
        await import_sqlite(store, legacy_db)


def test_reader_streams_the_same_events_twice(legacy_db: Path) -> None:
    with LegacyReader(legacy_db) as legacy:
        assert legacy.validate() == 17
        assert list(legacy.events()) == read_legacy(legacy_db).events
        assert legacy.report().rows["recent_chat"] == 4


# -- exporting ------------------------------------------------------------------------------


async def busy_store(clock: Clock) -> EventStore:
    """A store written through the adapter, with every kind of history."""
    store = EventStore(":memory:", clock=clock)
    await store.connect()
    for i, user in enumerate(["alice", "bob", "carol", "dave"]):
        await store.save_user_stats(user, last_seen=T0 + i, session_start=T0 + i)
        await store.log_user_action(user, "join", timestamp=T0 + i)
        await store.update_channel_stats(max_users=i + 1, max_connected=i + 2, timestamp=T0 + i)
    for i in range(30):
        user = ["alice", "bob", "carol", "dave"][i % 4]
        ts = T0 + 10 + i // 3  # three lines a second: equal timestamps
        await store.save_user_stats(user, chat_lines=1, last_seen=ts)
        await store.save_message(user, f"line {i} ✓", timestamp=ts)
        if i % 7 == 0:
            await store.log_user_action(user, "pm", details="!stats", timestamp=ts)
        await store.log_user_count(4, 6 + i % 2, timestamp=T0 + (i // 2) * 5)
    # Back-dated rows, a closed session, cleared chat and a forgotten user.
    await store.log_user_action("bob", "pm", details="late", timestamp=T0 - 100)
    await store.save_message("alice", "from the past", timestamp=T0 - 50)
    await store.log_user_count(1, 1, timestamp=T0 - 10)
    await store.end_session("bob", T0 + 60)
    await store.log_user_action("bob", "leave", timestamp=T0 + 60)
    await store.clear_old_messages(keep_count=20)
    await store.forget_user("carol")
    return store


async def test_export_round_trip(tmp_path: Path) -> None:
    clock = Clock(T0 + 100)
    original = await busy_store(clock)
    out = tmp_path / "export.db"
    try:
        counts = await export_sqlite(original, out)
        expected = await reads(original)
        assert counts == {
            "user_stats": 3,
            "channel_stats": 1,
            "user_actions": len(expected["actions"]),
            "user_count_history": 31,
            "recent_chat": len(expected["messages"]),
        }
        assert 0 < counts["recent_chat"] < 20  # cleared, then carol forgotten
        # The file carries the store's ids.
        ids = [r["id"] for r in await original.get_recent_messages(limit=100)]
        assert sorted(ids) == [r[0] for r in legacy_rows(out, "SELECT id FROM recent_chat")]
    finally:
        await original.close()

    async with EventStore(":memory:") as copy:
        report = await import_sqlite(copy, out)
        assert report.ignored_tables == ()
        assert report.missing_tables == ()
        assert await reads(copy) == expected

        # And once more: exporting the copy gives the same rows, ids aside.
        again = tmp_path / "again.db"
        await export_sqlite(copy, again)
    for table, columns in [
        ("user_stats", "*"),
        ("channel_stats", "*"),
        ("user_actions", "timestamp, username, action_type, details"),
        ("user_count_history", "timestamp, chat_users, connected_users"),
        ("recent_chat", "timestamp, username, message"),
    ]:
        sql = f"SELECT {columns} FROM {table} ORDER BY rowid"
        assert legacy_rows(out, sql) == legacy_rows(again, sql), table


async def test_legacy_file_round_trip(legacy_db: Path, tmp_path: Path) -> None:
    async with EventStore(":memory:") as store:
        await import_sqlite(store, legacy_db)
        out = tmp_path / "back.db"
        await export_sqlite(store, out)
    sql = "SELECT * FROM user_stats ORDER BY username"
    assert legacy_rows(out, sql) == legacy_rows(legacy_db, sql)
    assert legacy_rows(out, "SELECT * FROM channel_stats") == [CHANNEL]
    for table, columns in [
        ("user_actions", "timestamp, username, action_type, details"),
        ("user_count_history", "timestamp, chat_users, connected_users"),
        ("recent_chat", "timestamp, username, message"),
    ]:
        sql = f"SELECT {columns} FROM {table} ORDER BY timestamp, id"
        assert legacy_rows(out, sql) == legacy_rows(legacy_db, sql), table


async def test_export_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "taken.db"
    out.write_text("precious")
    async with EventStore(":memory:") as store:
        await store.save_message("amy", "hi", timestamp=T0)
        with pytest.raises(FileExistsError, match=r"taken\.db"):
            await export_sqlite(store, out)
    assert out.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.db"]


async def test_a_cancelled_export_stops_at_its_next_page_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's reads answer from memory without suspending, so a cancel
    (asyncio.run's answer to Ctrl-C, from a signal handler between two
    bytecodes) would land only after the whole file was written and named:
    the export looks for it between pages."""
    import eventstore.legacy as legacy_mod

    monkeypatch.setattr(legacy_mod, "EXPORT_PAGE_SIZE", 10)
    out = tmp_path / "out.db"
    progress: list[int] = []

    def interrupted(written: int) -> None:
        progress.append(written)
        if len(progress) == 2:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # what asyncio.run's SIGINT handler does

    store = EventStore(tmp_path / "store")

    async def export_in_the_store() -> None:
        async with store:
            for i in range(100):
                await store.save_message("amy", f"line {i}", timestamp=T0 + i)
            await export_sqlite(store, out, progress=interrupted)

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(export_in_the_store())
    # The cancel was taken once: the store's close() after it was not cancelled too.
    assert not store.is_connected
    assert lock_holder(str(tmp_path / "store")) is None
    if sys.version_info >= (3, 11):
        assert progress == [1, 11]  # user_stats are none; channel, then one page
        assert [p.name for p in tmp_path.iterdir()] == ["store"]
    else:
        # No Task.cancelling(): the cancel lands at the end (asyncio.run
        # on 3.10 raises KeyboardInterrupt at once instead).
        assert progress[-1] == 101


async def test_an_export_runs_beside_the_processs_own_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Called from the bot on its live store: no other task runs in the
    middle of the export, so none changes what it reads."""
    import eventstore.legacy as legacy_mod

    monkeypatch.setattr(legacy_mod, "EXPORT_PAGE_SIZE", 100)
    out = tmp_path / "out.db"
    async with EventStore(":memory:") as store:
        for i in range(5000):
            await store.save_message("amy", f"line {i}", timestamp=T0 + i)

        async def chat() -> None:
            for i in range(10_000):
                await store.save_message("bob", f"more {i}", timestamp=T0 + 5000 + i)
                await asyncio.sleep(0)

        writer = asyncio.create_task(chat())
        await asyncio.sleep(0)
        counts = await export_sqlite(store, out)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
    assert counts["recent_chat"] >= 5000  # 50 pages and more


async def test_export_writes_an_owner_only_file_with_the_legacy_schema(tmp_path: Path) -> None:
    out = tmp_path / "new.db"
    progress: list[int] = []
    async with EventStore(":memory:") as store:
        await store.save_message("amy", "hi", timestamp=T0)
        assert await export_sqlite(store, out, progress=progress.append) == {
            "user_stats": 0,
            "channel_stats": 1,
            "user_actions": 0,
            "user_count_history": 0,
            "recent_chat": 1,
        }
    assert progress == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.db"]
    if os.name == "posix":
        assert out.stat().st_mode & 0o777 == 0o600
    tables = {r[0] for r in legacy_rows(out, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables >= {
        "user_stats",
        "user_actions",
        "channel_stats",
        "user_count_history",
        "recent_chat",
    }
    assert legacy_rows(out, "SELECT * FROM recent_chat") == [(1, T0, "amy", "hi")]


async def test_export_to_a_full_disk_raises_storage_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite reports a full disk as its own error ("database or disk is
    full"), which is neither a StorageError nor an OSError: the CLI printed
    a traceback instead of its Error: line.  The file stays unwritten."""
    import eventstore.legacy as legacy_mod

    real_connect = sqlite3.connect

    def small_disk(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(*args, **kwargs)
        conn.execute("PRAGMA max_page_count = 4")  # SQLITE_FULL, as a full disk gives
        return conn

    out = tmp_path / "full.db"
    async with EventStore(":memory:") as store:
        for i in range(200):
            await store.save_message("amy", f"line {i} " + "x" * 100, timestamp=T0 + i)
        monkeypatch.setattr(legacy_mod.sqlite3, "connect", small_disk)
        with pytest.raises(StorageError, match=r"full\.db: cannot write the export: database or"):
            await export_sqlite(store, out)
    assert list(tmp_path.iterdir()) == []


async def test_export_fails_if_the_store_changes_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "moving.db"
    async with EventStore(":memory:") as store:
        await store.save_message("amy", "hi", timestamp=T0)
        original = store.get_recent_messages

        async def busy(limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
            await store.save_message("bob", "sneaking in", timestamp=T0 + 1)
            return await original(limit, offset)

        monkeypatch.setattr(store, "get_recent_messages", busy)
        with pytest.raises(QueryError, match="changed during the export"):
            await export_sqlite(store, out)
    assert list(tmp_path.iterdir()) == []


async def test_export_jsonl(legacy_db: Path) -> None:
    async with EventStore(":memory:", clock=Clock()) as store:
        await import_sqlite(store, legacy_db)
        await store.end_session("alice", T0 + 1000)
        binary = io.BytesIO()
        assert await export_jsonl(store, binary) == 18
        text = io.StringIO()
        assert await export_jsonl(store, text) == 18
    assert binary.getvalue().decode() == text.getvalue()
    lines = [json.loads(line) for line in text.getvalue().splitlines()]
    assert [line["position"] for line in lines] == list(range(1, 19))
    assert lines[0] == {
        "position": 1,
        "type": "user_stats_set",
        "username": "alice",
        "first_seen": T0,
        "last_seen": T0 + 500,
        "total_chat_lines": 42,
        "total_time_connected": 3600,
        "current_session_start": T0 + 400,
    }
    assert lines[3]["type"] == "channel_stats_set"
    assert lines[4] == {
        "position": 5,
        "type": "user_count_logged",
        "timestamp": T0,
        "chat_users": 1,
        "connected_users": 3,
    }
    assert lines[5] == {
        "position": 6,
        "type": "user_action_logged",
        "timestamp": T0 + 100,
        "username": "alice",
        "action_type": "join",
        "details": None,
    }
    assert lines[-1] == {
        "position": 18,
        "type": "session_ended",
        "username": "alice",
        "timestamp": T0 + 1000,
        "seconds": 600,
    }
    assert {line["type"] for line in lines} == {
        "user_stats_set",
        "channel_stats_set",
        "user_action_logged",
        "user_count_logged",
        "message_saved",
        "session_ended",
    }
    assert any(line.get("message") == "héllo ✓" for line in lines)
