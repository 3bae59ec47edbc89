"""The baseline the benchmarks compare against: the contract on SQLite via aiosqlite.

This is how the bot stored its data before the event store, done carefully:
the legacy schema (:data:`eventstore.legacy.LEGACY_SCHEMA`), WAL mode, the
indexes its reads need, and, as the bot's own adapter does, one statement and
one commit per write.  It implements the same :class:`StorageAdapter`
contract with the same semantics (validation, "None means now", no-op writes
write nothing), plus ``end_session``, so that a benchmark measures storage and
not a difference in behaviour.  ``tests/test_sqlite_baseline.py`` runs the
contract suite against it.

``aiosqlite`` is a dev/bench dependency only (``pip install eventstore[dev]``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from typing import Any, Literal

import aiosqlite

from eventstore.adapter import StorageAdapter
from eventstore.clock import Clock, system_clock
from eventstore.errors import ConnectionError, ValidationError
from eventstore.legacy import LEGACY_SCHEMA
from eventstore.validation import MAX_INT, check_int, check_name, check_opt_int, check_text

__all__ = ["INDEXES", "SqliteAdapter", "Synchronous"]

Synchronous = Literal["FULL", "NORMAL"]

#: What a careful engineer adds for the reads of the contract.  Every index
#: ends, implicitly, in the rowid (= ``id``), so ``ORDER BY timestamp, id`` is
#: read straight off it.  Each one also costs every write to its table; the
#: user_stats one is touched by every chat line (``last_seen`` moves).
INDEXES = """\
CREATE INDEX IF NOT EXISTS user_stats_by_last_seen ON user_stats (last_seen DESC, username);
CREATE INDEX IF NOT EXISTS user_actions_by_time ON user_actions (timestamp);
CREATE INDEX IF NOT EXISTS user_actions_by_user ON user_actions (username, timestamp);
CREATE INDEX IF NOT EXISTS user_actions_by_type ON user_actions (action_type, timestamp);
CREATE INDEX IF NOT EXISTS user_count_history_by_time ON user_count_history (timestamp);
CREATE INDEX IF NOT EXISTS recent_chat_by_time ON recent_chat (timestamp);
INSERT OR IGNORE INTO channel_stats (id) VALUES (1);
"""

# A user is inserted with the defaults, or updated only where something
# changes; the WHERE of DO UPDATE makes a write that changes nothing write
# nothing, in the same single statement.  It also refuses an increment that
# would take a total past MAX_INT: SQLite would turn that sum into a REAL
# (9.223372036854776e+18), where the event store raises ValidationError.
# "add <= MAX_INT - total" cannot overflow (total and add are both in
# 0..MAX_INT), and a zero increment always fits, as in the store.  A refused
# update changes no row, like a no-op one; save_user_stats tells them apart.
_SAVE_USER = f"""
INSERT INTO user_stats (username, first_seen, last_seen, total_chat_lines,
                        total_time_connected, current_session_start)
VALUES (:username, coalesce(:first, :now), coalesce(:last, :now), :lines, :seconds, :session)
ON CONFLICT (username) DO UPDATE SET
    first_seen = CASE WHEN :first < first_seen THEN :first ELSE first_seen END,
    last_seen = CASE WHEN :last > last_seen THEN :last ELSE last_seen END,
    total_chat_lines = total_chat_lines + :lines,
    total_time_connected = total_time_connected + :seconds,
    current_session_start = coalesce(:session, current_session_start)
WHERE (:first < first_seen
       OR :last > last_seen
       OR :lines != 0
       OR :seconds != 0
       OR (:session IS NOT NULL AND :session IS NOT current_session_start))
  AND :lines <= {MAX_INT} - total_chat_lines
  AND :seconds <= {MAX_INT} - total_time_connected
"""

# end_session's update, refused in the same way when the seconds do not fit.
_END_SESSION = f"""
UPDATE user_stats SET total_time_connected = total_time_connected + ?,
                      last_seen = max(last_seen, ?), current_session_start = NULL
