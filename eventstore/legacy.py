"""The bot's legacy SQLite database: read it, import it, export back to it.

Before the event store the bot kept everything in one SQLite file with the
schema in :data:`LEGACY_SCHEMA`.  This module moves data across, with the
standard library's ``sqlite3`` only:

* :class:`LegacyReader` opens a legacy file read-only, works out which of its
  tables and columns exist, and turns its rows into events, validating every
  value on the way.  :func:`read_legacy` does the same into memory.
* :func:`import_sqlite` appends those events to an empty store.
* :func:`export_sqlite` writes what a store's reads return into a new file
  with the legacy schema; :func:`export_jsonl` writes every event as JSON.

What an import keeps and what it does not:

* Statistics become absolute values (``UserStatsSet``, ``ChannelStatsSet``).
* History rows (actions, user counts, chat) keep their timestamps and their
  order, but **not their ids**: in this store the id of a row is the log
  position of its event, handed out in append order.  Rows are appended per
  table in legacy id order, merged across tables by (timestamp, id), so ties
  in time keep their legacy order and every read returns the legacy rows in
  the legacy order.
* ``current_status``, ``outbound_messages`` and ``api_tokens`` (and any other
  table) hold state the store does not keep; they are reported, not read.

Files written by older or newer versions of the bot differ in columns (files
from before November 2025 lack ``max_connected`` and
``max_connected_timestamp``).  A missing column takes its schema default and is
reported; a missing NOT NULL column without a default makes the file
unreadable, and a missing table is read as empty and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import io
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Protocol, cast

import msgspec

from .errors import ConnectionError, QueryError, StorageError, ValidationError
from .events import (
    ChannelStatsSet,
    Event,
    MessageSaved,
    UserActionLogged,
    UserCountLogged,
    UserStatsSet,
    event_name,
)
from .store import EventStore
from .validation import MAX_TEXT_BYTES, check_int, check_name, check_text

__all__ = [
    "LEGACY_SCHEMA",
    "LEGACY_TABLES",
    "ImportReport",
    "LegacyData",
    "LegacyReader",
    "StoreNotEmptyError",
    "export_jsonl",
    "export_sqlite",
    "import_sqlite",
    "read_legacy",
]

#: The legacy bot's schema: the five tables the store's data maps to.
LEGACY_SCHEMA = """\
CREATE TABLE IF NOT EXISTS user_stats (
    username TEXT PRIMARY KEY,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    total_chat_lines INTEGER DEFAULT 0,
    total_time_connected INTEGER DEFAULT 0,
    current_session_start INTEGER
);
CREATE TABLE IF NOT EXISTS user_actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp INTEGER NOT NULL,
    username TEXT NOT NULL,
    action_type TEXT NOT NULL,
    details TEXT
);
CREATE TABLE IF NOT EXISTS channel_stats (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    max_users INTEGER DEFAULT 0,
    max_users_timestamp INTEGER,
    max_connected INTEGER DEFAULT 0,
    max_connected_timestamp INTEGER,
    last_updated INTEGER
);
CREATE TABLE IF NOT EXISTS user_count_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp INTEGER NOT NULL,
    chat_users INTEGER NOT NULL,
    connected_users INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS recent_chat (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp INTEGER NOT NULL,
    username TEXT NOT NULL,
    message TEXT NOT NULL
);
"""

#: Events appended per ``store.append`` call by :func:`import_sqlite`.
DEFAULT_BATCH_SIZE = 10_000
#: Rows read per call while exporting (bounds memory, not correctness).
EXPORT_PAGE_SIZE = 10_000


@dataclass(frozen=True)
class _Column:
    name: str
    #: SQL literal selected when the column is absent from the file.
    default_sql: str = "NULL"
    #: NOT NULL without a default: a file without it cannot be read.
    required: bool = False


#: Per legacy table, the columns read, in the order the converters expect.
LEGACY_TABLES: dict[str, tuple[_Column, ...]] = {
    "user_stats": (
        _Column("username", required=True),
        _Column("first_seen", required=True),
        _Column("last_seen", required=True),
        _Column("total_chat_lines", "0"),
        _Column("total_time_connected", "0"),
        _Column("current_session_start"),
    ),
    "channel_stats": (
        _Column("max_users", "0"),
        _Column("max_users_timestamp"),
        _Column("max_connected", "0"),
        _Column("max_connected_timestamp"),
        _Column("last_updated"),
    ),
    "user_actions": (
        _Column("timestamp", required=True),
        _Column("username", required=True),
        _Column("action_type", required=True),
        _Column("details"),
    ),
    "user_count_history": (
        _Column("timestamp", required=True),
        _Column("chat_users", required=True),
        _Column("connected_users", required=True),
    ),
    "recent_chat": (
        _Column("timestamp", required=True),
        _Column("username", required=True),
        _Column("message", required=True),
    ),
}

# History tables in merge rank order: the rank only breaks a tie of
# (timestamp, id) between two tables, so that the order is total.
_HISTORY = ("user_actions", "user_count_history", "recent_chat")


class StoreNotEmptyError(ValidationError):
    """An import into a store that already holds events was refused.

    A ValidationError (the store argument was rejected and nothing was
    written), but its own class so that a CLI can suggest ``--force``.
    """


@dataclass(frozen=True)
class ImportReport:
    """What an import read and appended (or, from :func:`read_legacy`, would append)."""

    path: str
    #: Rows read per legacy table (all five tables, 0 when missing or empty).
    rows: dict[str, int]
    #: Events appended.
    events: int = 0
    #: Position of the first event appended (None if none was).
    first_position: int | None = None
    #: Legacy tables absent from the file, read as empty.
    missing_tables: tuple[str, ...] = ()
    #: Tables present in the file but not imported (``current_status``, ...).
    ignored_tables: tuple[str, ...] = ()
    #: ``table.column`` absent from the file, given the schema's default.
    defaulted_columns: tuple[str, ...] = ()
    #: ``table.column`` present in the file but unknown to the legacy schema.
    ignored_columns: tuple[str, ...] = ()
    #: ``table.column`` -> how many NULLs in a ``DEFAULT 0`` column became 0.
    defaulted_values: dict[str, int] = field(default_factory=dict)

    def describe(self) -> list[str]:
        """One line per fact, for a CLI to print."""
        lines = [f"{table}: {n} row{'' if n == 1 else 's'}" for table, n in self.rows.items()]
        lines.append(f"events: {self.events}")
        for label, names in (
            ("missing table (read as empty)", self.missing_tables),
            ("ignored table", self.ignored_tables),
            ("missing column (defaulted)", self.defaulted_columns),
            ("unknown column (ignored)", self.ignored_columns),
        ):
            lines.extend(f"{label}: {name}" for name in names)
        lines.extend(
            f"NULL read as 0: {k} ({n} row{'' if n == 1 else 's'})"
            for k, n in self.defaulted_values.items()
        )
        return lines


@dataclass(frozen=True)
class LegacyData:
    """A legacy file read into memory: the events to import, in import order."""

    events: list[Event]
    report: ImportReport


# -- value checks ----------------------------------------------------------------
# A row's location is (path, table, row id, username or None), formatted only
# when a value is bad.  The fast path of each check is one type test and one
# comparison; only a suspect value goes through the store's own check, whose
# message is then prefixed with the location.

_Loc = tuple[str, str, Any, Any]


def _at(loc: _Loc) -> str:
    path, table, rowid, user = loc
    who = f" (username {user!r:.60})" if type(user) is str else ""
    return f"{path}: table {table}, row id {rowid}{who}"


def _null(loc: _Loc, column: str) -> NoReturn:
    raise ValidationError(f"{_at(loc)}: {column} is NULL in a NOT NULL column")


def _checked(loc: _Loc, check: Callable[[], object]) -> None:
    try:
        check()
    except ValidationError as err:
        # The store's message names the column and shows the value; prefix
        # the table and row.  Not chained: the inner error adds nothing.
        raise ValidationError(f"{_at(loc)}: {err}") from None


def _int(loc: _Loc, column: str, value: Any) -> int:
    """An int >= 0 from a NOT NULL column."""
    if type(value) is int and value >= 0:
        return value
    if value is None:
        _null(loc, column)
    _checked(loc, lambda: check_int(column, value))
    return cast(int, value)


def _opt_int(loc: _Loc, column: str, value: Any) -> int | None:
    return None if value is None else _int(loc, column, value)


def _name(loc: _Loc, column: str, value: Any) -> str:
    """A non-empty text from a NOT NULL column (username, action type)."""
    # ASCII is one byte per character, so len() is the UTF-8 size.
    if type(value) is str and value and value.isascii() and len(value) <= MAX_TEXT_BYTES:
        return value
    if value is None:
        _null(loc, column)
    _checked(loc, lambda: check_name(column, value))
    return cast(str, value)


def _text(loc: _Loc, column: str, value: Any) -> str:
    """A text (empty allowed) from a NOT NULL column."""
    if type(value) is str and value.isascii() and len(value) <= MAX_TEXT_BYTES:
        return value
    if value is None:
        _null(loc, column)
    _checked(loc, lambda: check_text(column, value))
    return cast(str, value)


def _opt_text(loc: _Loc, column: str, value: Any) -> str | None:
    return None if value is None else _text(loc, column, value)


def _decode_text(raw: bytes) -> str:
    # SQLite does not check that TEXT is UTF-8.  Decoding with surrogateescape
    # keeps a bad byte as a lone surrogate, which check_text then reports
    # with the table, row and column; the default decoder would instead abort
    # the whole query without saying which row was bad.
    return raw.decode("utf-8", "surrogateescape")


class LegacyReader:
    """A legacy database opened read-only, pinned to one snapshot.

    Opening inspects the schema (raising :class:`ValidationError` if a
    required column is missing); :meth:`events` then yields the events to
    import.  All reads happen in one read transaction, so two passes (first
    validate, then import) see exactly the same rows even if the bot is still
    running: in WAL mode it keeps writing beside the snapshot, in
    rollback-journal mode its writes wait until the reader is closed.

    Example::

        with LegacyReader("bot.db") as legacy:
            legacy.validate()
            for event in legacy.events():
                ...
    """

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(db_path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(errno.ENOENT, "no legacy database at this path", self.path)
        # mode=ro: an import must never change the file it reads, not even by
        # creating a journal.  as_uri() percent-encodes '?' and '#' in the path.
        uri = Path(self.path).resolve().as_uri() + "?mode=ro"
        try:
            self._conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error as err:
            raise ValidationError(f"{self.path}: cannot open as SQLite: {err}") from err
        self._conn.text_factory = _decode_text
        self.missing_tables: tuple[str, ...] = ()
        self.ignored_tables: tuple[str, ...] = ()
        self.defaulted_columns: tuple[str, ...] = ()
        self.ignored_columns: tuple[str, ...] = ()
        self._selects: dict[str, str] = {}
        self._rows: dict[str, int] = dict.fromkeys(LEGACY_TABLES, 0)
        self._nulls: dict[str, int] = {}
        try:
            self._conn.execute("BEGIN")
            self._inspect()
        except sqlite3.DatabaseError as err:
            self._conn.close()
            hint = ""
            if os.path.exists(self.path + "-journal"):
                # A read-only connection cannot roll back what a crashed
                # writer left half done, so it cannot read the file at all.
                hint = (
                    f"; {self.path}-journal is beside it: the bot stopped in the middle "
                    "of a transaction. Open the database once with sqlite3 as its owner "
                    "(or start the bot) to roll that back, then import"
                )
            raise ValidationError(
                f"{self.path}: not a readable SQLite database: {err}{hint}"
            ) from err
        except BaseException:
            self._conn.close()
            raise

    def __enter__(self) -> LegacyReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """End the read transaction and close the file.  Idempotent."""
        self._conn.close()

    def _inspect(self) -> None:
        tables: dict[str, str] = {}
        for name, kind in self._conn.execute(
            "SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view')"
        ):
            if kind == "view" and str(name).lower() in LEGACY_TABLES:
                raise ValidationError(
                    f"{self.path}: {name} is a view, not a table; the import reads the "
                    "bot's tables (copy the rows into a table of that name first)"
                )
            if kind == "table":
                tables[str(name).lower()] = str(name)
        missing: list[str] = []
        defaulted: list[str] = []
        unknown: list[str] = []
        for table, columns in LEGACY_TABLES.items():
            if table not in tables:
                missing.append(table)
                continue
            real = tables[table]
            info = list(self._conn.execute(f"PRAGMA table_info({_q(real)})"))
            present = {str(row[1]).lower() for row in info}
            exprs = ["rowid"]
            for col in columns:
                if col.name in present:
                    exprs.append(_q(col.name))
                elif col.required:
                    raise ValidationError(
                        f"{self.path}: table {table} has no column {col.name}, which is "
                        "NOT NULL without a default; the file cannot be imported"
                    )
                else:
                    exprs.append(f"{col.default_sql} AS {_q(col.name)}")
                    defaulted.append(f"{table}.{col.name}")
            known = {c.name for c in columns} | {"id"}
            unknown.extend(f"{table}.{c}" for c in sorted(present - known))
            if present & {"rowid", "oid", "_rowid_"}:
                raise ValidationError(
                    f"{self.path}: table {table} has a column named like SQLite's row id "
                    "(rowid, oid or _rowid_), which hides the row id the import reads by"
                )
            try:
                self._conn.execute(f"SELECT rowid FROM {_q(real)} LIMIT 0")
            except sqlite3.OperationalError as err:
                raise ValidationError(
                    f"{self.path}: table {table} has no row ids (a WITHOUT ROWID table?): "
                    f"{err}; the bot's tables always have them"
                ) from err
            self._selects[table] = (
                f"SELECT {', '.join(exprs)} FROM {_q(real)} ORDER BY {_id_order(info)}"
            )
        if len(missing) == len(LEGACY_TABLES):
            # An empty SQLite file, or another program's: importing it would
            # only make an empty store.
            raise ValidationError(
                f"{self.path}: none of the bot's tables ({', '.join(LEGACY_TABLES)}) "
                "is in this file; is it the bot's database?"
            )
        self.missing_tables = tuple(missing)
        self.ignored_tables = tuple(
            sorted(
                name
                for key, name in tables.items()
                if key not in LEGACY_TABLES and not key.startswith("sqlite_")
            )
        )
        self.defaulted_columns = tuple(defaulted)
        self.ignored_columns = tuple(unknown)

    def _select(self, table: str) -> Iterator[tuple[Any, ...]]:
        sql = self._selects.get(table)
        if sql is None:
            return iter(())
        return cast(Iterator[tuple[Any, ...]], self._conn.execute(sql))

    def _zero(self, loc: _Loc, column: str, value: Any) -> int:
        """A ``DEFAULT 0`` column: NULL reads as 0 (and is counted)."""
        if value is None:
            key = f"{loc[1]}.{column}"
            self._nulls[key] = self._nulls.get(key, 0) + 1
            return 0
        return _int(loc, column, value)

    # -- the events -------------------------------------------------------------
    def events(self) -> Iterator[Event]:
        """Every event to import, in import order: statistics, then history.

        Raises :class:`ValidationError` at the first bad value, naming the
        table, the row id and the column.  Row counts (:meth:`report`) are
        those of the last pass.
        """
        self._rows = dict.fromkeys(LEGACY_TABLES, 0)
        self._nulls = {}
        try:
            yield from self._user_stats()
            channel = self._channel_stats()
            if channel is not None:
                yield channel
            streams = [self._history(rank, table) for rank, table in enumerate(_HISTORY)]
            # Each stream is in legacy id order; merge only picks which
            # stream's next row comes first, so that order survives even where
            # a table's timestamps go backwards.  The keys are unique, so
            # events are never compared.
            for _ts, _rowid, _rank, event in heapq.merge(*streams):
                yield event
        except sqlite3.DatabaseError as err:
            # A damaged page, found only when a query reaches it.
            raise ValidationError(f"{self.path}: cannot read the database: {err}") from err

    def validate(self) -> int:
        """Read every row once; return the number of events it would import."""
        return sum(1 for _ in self.events())

    def report(self, events: int = 0, first_position: int | None = None) -> ImportReport:
        """The counts and schema findings of the last :meth:`events` pass."""
        return ImportReport(
            path=self.path,
            rows=dict(self._rows),
            events=events,
            first_position=first_position,
            missing_tables=self.missing_tables,
            ignored_tables=self.ignored_tables,
            defaulted_columns=self.defaulted_columns,
            ignored_columns=self.ignored_columns,
            defaulted_values=dict(sorted(self._nulls.items())),
        )

    def _user_stats(self) -> Iterator[UserStatsSet]:
        table, path = "user_stats", self.path
        for n, row in enumerate(self._select(table), 1):
            rowid, user, first, last, lines, seconds, session = row
            loc = (path, table, rowid, user)
            event = UserStatsSet(
                _name(loc, "username", user),
                _int(loc, "first_seen", first),
                _int(loc, "last_seen", last),
                self._zero(loc, "total_chat_lines", lines),
                self._zero(loc, "total_time_connected", seconds),
                _opt_int(loc, "current_session_start", session),
            )
            self._rows[table] = n
            yield event

    def _channel_stats(self) -> ChannelStatsSet | None:
        table = "channel_stats"
        rows = list(self._select(table))
        if not rows:
            return None
        if len(rows) > 1:
            ids = ", ".join(str(r[0]) for r in rows[:10])
            raise ValidationError(
                f"{self.path}: table {table} has {len(rows)} rows (row ids {ids}); "
                "the bot keeps exactly one, id 1"
            )
        rowid, users, users_ts, connected, connected_ts, updated = rows[0]
        loc = (self.path, table, rowid, None)
        event = ChannelStatsSet(
            self._zero(loc, "max_users", users),
            _opt_int(loc, "max_users_timestamp", users_ts),
            self._zero(loc, "max_connected", connected),
            _opt_int(loc, "max_connected_timestamp", connected_ts),
            _opt_int(loc, "last_updated", updated),
        )
        self._rows[table] = 1
        return event

    def _history(self, rank: int, table: str) -> Iterator[tuple[int, int, int, Event]]:
        convert = _CONVERTERS[table]
        path, rows = self.path, self._rows
        for n, row in enumerate(self._select(table), 1):
            event = convert((path, table, row[0], None), row)
            rows[table] = n
            yield event.timestamp, row[0], rank, event


def _id_order(info: list[tuple[Any, ...]]) -> str:
    """ORDER BY for legacy id order, from a table's ``PRAGMA table_info`` rows.

    Where ``id`` is the INTEGER PRIMARY KEY (the bot's schema) it is the
    rowid, and rowid order costs no sort.  Otherwise rows go by the integer
    value of their id (stored as an integer, or as text or a real that holds
    one); rows without one (NULL, other text) follow in insertion (rowid)
    order, where SQLite itself would sort NULLs first and text after numbers.
    """
    ids = [row for row in info if str(row[1]).lower() == "id"]
    keys = [row for row in info if row[5]]
    if not ids or (keys == ids and str(ids[0][2]).upper() == "INTEGER"):
        return "rowid"
    key = (
        "CASE WHEN typeof(id) = 'integer' THEN id "
        "WHEN typeof(id) IN ('real', 'text') AND CAST(id AS INTEGER) = id "
        "THEN CAST(id AS INTEGER) END"
    )
    return f"{key} IS NULL, {key}, rowid"


def _action(loc: _Loc, row: tuple[Any, ...]) -> UserActionLogged:
    _, ts, user, kind, details = row
    return UserActionLogged(
        _int(loc, "timestamp", ts),
        _name(loc, "username", user),
        _name(loc, "action_type", kind),
        _opt_text(loc, "details", details),
    )


def _count(loc: _Loc, row: tuple[Any, ...]) -> UserCountLogged:
    _, ts, chat, connected = row
    return UserCountLogged(
        _int(loc, "timestamp", ts),
        _int(loc, "chat_users", chat),
        _int(loc, "connected_users", connected),
    )


def _message(loc: _Loc, row: tuple[Any, ...]) -> MessageSaved:
    _, ts, user, text = row
    return MessageSaved(
        _int(loc, "timestamp", ts),
        _name(loc, "username", user),
        _text(loc, "message", text),
    )


_CONVERTERS: dict[
    str, Callable[[_Loc, tuple[Any, ...]], UserActionLogged | UserCountLogged | MessageSaved]
] = {
    "user_actions": _action,
    "user_count_history": _count,
    "recent_chat": _message,
}


def _q(identifier: str) -> str:
    """Quote an SQL identifier."""
    return '"' + identifier.replace('"', '""') + '"'


def read_legacy(db_path: str | os.PathLike[str]) -> LegacyData:
    """Read and validate a whole legacy file into memory.

    Convenient for small files and tests; :func:`import_sqlite` streams
    instead.  Raises :class:`ValidationError` naming table, row id and column
    of the first bad value, or the table and column a file cannot do without.
    """
    with LegacyReader(db_path) as legacy:
        events = list(legacy.events())
        return LegacyData(events, legacy.report(len(events)))


async def import_sqlite(
    store: EventStore,
    db_path: str | os.PathLike[str],
    *,
    force: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import a legacy database into a connected store.

    Appends, through ``store.append`` in batches of ``batch_size``, one
    ``UserStatsSet`` per user (absolute values), a ``ChannelStatsSet`` if the
    file has the row, then every action, user count and chat line with its
    original timestamp.  **Legacy ids are not kept**: the id of a history row
    in this store is its log position, so imported rows get new ids in
    import order.  Their order is kept: each table's rows are appended in
    legacy id order, merged across tables by (timestamp, legacy id), so every
    read returns them in the order the legacy database did.

    The whole file is validated before the first event is appended: a bad
    value raises :class:`ValidationError` naming table, row id and column,
    and the store is left unchanged.  (A failure of the store itself in the
    middle, such as a full disk, can still leave the batches before it.)

    A store that already holds events (``store.position > 0``) is refused
    with :class:`StoreNotEmptyError` unless ``force``: imported statistics
    are absolute and would overwrite what the store counted, and imported
    history would interleave with its own.  With ``force`` exactly that
    happens: a user in the file gets the file's statistics, users only in
    the store keep theirs, the file's channel row replaces the peaks, and
    history rows are added to the store's.

    ``progress`` is called after each batch with the number of events
    appended so far.  The file is read synchronously in the calling thread:
    an import is an offline job, not something to run beside a live bot.
    """
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not store.is_connected:
        raise ConnectionError("the store is not connected; connect() it before importing")
    if store.read_only:
        raise ConnectionError("the store is read-only; open it without read_only to import")
    if store.position > 0 and not force:
        raise StoreNotEmptyError(
            f"the store is not empty (its last event is at position {store.position}); "
            "an import would overwrite its statistics and mix its history with the "
            "file's. Import into a new store, or pass force=True to do it anyway"
        )
    with LegacyReader(db_path) as legacy:
        # Pass one reads and checks everything, so that a bad row at the end
        # of the file leaves the store untouched.  Holding every event in
        # memory instead would save this pass but cost ~200 bytes per row,
        # hundreds of megabytes for a bot that ran for years; the pass costs
        # under two seconds per million rows.
        legacy.validate()
        appended = 0
        first: int | None = None
        batch: list[Event] = []
        for event in legacy.events():
            batch.append(event)
            if len(batch) >= batch_size:
                position = await store.append(batch)
                first = position if first is None else first
                appended += len(batch)
                batch = []
                if progress is not None:
                    progress(appended)
        if batch:
            position = await store.append(batch)
            first = position if first is None else first
            appended += len(batch)
            if progress is not None:
                progress(appended)
        return legacy.report(appended, first)


# -- export ------------------------------------------------------------------------


async def export_sqlite(
    store: EventStore,
    out_path: str | os.PathLike[str],
    *,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Write what the store's reads return into a new legacy database.

    The file gets the five tables of :data:`LEGACY_SCHEMA`: every user's
    statistics, the channel row, and every action, user count and message the
    store still returns (cleared messages, forgotten users and trimmed counts
    are not written), with the store's ids.  Returns rows written per table.

    Refuses, with :class:`FileExistsError` naming it, to overwrite
    ``out_path``.  The file is built under a temporary name in the same
    directory, flushed to disk and only then given its name, so a crash never
    leaves a half-written file under ``out_path``.  It is created owner-only
    (0600): it holds chat.  The store must not be written to meanwhile; if it
    is, :class:`QueryError` is raised and nothing is left behind.  So it is
    if another process's compaction of a PostgreSQL log commits meanwhile
    (a store whose log is pinned at a head is not written to, but the
    compaction deletes rows it reads).

    ``progress`` is called with the number of rows written so far.
    """
    out = os.fspath(out_path)
    if os.path.lexists(out):
        raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing file", out)
    if not store.is_connected:
        raise ConnectionError("the store is not connected; connect() it before exporting")
    start, models = store.position, store.projections
    compactions = await _compactions_before(store)
    directory = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=directory)
    os.close(fd)

    def unchanged() -> None:
        # Pages are read by offset, so a write between two pages would shift
        # them: a row read twice, or one never read.
        if store.position != start:
            raise QueryError(
                f"the store changed during the export (position {start} -> "
                f"{store.position}); {out} was not written. Export a store nobody writes to"
            )
        if store.projections is not models:
            # A read found rows another process's compaction had deleted,
            # and the store built its read models again from what is left.
            _compacted_meanwhile(out)

    try:
        counts = await _fill(store, tmp, unchanged, progress)
        unchanged()
        if await store.log.compactions() != compactions:
            _compacted_meanwhile(out)
        _fsync_file(tmp)
        _publish(tmp, out)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, sqlite3.Error):
            # SQLite's own errors ("database or disk is full") are neither
            # StorageError nor OSError: callers (the CLI) would not catch them.
            raise StorageError(
                f"{out}: cannot write the export: {err}; {out} was not written"
            ) from err
        raise
    return counts


async def _compactions_before(store: EventStore) -> int | None:
    """The compactions an export compares with at its end (see EventLog.compactions).

    Those committed when its log was pinned, if it was: one committed since
    changed the rows below the head too.
    """
    pinned = store.log.pinned_compactions
    return pinned if pinned is not None else await store.log.compactions()


def _compacted_meanwhile(out: str) -> NoReturn:
    # Rows read before the compaction and after it are no one state of the
    # log (a clear or a trim it applied to half of them; statistics it
    # folded into rows past the head the export reads to).
    raise QueryError(
        f"a compaction in another process committed during the export, so what was read "
        f"is no one state of the store; {out} was not written. Export again"
    )


async def _fill(
    store: EventStore,
    path: str,
    unchanged: Callable[[], None],
    progress: Callable[[int], None] | None,
) -> dict[str, int]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # The file is a temporary one until _publish: on any failure it is
        # deleted, so a rollback journal would protect nothing.  Durability
        # comes from one fsync of the finished file.
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.executescript(LEGACY_SCHEMA)
        conn.execute("BEGIN")
        counts = dict.fromkeys(LEGACY_TABLES, 0)
        written = 0

        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", None)  # Python 3.11+
        cancels = cancelling() if cancelling is not None else 0

        async def done(table: str, n: int) -> None:
            nonlocal written
            # The store's reads answer from memory and never suspend, so a
            # cancel (asyncio.run's answer to Ctrl-C) would land only after
            # the file was published: the command then exited 130 with OUT
            # written.  A cancel requested since the export began is taken
            # here, by yielding to it (which also clears it, so the cleanup
            # after is not cancelled again).  Not yielding otherwise: the
            # process's other tasks would write between two pages and fail
            # the export.  (Python 3.10 has no cancelling(): a cancel lands
            # at the end there, and Ctrl-C raises KeyboardInterrupt at once.)
            if cancelling is not None and cancelling() > cancels:
                await asyncio.sleep(0)
            unchanged()
            counts[table] += n
            written += n
            if progress is not None and n:
                progress(written)

        users = await store.get_all_user_stats()
        conn.executemany(
            "INSERT INTO user_stats (username, first_seen, last_seen, total_chat_lines, "
            "total_time_connected, current_session_start) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    u["username"],
                    u["first_seen"],
                    u["last_seen"],
                    u["total_chat_lines"],
                    u["total_time_connected"],
                    u["current_session_start"],
                )
                for u in users
            ],
        )
        await done("user_stats", len(users))

        ch = await store.get_channel_stats()
        conn.execute(
            "INSERT INTO channel_stats (id, max_users, max_users_timestamp, max_connected, "
            "max_connected_timestamp, last_updated) VALUES (1, ?, ?, ?, ?, ?)",
            (
                ch["max_users"],
                ch["max_users_timestamp"],
                ch["max_connected"],
                ch["max_connected_timestamp"],
                ch["last_updated"],
            ),
        )
        await done("channel_stats", 1)

        offset = 0
        while page := await store.get_user_actions(limit=EXPORT_PAGE_SIZE, offset=offset):
            conn.executemany(
                "INSERT INTO user_actions (id, timestamp, username, action_type, details) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (a["id"], a["timestamp"], a["username"], a["action_type"], a["details"])
                    for a in page
                ],
            )
            offset += len(page)
            await done("user_actions", len(page))

        samples = await store.get_user_count_history()
        conn.executemany(
            "INSERT INTO user_count_history (id, timestamp, chat_users, connected_users) "
            "VALUES (?, ?, ?, ?)",
            [(c["id"], c["timestamp"], c["chat_users"], c["connected_users"]) for c in samples],
        )
        await done("user_count_history", len(samples))

        offset = 0
        while page := await store.get_recent_messages(limit=EXPORT_PAGE_SIZE, offset=offset):
            conn.executemany(
                "INSERT INTO recent_chat (id, timestamp, username, message) VALUES (?, ?, ?, ?)",
                [(m["id"], m["timestamp"], m["username"], m["message"]) for m in page],
            )
            offset += len(page)
            await done("recent_chat", len(page))

        conn.execute("COMMIT")
        return counts
    finally:
        conn.close()


def _publish(tmp: str, out: str) -> None:
    """Give ``tmp`` the name ``out`` unless something already has it."""
    # os.rename would silently replace a file created at ``out`` while we were
    # exporting; a hard link fails instead (EEXIST).  Filesystems without hard
    # links get a re-check and a rename, which leaves only that small window.
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing file", out) from None
    except OSError:
        if os.path.lexists(out):
            raise FileExistsError(
                errno.EEXIST, "refusing to overwrite an existing file", out
            ) from None
        os.replace(tmp, out)
    else:
        os.unlink(tmp)
    _fsync_dir(os.path.dirname(os.path.abspath(out)))


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    # Makes the new name durable.  Windows cannot open a directory; there the
    # rename is as durable as the filesystem makes it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _BinaryOut(Protocol):
    def write(self, data: bytes, /) -> object: ...


class _TextOut(Protocol):
    def write(self, data: str, /) -> object: ...


_json = msgspec.json.Encoder()


async def export_jsonl(store: EventStore, out: _BinaryOut | _TextOut) -> int:
    """Write every event in the log as one JSON line; return how many.

    Each line is ``{"position": p, "type": "<event name>", <fields>}`` with
    the names of :func:`eventstore.events.event_name`.  ``out`` is a binary
    or a text file (``sys.stdout`` works); it is written, not closed.  On
    PostgreSQL, a compaction another process commits meanwhile raises
    :class:`QueryError` at the end: the lines written are then no one state
    of the log.
    """
    write: Callable[[bytes], object]
    if isinstance(out, io.TextIOBase):
        text_out = cast(_TextOut, out)
        write = lambda data: text_out.write(data.decode("utf-8"))  # noqa: E731
    else:
        write = cast(_BinaryOut, out).write
    buf = bytearray()
    count = 0
    compactions = await _compactions_before(store)
    async for position, event in store.read():
        record: dict[str, Any] = {"position": position, "type": event_name(event)}
        record.update(msgspec.structs.asdict(event))
        buf += _json.encode(record)
        buf += b"\n"
        count += 1
        if len(buf) >= 1 << 16:
            write(bytes(buf))
            buf.clear()
    if buf:
        write(bytes(buf))
    if await store.log.compactions() != compactions:
        # A compaction deleted rows while they were paged through: the lines
        # hold some events it dropped and lack others (see export_sqlite).
        raise QueryError(
            "a compaction in another process committed during the export, so the lines "
            "written are no one state of the log; export again"
        )
    return count