WHERE username = ? AND ? <= {MAX_INT} - total_time_connected
"""

# SET expressions all see the row as it was, so each CASE compares against the
# old peak.  Only a strictly greater peak changes the row, and only then is
# last_updated set.
_RAISE_PEAKS = """
UPDATE channel_stats SET
    max_users = CASE WHEN :users > coalesce(max_users, 0) THEN :users ELSE max_users END,
    max_users_timestamp = CASE WHEN :users > coalesce(max_users, 0)
                               THEN :ts ELSE max_users_timestamp END,
    max_connected = CASE WHEN :connected > coalesce(max_connected, 0)
                         THEN :connected ELSE max_connected END,
    max_connected_timestamp = CASE WHEN :connected > coalesce(max_connected, 0)
                                   THEN :ts ELSE max_connected_timestamp END,
    last_updated = :ts
WHERE id = 1 AND (:users > coalesce(max_users, 0) OR :connected > coalesce(max_connected, 0))
"""

_CLEAR = """
DELETE FROM recent_chat WHERE id IN (
    SELECT id FROM recent_chat ORDER BY timestamp DESC, id DESC LIMIT -1 OFFSET ?
)
"""


class SqliteAdapter(StorageAdapter):
    """The storage contract on one SQLite file.

    ``synchronous="FULL"`` syncs the WAL on every commit (durable on power
    loss); ``"NORMAL"`` syncs it only at checkpoints (consistent, but the
    last commits can be lost).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "FULL",
        clock: Clock | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        super().__init__(logger)
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
        self.path = os.fspath(path)
        self.synchronous: Synchronous = synchronous
        self.clock: Clock = clock or system_clock
        self._db: aiosqlite.Connection | None = None
        # end_session reads the open session, then closes it; the lock keeps
        # two concurrent calls from both counting it.
        self._session_lock = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------
    async def connect(self) -> None:
        if self._db is not None:
            return
        try:
            db = await aiosqlite.connect(self.path)
        except sqlite3.Error as err:
            raise ConnectionError(f"cannot open {self.path}: {err}") from err
        try:
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute(f"PRAGMA synchronous = {self.synchronous}")
            await db.executescript(LEGACY_SCHEMA + INDEXES)
            await db.commit()
        except BaseException as err:
            await db.close()
            if isinstance(err, sqlite3.Error):
                raise ConnectionError(f"cannot set up {self.path}: {err}") from err
            raise
        self._db = db

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    @property
    def is_connected(self) -> bool:
        return self._db is not None

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise ConnectionError(f"the SQLite store {self.path} is not connected")
        return self._db

    def _now(self, timestamp: Any) -> int:
        return self.clock() if timestamp is None else check_int("timestamp", timestamp)

    async def _write(self, sql: str, params: Any) -> int:
        """One statement and its commit; returns the rows it changed."""
        db = self._conn()
        cursor = await db.execute(sql, params)
        changed = int(cursor.rowcount)
        await cursor.close()
        await db.commit()
        return changed

    async def _rows(self, sql: str, params: Any = ()) -> list[Any]:
        return list(await self._conn().execute_fetchall(sql, params))

    # -- user statistics ----------------------------------------------------------
    async def save_user_stats(
        self,
        username: str,
        first_seen: int | None = None,
        last_seen: int | None = None,
        chat_lines: int | None = None,
        time_connected: int | None = None,
        session_start: int | None = None,
    ) -> None:
        self._conn()
        lines = check_opt_int("chat_lines", chat_lines) or 0
        seconds = check_opt_int("time_connected", time_connected) or 0
        params = {
            "username": check_name("username", username),
            "first": check_opt_int("first_seen", first_seen),
            "last": check_opt_int("last_seen", last_seen),
            "lines": lines,
            "seconds": seconds,
            "session": check_opt_int("session_start", session_start),
            "now": self.clock(),
        }
        # With a positive increment the update's WHERE holds for any existing
        # row unless a total would not fit; so no row changed means refused.
        # The check costs the hot path two comparisons in SQL and this test.
        while not await self._write(_SAVE_USER, params) and (lines or seconds):
            # Nothing was written; read the row only now, to say why.  If it
            # has room after all (forgotten meanwhile), the write is retried.
            await self._refuse_overflow(username, lines, seconds)

    async def end_session(self, username: str, timestamp: int | None = None) -> int:
        """Close ``username``'s open session at ``timestamp`` (default now).

        As :meth:`EventStore.end_session`: adds ``max(0, timestamp -
        session_start)`` to ``total_time_connected``, raises ``last_seen`` to
        ``timestamp`` if later, clears the session and returns the seconds
        added; without an open session it changes nothing and returns 0.
        """
        self._conn()
        check_name("username", username)
        ts = self._now(timestamp)
        async with self._session_lock:
            rows = await self._rows(
                "SELECT current_session_start FROM user_stats WHERE username = ?", (username,)
            )
            if not rows or rows[0][0] is None:
                return 0
            seconds = max(0, ts - int(rows[0][0]))
            if not await self._write(_END_SESSION, (seconds, ts, username, seconds)):
                await self._refuse_overflow(username, 0, seconds)
                # Room after all: the user was forgotten since the read, and
                # there is no session left to end.
                return 0
            return seconds

    async def _refuse_overflow(self, username: str, lines: int, seconds: int) -> None:
        """Raise ValidationError if adding to ``username``'s totals would pass MAX_INT.

        Only called after a guarded write changed nothing, so only on a refusal
        (or a race with forget_user, where it returns).
        """
        rows = await self._rows(
            "SELECT total_chat_lines, total_time_connected FROM user_stats WHERE username = ?",
            (username,),
        )
        if not rows:
            return
        for field, total, add in (
            ("chat_lines", rows[0][0], lines),
            ("time_connected", rows[0][1], seconds),
        ):
            if add > 0 and total + add > MAX_INT:
                raise ValidationError(
                    f"{field}: {username!r} has {total}, and adding {add} would pass the "
                    f"largest total stored ({MAX_INT})"
                )

    async def forget_user(self, username: str, timestamp: int | None = None) -> bool:
        """Delete every row of ``username``; False (and nothing written) if there was none.

        As :meth:`EventStore.forget_user`, minus the compaction: in SQLite a
        DELETE is the forgetting (the bytes stay in free pages until VACUUM).
        """
        self._conn()
        check_name("username", username)
        self._now(timestamp)
        db = self._conn()
        changed = 0
        for table in ("user_stats", "user_actions", "recent_chat"):
            cursor = await db.execute(f"DELETE FROM {table} WHERE username = ?", (username,))
            changed += int(cursor.rowcount)
            await cursor.close()
        await db.commit()
        return changed > 0

    async def get_user_stats(self, username: str) -> dict[str, Any] | None:
        self._conn()
        rows = await self._rows(
            "SELECT username, first_seen, last_seen, total_chat_lines, total_time_connected, "
            "current_session_start FROM user_stats WHERE username = ?",
            (check_name("username", username),),
        )
        return _user(rows[0]) if rows else None

    async def get_all_user_stats(
        self, limit: int | None = None, offset: int = 0
    ) -> list[dict[str, Any]]:
        self._conn()
        lim = check_opt_int("limit", limit)
        rows = await self._rows(
            "SELECT username, first_seen, last_seen, total_chat_lines, total_time_connected, "
            "current_session_start FROM user_stats ORDER BY last_seen DESC, username "
            "LIMIT ? OFFSET ?",
            (-1 if lim is None else lim, check_int("offset", offset)),
        )
        return [_user(r) for r in rows]

    # -- user actions ---------------------------------------------------------------
    async def log_user_action(
        self,
        username: str,
        action_type: str,
        details: str | None = None,
        timestamp: int | None = None,
    ) -> None:
        self._conn()
        params = (
            self._now(timestamp),
            check_name("username", username),
            check_name("action_type", action_type),
            check_text("details", details, optional=True),
        )
        await self._write(
            "INSERT INTO user_actions (timestamp, username, action_type, details) "
            "VALUES (?, ?, ?, ?)",
            params,
        )

    async def get_user_actions(
        self,
        username: str | None = None,
        action_type: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        self._conn()
        where: list[str] = []
        params: list[Any] = []
        if username is not None:
            where.append("username = ?")
            params.append(check_name("username", username))
        if action_type is not None:
            where.append("action_type = ?")
            params.append(check_name("action_type", action_type))
        params += [check_int("limit", limit), check_int("offset", offset)]
        # Only the given filters go into the SQL: "? IS NULL OR ..." would
        # keep the planner from using the indexes.
        rows = await self._rows(
            "SELECT id, timestamp, username, action_type, details FROM user_actions"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY timestamp DESC, id DESC LIMIT ? OFFSET ?",
            params,
        )
        return [
            {"id": r[0], "timestamp": r[1], "username": r[2], "action_type": r[3], "details": r[4]}
            for r in rows
        ]

    # -- channel peaks ------------------------------------------------------------------
    async def update_channel_stats(
        self,
        max_users: int | None = None,
        max_connected: int | None = None,
        timestamp: int | None = None,
    ) -> None:
        self._conn()
        users = check_opt_int("max_users", max_users)
        connected = check_opt_int("max_connected", max_connected)
        ts = self._now(timestamp)
        if users is None and connected is None:
            return
        await self._write(_RAISE_PEAKS, {"users": users, "connected": connected, "ts": ts})

    async def get_channel_stats(self) -> dict[str, Any]:
        self._conn()
        rows = await self._rows(
            "SELECT max_users, max_users_timestamp, max_connected, max_connected_timestamp, "
            "last_updated FROM channel_stats WHERE id = 1"
        )
        users, users_ts, connected, connected_ts, updated = (
            rows[0] if rows else (0, None, 0, None, None)
        )
        return {
            "max_users": users or 0,
            "max_users_timestamp": users_ts,
            "max_connected": connected or 0,
            "max_connected_timestamp": connected_ts,
            "last_updated": updated,
        }

    # -- user counts ----------------------------------------------------------------------
    async def log_user_count(
        self, chat_users: int, connected_users: int, timestamp: int | None = None
    ) -> None:
        self._conn()
        params = (
            self._now(timestamp),
            check_int("chat_users", chat_users),
            check_int("connected_users", connected_users),
        )
        await self._write(
            "INSERT INTO user_count_history (timestamp, chat_users, connected_users) "
            "VALUES (?, ?, ?)",
            params,
        )

    async def get_user_count_history(
        self,
        start_time: int | None = None,
        end_time: int | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        self._conn()
        start = check_opt_int("start_time", start_time)
        end = check_opt_int("end_time", end_time)
        lim = check_opt_int("limit", limit)
        where: list[str] = []
        params: list[Any] = []
        if start is not None:
            where.append("timestamp >= ?")
            params.append(start)
        if end is not None:
            where.append("timestamp <= ?")
            params.append(end)
        params.append(-1 if lim is None else lim)
        rows = await self._rows(
            "SELECT id, timestamp, chat_users, connected_users FROM user_count_history"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY timestamp, id LIMIT ?",
            params,
        )
        return [
            {"id": r[0], "timestamp": r[1], "chat_users": r[2], "connected_users": r[3]}
            for r in rows
        ]

    # -- recent chat ------------------------------------------------------------------------
    async def save_message(self, username: str, message: str, timestamp: int | None = None) -> None:
        self._conn()
        params = (
            self._now(timestamp),
            check_name("username", username),
            check_text("message", message),
        )
        await self._write(
            "INSERT INTO recent_chat (timestamp, username, message) VALUES (?, ?, ?)", params
        )

    async def get_recent_messages(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        self._conn()
        rows = await self._rows(
            "SELECT id, timestamp, username, message FROM recent_chat "
            "ORDER BY timestamp DESC, id DESC LIMIT ? OFFSET ?",
            (check_int("limit", limit), check_int("offset", offset)),
        )
        return [{"id": r[0], "timestamp": r[1], "username": r[2], "message": r[3]} for r in rows]

    async def clear_old_messages(self, keep_count: int = 1000) -> int:
        self._conn()
        keep = check_int("keep_count", keep_count)
        # One statement: a DELETE of nothing writes nothing, and two
        # concurrent clears cannot delete a message twice.
        return await self._write(_CLEAR, (keep,))


def _user(row: Any) -> dict[str, Any]:
    return {
        "username": row[0],
        "first_seen": row[1],
        "last_seen": row[2],
        "total_chat_lines": row[3],
        "total_time_connected": row[4],
        "current_session_start": row[5],
    }
