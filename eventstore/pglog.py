"""The PostgreSQL log: one log shared by many bot processes on many hosts.

``EventStore("postgresql://user@host/db")`` (``postgres://`` works too, the
scheme in any case) keeps its events in PostgreSQL.  Every process appends
to the same log and follows what the others append; each still folds the
whole log into its own in-memory projections.  The driver is asyncpg, an
optional dependency (``pip install 'eventstore[postgres]'``): importing
eventstore never needs it, constructing a PostgresLog without it raises
ImportError.

Tables.  The first ``open()`` creates them, under an advisory lock so that
processes connecting for the first time at once do not race each other's
``CREATE TABLE``.  Names are unqualified, so they land in the first schema of
the connection's ``search_path``; asyncpg passes unknown DSN query parameters
on as server settings, so ``...?search_path=bot2`` keeps a second store in
schema ``bot2`` of the same database.  Version 1::

    CREATE TABLE eventstore_schema (
        singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        version     integer NOT NULL,  -- of these tables: SCHEMA_VERSION
        fingerprint bytea   NOT NULL   -- events.SCHEMA_FINGERPRINT of the newest writer
    );
    CREATE TABLE eventstore_head (
        singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        position    bigint  NOT NULL   -- the last position handed out; the append lock
    );
    CREATE TABLE eventstore_events (
        position    bigint      PRIMARY KEY,
        tag         smallint    NOT NULL,  -- the event's msgspec tag (events.py)
        payload     bytea       NOT NULL,  -- the event alone, msgpack as codec.py writes it
        username    text,                  -- for operators' queries (see username_column)
        recorded_at timestamptz NOT NULL DEFAULT now()
    );

A store whose ``version`` is newer than SCHEMA_VERSION, or whose fingerprint
is not in ``READABLE_FINGERPRINTS``, was written by newer code: ``open()``
refuses it with MigrationError.

Compaction (``eventstore/pgcompaction.py``) deletes rows and rewrites some in
place, and keeps its books in two more tables, created by the first
compaction (:data:`BOOKKEEPING_DDL`): ``eventstore_compactions``, one row per
compaction, and ``eventstore_deleted``, the position ranges compactions
deleted, so that ``verify`` can tell a compaction's gap from a lost row.
Code that does not know them reads a compacted log all the same (reads skip
gaps), so they did not need a new schema version.

Positions.  ``append`` takes the next positions by incrementing the single
row of ``eventstore_head`` inside the transaction that inserts the events,
so appends are serialised and positions are handed out in commit order; see
:data:`APPEND` for why that matters and what was rejected.

Group commit.  ``append`` queues its batch and wakes the writer task, which
takes every batch queued since its last round and commits them in one
transaction; each caller gets back the first position of its own batch.  A
batch is never split across transactions, so it is all or nothing.

Reading.  ``read_pages`` pages forward by position (PAGE_ROWS rows or
PAGE_BYTES of payload a page, no transaction held between pages); the server
joins a page's payloads into one bytea, which decodes in one call.
``read_groups`` gives a page as one run, with None at the positions a
compaction deleted (as a compacted segment frame's holes), unless its rows
are spread too thin for that (HOLES_SPAN); ``read_runs`` gives runs of
consecutive positions.

Connections.  Two per process: one for reads and LISTEN (reads take turns on
it), and the writer task's own, opened at the first append.  A connection
that fails, or whose query is cancelled, is dropped and opened again on next
use; the statement that failed raises ConnectionError.  A server that stops
answering altogether (its host gone: no FIN, no RST) counts as lost after
about DEAD_PEER_SECONDS, by TCP keepalive (see _detect_dead_peer); without
it a query waited for ever, and every append queued behind it.  ``close()`` lets the
writer commit what was queued, then closes both; it runs in a task of its
own, so a caller cancelled or timed out half-way leaves nothing open, and a
second ``close()`` waits for the same work.  If that task is cancelled too
(a shutdown cancelling every task, ``asyncio.run`` ending), the connections
are terminated at once, and ``close()`` raises CancelledError only in a
caller that is itself cancelled.  A log left open, or its close cancelled,
by an event loop that has ended is closed or opened again in a new loop:
what the old loop left is dropped, not waited for.  If the writer task is
cancelled from outside while the log is open, the appends it held or had
queued fail with ConnectionError, and so does every later one, until the log
is closed and opened again.

A log belongs to the event loop that opened it.  Opened again in a new
loop after the old one ended, it starts afresh (what the old loop left
queued is dropped, its callers being gone); driven from two live loops in
turns, it is not supported.

Messages name the log by its URL with the passwords masked (``redact_dsn``):
every ``password`` and ``sslpassword`` parameter's value, up to the next
``&``, and the userinfo's password, found by the last ``@`` before the first
``=`` so that unescaped ``@ / ? #`` in it do not matter (see _split_dsn).
A URL parser such as asyncpg's may read another password there (in
``bot:se:cr/et@db/chat`` it finds host ``bot``, port ``se:cr`` and no
password), or cut a ``#`` off as a fragment: such a URL is *ambiguous*, and
an error asyncpg raises about it, or about the host it found in it, is not
shown, as it may quote a piece of the password.  Otherwise the driver's and
the server's messages are shown as they are.

Following.  The appending transaction also calls ``pg_notify``; the log
LISTENs on its read connection, and ``wait_for_appends`` returns as soon as a
notification names a position past the log's head (or at the timeout, which
is the fallback when notifications are lost with a connection).

Durability.  An append returns once its transaction has committed.  How
durable a commit is is PostgreSQL's business: with ``synchronous_commit = on``
(the default) the commit record was flushed to the server's WAL, and to a
synchronous standby if one is configured.  EventStore's ``durability``
argument does not apply to this log.  If the connection is lost during
COMMIT the outcome is unknown: the append raises StorageError, yet its events
may be in the log.  EventStore does not stop after a failed append on this
log, as it does after a local log's failed write: it applies only what it
reads back from the log, so its projections are never ahead of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import importlib
import logging
import re
import socket
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, TypeGuard, cast
from urllib.parse import unquote_plus, urlsplit

import msgspec

from .codec import decode_batch
from .errors import (
    ConnectionError,
    IntegrityError,
    MigrationError,
    QueryError,
    StorageError,
    ValidationError,
)
from .events import (
    EVENT_TYPES,
    READABLE_FINGERPRINTS,
    SCHEMA_FINGERPRINT,
    Event,
    event_tag,
)
from .log import EventLog, Group

__all__ = [
    "BOOKKEEPING_DDL",
    "DSN_SCHEMES",
    "SCHEMA_VERSION",
    "PostgresLog",
    "RowsMissing",
    "count_compactions",
    "decode_rows",
    "is_dsn",
    "redact_dsn",
    "refuse_other_urls",
    "username_column",
]

#: URL schemes that select this log in ``EventStore(path)`` (store.py's _make_log).
DSN_SCHEMES = ("postgresql://", "postgres://")
#: The version of the tables this code creates and reads.
SCHEMA_VERSION = 1
#: Rows per query when reading forward (replay, catch-up): about 1 MB of
#: chat messages, and one decode call per page ...
PAGE_ROWS = 10_000
#: ... unless their payloads pass this many bytes (messages may be 1 MiB each).
PAGE_BYTES = 8 * 1024 * 1024
#: A round of up to this many events commits as one statement (APPEND); a
#: larger one as a transaction of several, one INSERT per this many rows.
INSERT_ROWS = 10_000
#: ... or the rows' payloads pass this many bytes.  PostgreSQL takes no value
#: (a bytea[] parameter) and no message over 1 GiB: an INSERT of 10,000 rows
#: of 1 MiB chat lines (an import of a legacy database, a flood of long
#: lines) failed whole, and every caller in its round with it.
INSERT_BYTES = 64 * 1024 * 1024
#: A writer round takes queued batches until it holds about this many events
#: (a larger batch goes alone: a batch is never split across transactions).
ROUND_EVENTS = 10_000
#: ... or about this many payload bytes (see INSERT_BYTES).
ROUND_BYTES = INSERT_BYTES
#: Seconds to wait for a connection to the server.
CONNECT_TIMEOUT = 10.0
#: A connection whose server stops answering (its host gone, a failover, a
#: NAT entry expired: no FIN, no RST) is given up after about this many
#: seconds, by TCP keepalive and TCP_USER_TIMEOUT (see _detect_dead_peer).
#: Without them a query waits for its answer for ever, and with it every
#: append of the process (they queue behind the one writer) and close().
DEAD_PEER_SECONDS = 30
#: A transaction that holds the head row (or a compaction's locks) across
#: several round trips sets ``idle_in_transaction_session_timeout`` to this:
#: the server ends the session of a client that stalls between two
#: statements, rather than let every other writer wait for it.
LOCK_IDLE_TIMEOUT = 5.0
#: The advisory lock key held while creating or migrating the tables: the
#: ASCII bytes "eventsto" as a big-endian int64.
SCHEMA_LOCK = int.from_bytes(b"eventsto", "big")
#: The NOTIFY channel of a store in schema ``public``; other schemas get
#: ``eventstore.<schema>`` so that stores sharing a database do not wake each other.
CHANNEL = "eventstore"
#: The largest position a bigint holds.
MAX_POSITION = 2**63 - 1

_DDL = """
CREATE TABLE IF NOT EXISTS eventstore_schema (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version     integer NOT NULL,
    fingerprint bytea   NOT NULL
);
CREATE TABLE IF NOT EXISTS eventstore_head (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    position    bigint  NOT NULL
);
CREATE TABLE IF NOT EXISTS eventstore_events (
    position    bigint      PRIMARY KEY,
    tag         smallint    NOT NULL,
    payload     bytea       NOT NULL,
    username    text,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
"""

#: The tables a store may have besides eventstore_schema.
_TABLES = ("eventstore_head", "eventstore_events", "eventstore_compactions", "eventstore_deleted")

#: Compaction's books.  ``eventstore_compactions.id`` counts compactions (1, 2,
#: ...): a compaction plans without a lock and commits only if no other one
#: committed meanwhile.  ``through`` is the head when it committed: every
#: position up to it was considered.  ``eventstore_deleted`` holds disjoint,
#: non-adjacent ranges (adjacent ones are merged): every position a
#: compaction deleted, and no other.
BOOKKEEPING_DDL = """
CREATE TABLE IF NOT EXISTS eventstore_compactions (
    id          integer     PRIMARY KEY,
    finished_at timestamptz NOT NULL DEFAULT now(),
    through     bigint      NOT NULL,
    deleted     bigint      NOT NULL,
    rewritten   bigint      NOT NULL
);
CREATE TABLE IF NOT EXISTS eventstore_deleted (
    first_position bigint PRIMARY KEY,
    last_position  bigint NOT NULL CHECK (last_position >= first_position)
);
"""

#: Appends one round of at most ``insert_rows`` events (and ``insert_bytes``)
#: in one statement, and so in one implicit transaction: takes the next $1
#: positions, inserts the rows ($2, $3, $4 are the tags, payloads and
#: usernames; row i gets position last - $1 + i), notifies the listeners on
#: channel $5 (delivered at commit, and only if it commits) and returns the
#: last position taken.
#:
#: Why a counter row.  A reader that tails the log remembers the last
#: position it read and asks for what follows.  If positions came from a
#: sequence (or an identity column), two transactions could take 7 and 8 and
#: commit as 8 then 7: a reader between the two commits sees 8, moves past,
#: and never reads 7.  A rolled-back transaction would also leave a hole for
#: good.  So positions must be handed out in commit order, which means
#: appends must be serialised from taking positions to COMMIT.  The UPDATE
#: does both in one step: it locks the head row until the transaction ends,
#: and a second appender blocks on that lock and then increments the value
#: the first one committed.  Every committed position therefore has every
#: lower one committed before it, and a reader always sees a prefix of the
#: log.  (PostgreSQL releases a transaction's locks only after its commit is
#: visible, so the next appender cannot become visible first.)
#:
#: Why one statement.  The lock is held from the UPDATE to the commit, and
#: every other writer waits for it.  As separate statements (BEGIN, UPDATE,
#: INSERT, NOTIFY, COMMIT) it would be held across four client round trips,
#: and a writer process descheduled while holding it would stall them all;
#: measured with four writer processes on two cores, that cost more than half
#: the throughput.  In one statement the lock never waits on a client.
#:
#: Rejected: ``LOCK TABLE eventstore_events IN EXCLUSIVE MODE`` plus
#: ``max(position) + 1`` also serialises, but hands a position out twice if
#: compaction ever deletes the newest events; ``pg_advisory_xact_lock`` with
#: a constant key is database-wide, so stores in two schemas of one database
#: would serialise each other, and the key could collide with another
#: application's.  The price of any of them is the same: one appending
#: transaction at a time per store, which group commit makes up for.
APPEND = """
WITH head AS (
    UPDATE eventstore_head SET position = position + $1 RETURNING position
), inserted AS (
    INSERT INTO eventstore_events (position, tag, payload, username)
    SELECT head.position - $1 + r.n, r.tag, r.payload, r.username
    FROM head, unnest($2::smallint[], $3::bytea[], $4::text[])
        WITH ORDINALITY AS r(tag, payload, username, n)
)
SELECT position, pg_notify($5, position::text) FROM head
"""

#: A round larger than ``insert_rows`` or ``insert_bytes`` (one huge batch, long
#: chat lines, or a test's setting) runs as a transaction of several
#: statements: TAKE, one INSERT per chunk of rows, then NOTIFY.
TAKE = "UPDATE eventstore_head SET position = position + $1 RETURNING position"
#: Inserts one chunk: row i gets position $1 + i - 1.
INSERT = """
INSERT INTO eventstore_events (position, tag, payload, username)
SELECT $1::bigint + r.n - 1, r.tag, r.payload, r.username
FROM unnest($2::smallint[], $3::bytea[], $4::text[])
    WITH ORDINALITY AS r(tag, payload, username, n)
"""
NOTIFY = "SELECT pg_notify($1, $2)"

#: One page of the log from $1 to $2: at most $3 rows, cut after the row that
#: passes $4 bytes of payload.  Returns one row: the positions, the payloads
#: joined into one bytea (so one decode call reads them, with no per-row
#: objects on the way), and how many rows the page had before the cut (fewer
#: than $3, and none cut: the page reached the end).
_SELECT_PAGE = """
SELECT array_agg(position ORDER BY position),
       string_agg(payload, ''::bytea ORDER BY position),
       max(page_rows)
FROM (
    SELECT position, payload, count(*) OVER () AS page_rows,
           sum(octet_length(payload)) OVER (ORDER BY position) - octet_length(payload) AS before
    FROM (
        SELECT position, payload FROM eventstore_events
        WHERE position BETWEEN $1 AND $2 ORDER BY position LIMIT $3
    ) AS page
) AS sized
WHERE before < $4
"""
_SELECT_SOME = "SELECT position, payload FROM eventstore_events WHERE position = ANY($1::bigint[])"

#: read_groups gives a page with gaps as one run with None in them while its
#: rows span at most this many times their number of positions.
HOLES_SPAN = 4


def _runs(positions: list[int], events: list[Event]) -> list[tuple[int, list[Event]]]:
    """A page's events cut into runs of consecutive positions."""
    if positions[-1] - positions[0] == len(positions) - 1:
        return [(positions[0], events)]
    runs: list[tuple[int, list[Event]]] = []
    start = 0
    for i in range(1, len(positions)):
        if positions[i] != positions[i - 1] + 1:
            runs.append((positions[start], events[start:i]))
            start = i
    runs.append((positions[start], events[start:]))
    return runs


_encoder = msgspec.msgpack.Encoder()
_TAGS: dict[type, int] = {cls: event_tag(cls) for cls in EVENT_TYPES}
# A msgpack array32 header: rows' payloads joined after it decode as one batch.
_ARRAY32 = struct.Struct(">BI")


def is_dsn(target: object) -> TypeGuard[str]:
    """Does ``target`` name a PostgreSQL store (a ``postgresql://`` or ``postgres://`` URL)?

    The scheme is matched in any case, as URL schemes are (and as asyncpg
    reads them): ``PostgreSQL://...`` is a store in PostgreSQL, not a
    directory of that name.
    """
    return isinstance(target, str) and target.lower().startswith(DSN_SCHEMES)


def _statements(payloads: Sequence[bytes], rows: int, size: int) -> list[tuple[int, int]]:
    """Cut a round's rows into statements: (start, stop) slices of at most
    ``rows`` rows and, but for a single larger row, ``size`` payload bytes."""
    cuts: list[tuple[int, int]] = []
    start = taken = 0
    for i, payload in enumerate(payloads):
        if i > start and (i - start == rows or taken + len(payload) > size):
            cuts.append((start, i))
            start, taken = i, 0
        taken += len(payload)
    cuts.append((start, len(payloads)))
    return cuts


def _detect_dead_peer(conn: Any) -> None:
    """Make the kernel give up a TCP connection to a server that stopped answering.

    Keepalive probes an idle connection (one waiting for an answer is idle
    once its query was acknowledged) after DEAD_PEER_SECONDS / 2 and then
    every DEAD_PEER_SECONDS / 6 seconds, three times; TCP_USER_TIMEOUT drops
    a connection whose data stays unacknowledged for DEAD_PEER_SECONDS.
    The query then fails as on any lost connection.  A query that is merely
    slow (waiting for a lock) is not cut: the server's kernel answers the
    probes.  libpq has the same knobs (keepalives_idle, tcp_user_timeout);
    asyncpg has none, so they are set on its socket.  Unix sockets have
    no network to lose, and a platform without an option goes without it.
    """
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), DEAD_PEER_SECONDS // 2),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), DEAD_PEER_SECONDS // 6),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 3),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), DEAD_PEER_SECONDS * 1000),
    ]
    for level, option, value in options:
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)


#: Any URL's start: a scheme (RFC 3986: a letter, then letters, digits, "+", "-", ".") and ``://``.
_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def refuse_other_urls(target: object) -> None:
    """Raise ValidationError for a URL that is not a PostgreSQL store's.

    Anything else that is not an EventLog names a directory, and a URL of
    another scheme (a misspelt ``postgress://``, SQLAlchemy's
    ``postgresql+asyncpg://``, ``sqlite:///bot.db``) would quietly become
    one: a store on local disk, under a path with the password in it, while
    the operator thinks it is in the database.
    """
    if isinstance(target, str) and _URL_START.match(target) and not is_dsn(target):
        scheme = target.partition("://")[0]
        raise ValidationError(
            f"{redact_dsn(target)}: {scheme}:// is not a store's URL; a store is a "
            f"directory or a {' or '.join(DSN_SCHEMES)} URL"
        )


#: Query parameters that hold a secret (asyncpg's ``password``, and
#: ``sslpassword`` for the client key).
_SECRET_PARAMS = ("password", "sslpassword")
#: A parameter: its key (after a ``?`` or ``&``) and its value, up to the next ``&``.
_PARAM = re.compile(r"(?<=[?&])([^?&=]*)=([^&]*)")
#: An authority that is hosts alone (``host``, ``host:5432``, ``[::1]:5432``,
#: comma-separated): a ``:`` in it is a port's, not a password's.
_HOSTS = re.compile(r"(?:\[[^\]]*\]|[^:,\[\]]*)(?::\d*)?(?:,(?:\[[^\]]*\]|[^:,\[\]]*)(?::\d*)?)*")


def _mask_params(dsn: str) -> str:
    """``dsn`` with the values of its ``password`` and ``sslpassword`` parameters masked.

    Wherever they are: a value runs to the next ``&`` or the end, so an
    ``@`` in it goes with it (and is not taken for the userinfo's end).
    """

    def mask(param: re.Match[str]) -> str:
        key = param[1]
        return f"{key}=***" if unquote_plus(key).strip().lower() in _SECRET_PARAMS else param[0]

    return _PARAM.sub(mask, dsn)


def _split_dsn(dsn: str) -> tuple[str, str, str, str]:
    """(scheme and ``://``, userinfo, ``@`` or ``""``, the rest: hosts, path, query).

    For a URL whose secret parameters are masked already (_mask_params).
    The userinfo is not where a URL parser says: a password written without
    percent-escapes may hold ``:``, ``@``, ``/``, ``?`` or ``#``, and urlsplit
    would then take part of it for the host, the path, the query or a
    fragment.  It ends at the last ``@`` before the first ``=``: an ``@``
    after it is a query value's (``?user=bot@host``).  With no ``@`` there,
    the password may hold the ``=``: the text up to the last ``@`` is the
    userinfo if it has a ``:`` before any ``/``, ``?`` or ``#``, unless that
    ``:`` is a port's and a ``?`` comes before the first ``=`` (then it is a
    query's ``@``).  Where a URL reads both ways, this hides more, not less.
    """
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return "", "", "", dsn
    userinfo, at, _ = rest.partition("=")[0].rpartition("@")
    if not at:
        userinfo, at, _ = rest.rpartition("@")
        authority = re.split(r"[/?#]", userinfo, maxsplit=1)[0]
        port_or_query = _HOSTS.fullmatch(authority) and "?" in userinfo.partition("=")[0]
        if not at or ":" not in authority or port_or_query:
            return scheme + sep, "", "", rest
    return scheme + sep, userinfo, at, rest[len(userinfo) + 1 :]


def redact_dsn(dsn: str) -> str:
    """``dsn`` with its passwords (in the userinfo or the query) replaced by ``***``.

    However the URL is spelled: see _mask_params and _split_dsn.
    """
    scheme, userinfo, at, rest = _split_dsn(_mask_params(dsn))
    user = re.split(r"[:/?#]", userinfo, maxsplit=1)[0]
    if user != userinfo:
        userinfo = f"{user}:***"
    return f"{scheme}{userinfo}{at}{rest}"


def _is_ambiguous(dsn: str) -> bool:
    """May a URL parser (asyncpg's) find another password in ``dsn`` than redact_dsn?

    Then an error about the URL may quote a piece of the password that
    redact_dsn did not hide (a port "se:cr" cut from "se:cr/et"), and no
    search for the password would find the piece.  Ambiguous: two ``@`` in
    urlsplit's netloc, which it cuts at the last but asyncpg at the first;
    a password parameter whose value holds an ``&`` (the piece after it has
    no ``=``); and a ``#`` in a URL with a password, as a parser takes what
    follows it for a fragment.
    """
    params = [m[1] for m in _PARAM.finditer(dsn)]
    pieces = re.split(r"[?&]", dsn.partition("?")[2]) if "?" in dsn else []
    secret_params = any(unquote_plus(k).strip().lower() in _SECRET_PARAMS for k in params)
    for piece, after in pairwise(pieces):
        key = piece.partition("=")[0]
        if unquote_plus(key).strip().lower() in _SECRET_PARAMS and "=" not in after:
            return True
    _, userinfo, _, _ = _split_dsn(_mask_params(dsn))
    ours = userinfo.partition(":")[2] if ":" in userinfo else None
    if "#" in dsn:
        return ours is not None or secret_params
    try:
        parsed = urlsplit(dsn)
        theirs = parsed.password
    except ValueError:
        return True
    if parsed.netloc.count("@") > 1:
        return True
    return ours != theirs


def _import_asyncpg() -> Any:
    try:
        return importlib.import_module("asyncpg")
    except ImportError as err:
        raise ImportError(
            "the PostgreSQL log needs asyncpg, which is not installed: "
            "pip install 'eventstore[postgres]' (in a checkout: pip install -e '.[postgres]')",
            name="asyncpg",
        ) from err


def decode_rows(payloads: Sequence[bytes], positions: Sequence[int], where: str) -> list[Event]:
    """Decode rows' payloads with one call (they join into one msgpack array).

    A damaged row raises IntegrityError naming ``where`` and its position.
    """
    data = b"".join([_ARRAY32.pack(0xDD, len(payloads)), *payloads])
    try:
        return decode_batch(data)
    except IntegrityError:
        # Name the row that is damaged.
        for position, payload in zip(positions, payloads, strict=True):
            decode_batch(_ARRAY32.pack(0xDD, 1) + payload, f"{where} position {position}")
        raise


#: The tags of the events that have a user (a ``username`` field).
_USER_TAGS = [event_tag(cls) for cls in EVENT_TYPES if "username" in cls.__struct_fields__]


async def count_compactions(fetchval: Callable[[str], Awaitable[Any]]) -> int:
    """Compactions committed (``eventstore_compactions``; 0 without the table)."""
    # Two statements: a query naming a missing table fails to parse.
    if not await fetchval("SELECT to_regclass('eventstore_compactions') IS NOT NULL"):
        return 0
    return int(await fetchval("SELECT coalesce(max(id), 0) FROM eventstore_compactions"))


def username_column(event: Event) -> str | None:
    """The ``username`` column: the event's user, for operators' SQL.

    NULL for events without a user, and for names holding NUL, which a
    PostgreSQL text value cannot (the payload keeps the name exactly).
    """
    name = getattr(event, "username", None)
    if name is None or "\x00" in name:
        return None
    return str(name)


def _channel_for(schema: str) -> str:
    if schema == "public":
        return CHANNEL
    channel = f"{CHANNEL}.{schema}"
    if len(channel.encode()) > 63:  # NAMEDATALEN - 1: longer names are cut or refused
        channel = f"{CHANNEL}.{hashlib.blake2b(schema.encode(), digest_size=8).hexdigest()}"
    return channel


class RowsMissing(QueryError):
    """``fetch`` found no row at a position asked for (a compaction deleted it)."""


@dataclass(slots=True)
class _Batch:
    """One ``append`` call waiting for the writer: its rows and its caller."""

    tags: list[int]
    payloads: list[bytes]
    usernames: list[str | None]
    #: The payloads' bytes.
    size: int
    future: asyncio.Future[int] = field(repr=False)


class PostgresLog(EventLog):
    """An event log in a PostgreSQL database, shared by every process that opens it."""

    shared = True

    def __init__(
        self,
        dsn: str,
        *,
        read_only: bool = False,
        logger: logging.Logger | None = None,
        page_rows: int = PAGE_ROWS,
        insert_rows: int = INSERT_ROWS,
        insert_bytes: int = INSERT_BYTES,
        connect_timeout: float = CONNECT_TIMEOUT,
        create: bool = True,
        pin_head: bool = False,
    ) -> None:
        """``create=False`` refuses a database without the tables instead of
        creating them (the CLI's writing commands: a mistyped URL should not
        grow a new, empty store).  ``pin_head=True`` reads only up to the head
        as it was at ``open()``: ``refresh()`` and ``wait_for_appends`` never
        move it, so a store on this log holds still while others append (the
        CLI's ``export``, which must read one consistent state).
        """
        if page_rows < 1 or insert_rows < 1 or insert_bytes < 1:
            raise ValueError(
                "page_rows, insert_rows and insert_bytes must be at least 1, got "
                f"{page_rows}, {insert_rows}, {insert_bytes}"
            )
        self._pg = _import_asyncpg()
        self.dsn = dsn
        #: The DSN without its password, for messages.
        self.where = redact_dsn(dsn)
        self._ambiguous = _is_ambiguous(dsn)
        self.read_only = read_only
        self.logger = logger or logging.getLogger("eventstore")
        self.page_rows = page_rows
        #: Rounds of more events than this, or more payload bytes, are several
        #: statements in one transaction.
        self.insert_rows = insert_rows
        self.insert_bytes = insert_bytes
        self.connect_timeout = connect_timeout
        self.create = create
        self.pin_head = pin_head
        self.channel = CHANNEL
        self._open = False
        self._head = 0
        # The read connection (reads, LISTEN) and the writer task's own.
        # An asyncpg connection runs one query at a time: _rlock serialises
        # the readers, and only the writer task touches _wconn.
        self._rconn: Any = None
        self._wconn: Any = None
        self._rlock = asyncio.Lock()
        # Set by a notification of a position past the head; wait_for_appends
        # takes it, or wakes its waiters.
        self._appended = False
        self._waiters: set[asyncio.Future[None]] = set()
        self._queue: list[_Batch] = []
        self._round: list[_Batch] = []  # being committed
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        # The event loop that opened the log: its tasks, futures and
        # connections are no use in another one.
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -----------------------------------------------------------------
    @property
    def head(self) -> int:
        return self._head

    async def open(self) -> None:
        if self._open and self._loop is asyncio.get_running_loop():
            return
        if self._open or self._closing is not None:
            # A close() in progress finishes first (one that cannot, being
            # cancelled or of another event loop, is dropped), and a log left
            # open by an event loop that has ended (asyncio.run returned
            # without close()) is closed: its writer and connections are no
            # use here.
            await self.close()
        conn = await self._connect()
        try:
            await self._prepare(conn)
            schema = await conn.fetchval(
                "SELECT relnamespace::regnamespace::text FROM pg_class "
                "WHERE oid = to_regclass('eventstore_events')"
            )
            self.channel = _channel_for(str(schema))
            if self.pin_head:
                # Counted before the head is read: a compaction committing
                # between the two then counts as one after the pin (an export
                # fails, and is run again), never the other way round.
                self.pinned_compactions = await count_compactions(conn.fetchval)
            self._head = await self._read_head(conn)
            await conn.add_listener(self.channel, self._on_notify)
        except StorageError:
            conn.terminate()
            raise
        except Exception as err:
            conn.terminate()
            raise ConnectionError(f"{self.where}: cannot open the log: {err}") from err
        except BaseException:
            conn.terminate()
            raise
        self._rconn = conn
        # asyncio primitives belong to the loop that opens the log.
        self._rlock = asyncio.Lock()
        self._appended = False
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._open = True
        if not self.read_only:
            self._writer = asyncio.get_running_loop().create_task(
                self._run_writer(), name="eventstore-pg-writer"
            )

    async def _connect(self) -> Any:
        try:
            conn = await self._pg.connect(self.dsn, timeout=self.connect_timeout)
            _detect_dead_peer(conn)
            return conn
        except (ValueError, OverflowError, OSError, asyncio.TimeoutError) as err:
            # ValueError: asyncpg could not read the URL (ClientConfigurationError
            # is one too); OverflowError: a port past 65535; OSError, TimeoutError:
            # no server where it looked.
            # The message may quote a piece of the URL as asyncpg cut it up:
            # for an ambiguous URL (_is_ambiguous), perhaps a piece of the
            # password that redact_dsn hid whole ("invalid literal for int():
            # 'se:cr'").  Not shown then, nor kept in the traceback.
            if self._ambiguous:
                raise ConnectionError(
                    f"{self.where}: cannot connect ({type(err).__name__}; its message is "
                    "hidden because the URL is ambiguous and it may quote a piece of the "
                    "password: percent-encode any ':', '@', '/', '?', '#', '&' or '%' in "
                    "the password)"
                ) from None
            raise ConnectionError(f"{self.where}: cannot connect: {err}") from err
        except (self._pg.PostgresError, self._pg.InterfaceError) as err:
            # The server's word: it never echoes the client's password.
            raise ConnectionError(f"{self.where}: cannot connect: {err}") from err

    async def _prepare(self, conn: Any) -> None:
        """Create the tables if missing, or check that this code can read them."""
        async with conn.transaction():
            if not self.read_only:
                # Held to the end of this transaction.  Without it two first
                # connects both run CREATE TABLE IF NOT EXISTS, and one of
                # them fails on the catalog's unique index: IF NOT EXISTS
                # only sees tables that were committed.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            present = await conn.fetchval("SELECT to_regclass('eventstore_schema') IS NOT NULL")
            if not present:
                if self.read_only or not self.create:
                    hint = "open it once without read_only to create it" if self.create else ""
                    raise ConnectionError(
                        f"{self.where}: no event store here (no table eventstore_schema "
                        f"on the search_path){'; ' + hint if hint else ''}"
                    )
                strays = [
                    row[0]
                    for row in await conn.fetch(
                        "SELECT t FROM unnest($1::text[]) AS t WHERE to_regclass(t) IS NOT NULL",
                        list(_TABLES),
                    )
                ]
                if strays:
                    # CREATE TABLE IF NOT EXISTS would keep them, whatever
                    # their columns, and the store would fail on its first query.
                    raise IntegrityError(
                        f"{self.where}: no eventstore_schema table, but {', '.join(strays)} "
                        "exists: not a store this code made (another program's table?); "
                        "nothing created"
                    )
                await conn.execute(_DDL)
                await conn.execute(
                    "INSERT INTO eventstore_schema (version, fingerprint) VALUES ($1, $2)",
                    SCHEMA_VERSION,
                    SCHEMA_FINGERPRINT,
                )
                await conn.execute("INSERT INTO eventstore_head (position) VALUES (0)")
                self.logger.info("%s: created the event store tables", self.where)
            row = await conn.fetchrow("SELECT version, fingerprint FROM eventstore_schema")
            if row is None:
                raise IntegrityError(f"{self.where}: table eventstore_schema has no row")
            version, fingerprint = row[0], bytes(row[1])
            if version > SCHEMA_VERSION:
                raise MigrationError(
                    f"{self.where}: the tables are at schema version {version}; "
                    f"this code knows versions up to {SCHEMA_VERSION}"
                )
            if version < 1:
                raise IntegrityError(f"{self.where}: schema version {version} is not valid")
            if fingerprint not in READABLE_FINGERPRINTS:
                raise MigrationError(
                    f"{self.where}: events were written with schema fingerprint "
                    f"{fingerprint.hex()}, which this code cannot read (it writes "
                    f"{SCHEMA_FINGERPRINT.hex()})"
                )
            if fingerprint != SCHEMA_FINGERPRINT and not self.read_only:
                # This writer may add events that only this schema reads: from
                # now on older code must refuse the store.
                await conn.execute(
                    "UPDATE eventstore_schema SET fingerprint = $1", SCHEMA_FINGERPRINT
                )

    async def _read_head(self, conn: Any) -> int:
        row = await conn.fetchrow(
            "SELECT position, (SELECT max(position) FROM eventstore_events) FROM eventstore_head"
        )
        if row is None:
            raise IntegrityError(f"{self.where}: table eventstore_head has no row")
        head, last = int(row[0]), row[1]
        if last is not None and last > head:
            raise IntegrityError(
                f"{self.where}: eventstore_events holds position {last}, past the head "
                f"{head} in eventstore_head (rows inserted outside the store?)"
            )
        return head

    async def close(self) -> None:
        """Let the writer commit what was queued, then close both connections.

        The work runs in a task of its own: a caller cancelled half-way (a
        timeout around close(), a shutdown cancelling every task) does not
        leave the connections open with the log already marked closed; a
        second close() waits for the same work.  If that task is cancelled
        itself, the connections are terminated and close() returns: it
        raises CancelledError only in a caller that is cancelled.
        """
        self._drop_stale_closing()
        if self._closing is None:
            if not self._open:
                return
            self._open = False
            self._closing = asyncio.ensure_future(self._close())
            # A callback, not a finally in _close: a task cancelled before it
            # starts never runs its coroutine.
            self._closing.add_done_callback(self._closed)
        closing = self._closing
        try:
            # asyncio.wait, not await: cancelling this caller does not cancel
            # the work, and the work's cancellation is not raised here as if
            # it were this caller's.  (So this needs no Task.cancelling(),
            # which is 3.11+: wait() raises CancelledError only if this
            # caller is cancelled.)
            await asyncio.wait({closing})
        finally:
            if closing.done() and self._closing is closing:
                self._closing = None
        if not closing.cancelled():
            closing.result()  # _close failed: its error

    def _drop_stale_closing(self) -> None:
        """Forget a close() that cannot be waited for.

        One that ended without a caller to reset ``_closing`` (its caller
        cancelled first, then asyncio.run cancelling it as it ended), or one
        of another event loop: awaiting it would raise its CancelledError, or
        fail outright.  Whatever it left open is terminated.
        """
        closing = self._closing
        if closing is None or not (
            closing.done() or closing.get_loop() is not asyncio.get_running_loop()
        ):
            return
        self._closing = None
        if closing.done() and not closing.cancelled():
            closing.exception()  # retrieved: _closed terminated what it left
        if closing.get_loop() is not asyncio.get_running_loop():
            # Appends queued in a loop that has ended: their callers are gone
            # (never acknowledged), and a writer of this loop must not commit
            # them nor resolve futures of a closed loop.
            self._queue, self._round, self._waiters = [], [], set()
        self._writer = None
        self._terminate_conns()

    async def _close(self) -> None:
        writer = self._writer
        if self._loop is not asyncio.get_running_loop():
            # Opened in an event loop that has ended (asyncio.run returned
            # without close()): nothing of it runs any more, its writer cannot
            # be waited for nor its callers' futures resolved here.  _closed
            # terminates its connections.
            self._writer, self._queue, self._round, self._waiters = None, [], [], set()
            if writer is not None and writer.done() and not writer.cancelled():
                writer.exception()  # retrieved: no "never retrieved" warning
            return
        if writer is not None:
            # The writer commits what was queued before close(), then stops.
            # asyncio.wait, not await: a writer cancelled from outside would
            # raise its CancelledError here, as if close() were cancelled.
            self._wake.set()
            await asyncio.wait({writer})
            if not writer.cancelled():
                # Whatever stopped it failed its callers (_run_writer).
                writer.exception()
        self._fail_queue(ConnectionError(f"{self.where}: the log was closed before this write"))
        async with self._rlock:
            for conn in (self._rconn, self._wconn):
                await self._close_conn(conn)
            self._rconn = self._wconn = None

    def _closed(self, closing: asyncio.Future[None]) -> None:
        """After _close, however it ended.

        Cancelled (a shutdown cancelling every task, asyncio.run ending;
        perhaps before it started) or failed half-way, it leaves nothing
        open and no one waiting: the connections are terminated at once, and
        a writer still at work (connecting, or committing on the connection
        terminated here) is stopped, failing its callers (_run_writer).
        """
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done() and writer.get_loop() is closing.get_loop():
            writer.cancel()
        self._terminate_conns()
        self._fail_queue(ConnectionError(f"{self.where}: the log was closed before this write"))
        self._signal_appended()  # release anyone still waiting for appends

    def _terminate_conns(self) -> None:
        conns, self._rconn, self._wconn = (self._rconn, self._wconn), None, None
        for conn in conns:
            _terminate(conn)

    async def _close_conn(self, conn: Any) -> None:
        if conn is None or conn.is_closed():
            return
        try:
            await conn.close(timeout=5)
        except Exception:
            conn.terminate()

    def _check_open(self) -> None:
        if not self._open:
            raise ConnectionError(f"{self.where}: the log is not open")

    def _first_error(self, err: BaseException) -> BaseException:
        """The error to report for ``err`` raised out of a transaction block.

        A transaction's rollback on the way out is refused by a connection
        that has just died ("cannot call Transaction.__aexit__(): the
        underlying connection is closed"); the error that killed it, which
        that one hides, is the one to show.
        """
        cause = err.__context__
        if (
            isinstance(err, self._pg.InterfaceError)
            and isinstance(cause, (self._pg.PostgresError, self._pg.InterfaceError, OSError))
            and self._lost(cause)
        ):
            return cause
        return err

    def _lost(self, err: BaseException) -> bool:
        """Must the connection be replaced after ``err``?

        Only the server's verdict on a statement (a PostgresError other than
        the connection's own) leaves the connection usable.  Anything else (a
        closed socket, a timeout, a cancellation, a client-side protocol
        state error) may leave it in a state no one can tell.
        """
        pg = self._pg
        if isinstance(err, (pg.PostgresConnectionError, pg.exceptions.OperatorInterventionError)):
            return True
        return not isinstance(err, pg.PostgresError)

    # -- writing -------------------------------------------------------------------
    def submit(self, events: Sequence[Event]) -> tuple[int, asyncio.Future[None]]:
        raise NotImplementedError(
            "PostgresLog is shared by many processes: positions are known only at "
            "commit, so it has no submit(); use append() (EventStore does)"
        )

    async def append(self, events: Sequence[Event]) -> int:
        """Commit ``events`` in one transaction; return the position of the first.

        The transaction may carry other callers' batches too (group commit).
        """
        self._check_open()
        if self.read_only:
            raise ConnectionError(f"{self.where}: the log is open read-only")
        if not events:
            return self._head + 1
        tags: list[int] = []
        payloads: list[bytes] = []
        usernames: list[str | None] = []
        for event in events:
            tag = _TAGS.get(type(event))
            if tag is None:
                raise ValidationError(f"not an event: {event!r}")
            tags.append(tag)
            payloads.append(_encoder.encode(event))
            usernames.append(username_column(event))
        writer = self._writer
        if writer is None or writer.done():
            # Queued, the batch would wait for ever: no one would take it.
            raise ConnectionError(
                f"{self.where}: the log's writer task is gone (cancelled from outside?); "
                "nothing is appended until the log is closed and opened again "
                "(EventStore: close() and connect())"
            )
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append(_Batch(tags, payloads, usernames, sum(map(len, payloads)), future))
        self._wake.set()
        # Cancelling this await does not take the batch back: it is committed anyway.
        return await future

    def _take_round(self) -> list[_Batch]:
        taken = size = 0
        for i, batch in enumerate(self._queue):
            if i and (taken + len(batch.tags) > ROUND_EVENTS or size + batch.size > ROUND_BYTES):
                break
            taken += len(batch.tags)
            size += batch.size
        else:
            i = len(self._queue)
        round_, self._queue = self._queue[:i], self._queue[i:]
        return round_

    async def _run_writer(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    round_ = self._round = self._take_round()
                    try:
                        last = await self._commit(round_)
                    except StorageError as err:
                        self._round = []
                        for batch in round_:
                            if not batch.future.done():
                                batch.future.set_exception(err)
                        continue
                    self._round = []
                    self._head = max(self._head, last)
                    position = last - sum(len(batch.tags) for batch in round_) + 1
                    for batch in round_:
                        if not batch.future.done():
                            batch.future.set_result(position)
                        position += len(batch.tags)
                if not self._open:
                    return
        except BaseException as err:
            # Cancelled from outside (a shutdown cancelling every task) with
            # the log still open, or a bug: no one commits what is queued now,
            # so fail it; append() refuses from here on (the writer is done).
            why = "cancelled" if isinstance(err, asyncio.CancelledError) else f"stopped: {err!r}"
            stopped = ConnectionError(
                f"{self.where}: the log's writer task was {why} (a write in progress may "
                "or may not have committed)"
            )
            self._queue[:0] = self._round
            self._round = []
            self._fail_queue(stopped)
            raise

    async def _commit(self, round_: list[_Batch]) -> int:
        """Commit one round in one transaction; return the last position it took."""
        tags = [t for batch in round_ for t in batch.tags]
        payloads = [p for batch in round_ for p in batch.payloads]
        usernames = [u for batch in round_ for u in batch.usernames]
        n = len(tags)
        conn = self._wconn
        multi_statement = False
        try:
            if conn is None or conn.is_closed():
                conn = self._wconn = await self._connect()
            cuts = _statements(payloads, self.insert_rows, self.insert_bytes)
            if len(cuts) == 1:
                row = await conn.fetchrow(APPEND, n, tags, payloads, usernames, self.channel)
                last = int(row[0])
            else:
                async with conn.transaction():
                    # TAKE holds the head row until COMMIT, and every other
                    # writer waits for it: a client stalled between the
                    # INSERTs (its loop blocked, its host hung) held them all
                    # for as long.  The server now ends such a session.
                    await conn.execute(
                        "SET LOCAL idle_in_transaction_session_timeout = "
                        f"{int(LOCK_IDLE_TIMEOUT * 1000)}"
                    )
                    multi_statement = True
                    last = int(await conn.fetchval(TAKE, n))
                    first = last - n + 1
                    for start, stop in cuts:
                        chunk = (tags[start:stop], payloads[start:stop], usernames[start:stop])
                        await self._insert(conn, first + start, chunk)
                    await conn.execute(NOTIFY, self.channel, str(last))
        except StorageError:
            raise
        except BaseException as raised:
            err = self._first_error(raised)
            if self._lost(err):
                if conn is not None:
                    conn.terminate()
                self._wconn = None
            if not isinstance(raised, Exception):  # cancelled: the outcome is unknown
                raise
            if self._lost(err):
                # Perhaps the idle limit, perhaps not: asyncpg reports the
                # server's ending of the session as a bare "connection was
                # closed", so the limit is named as a possibility.
                idle = (
                    "; if this process stalled inside it, the server ends the session of an "
                    "append of several statements that sits idle in its transaction for over "
                    f"{LOCK_IDLE_TIMEOUT:g} s, so that the other writers go on"
                    if multi_statement
                    else ""
                )
                raise ConnectionError(
                    f"{self.where}: connection lost while appending {n} events "
                    f"(if it was lost during COMMIT they may be in the log): {err}{idle}"
                ) from err
            raise StorageError(f"{self.where}: append of {n} events failed: {err}") from err
        return last

    async def _insert(
        self, conn: Any, first: int, chunk: tuple[list[int], list[bytes], list[str | None]]
    ) -> None:
        """One INSERT of a round of several (rows from position ``first``).

        A method of its own so that a test can stall between two of them.
        """
        await conn.execute(INSERT, first, *chunk)

    def _fail_queue(self, err: StorageError) -> None:
        queue, self._queue = self._queue, []
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for batch in queue:
            # A future of a loop that has ended cannot be resolved (and its
            # caller is gone).
            if not batch.future.done() and batch.future.get_loop() is loop:
                batch.future.set_exception(err)

    async def delete_positions(self, positions: Sequence[int]) -> int:
        """Delete the events at ``positions`` in one transaction; return how many existed.

        For compaction.  Positions are never reused: the head does not move.
        """
        self._check_open()
        if self.read_only:
            raise ConnectionError(f"{self.where}: the log is open read-only")
        status = await self._query(
            "execute",
            "DELETE FROM eventstore_events WHERE position = ANY($1::bigint[])",
            list(positions),
        )
        return int(str(status).rsplit(" ", 1)[-1])

    # -- reading -------------------------------------------------------------------
    async def _query(self, method: str, sql: str, *args: Any) -> Any:
        """Run one statement on the read connection (reconnecting if it was lost)."""
        self._check_open()
        async with self._rlock:
            conn = self._rconn
            if conn is None or conn.is_closed():
                conn = await self._connect()
                try:
                    await conn.add_listener(self.channel, self._on_notify)
                except BaseException as err:
                    conn.terminate()
                    if not isinstance(err, Exception):
                        raise
                    raise ConnectionError(f"{self.where}: cannot LISTEN: {err}") from err
                self._rconn = conn
                # Notifications sent while we were away are lost: look now.
                self._signal_appended()
            try:
                return await getattr(conn, method)(sql, *args)
            except BaseException as err:
                if not self._lost(err):
                    raise QueryError(f"{self.where}: query failed: {err}") from err
                conn.terminate()
                self._rconn = None
                if not isinstance(err, Exception):  # cancelled: not ours to translate
                    raise
                raise ConnectionError(f"{self.where}: connection lost: {err}") from err

    def _decode(self, payloads: list[bytes], positions: Sequence[int]) -> list[Event]:
        return decode_rows(payloads, positions, self.where)

    async def _decode_joined(self, positions: list[int], blob: bytes) -> list[Event]:
        """Decode a page's joined payloads; on damage, read its rows one by one to name it."""
        try:
            return decode_batch(_ARRAY32.pack(0xDD, len(positions)) + blob)
        except IntegrityError:
            rows = await self._query("fetch", _SELECT_SOME, positions)
            found = {row[0]: row[1] for row in rows}
            present = [p for p in positions if p in found]
            self._decode([found[p] for p in present], present)
            raise

    async def read_runs(
        self, from_position: int = 0, to_position: int | None = None
    ) -> AsyncIterator[tuple[int, list[Event]]]:
        """Yield runs up to ``to_position`` or, without it, to the end as committed now.

        Reads page by page (keyset pagination, no transaction held between
        pages).  Every page is a prefix of what is committed, so a run never
        skips a position that a later page could still fill in.
        """
        async with contextlib.aclosing(self.read_pages(from_position, to_position)) as pages:
            async for positions, events in pages:
                for first, run in _runs(positions, events):
                    yield first, run

    async def read_groups(
        self, from_position: int = 0, to_position: int | None = None
    ) -> AsyncGenerator[Group, None]:
        """The events of ``read_runs``, a page's at a time, as runs.

        A page with gaps left by compaction is one run with None at each
        deleted position (as a compacted segment frame's holes), unless its
        rows are spread over more than HOLES_SPAN times their number.
        """
        async with contextlib.aclosing(self.read_pages(from_position, to_position)) as pages:
            async for positions, events in pages:
                first = positions[0]
                span = positions[-1] - first + 1
                if span == len(positions):
                    yield [(first, events)]
                elif span <= HOLES_SPAN * len(positions):
                    # A run per piece between gaps made a list each, half a
                    # page's worth after a first compaction, and all of them
                    # outlived young collections: full collections came every
                    # page or two, 45 ms each at a million events.
                    run: list[Event | None] = [None] * span
                    for position, event in zip(positions, events, strict=True):
                        run[position - first] = event
                    yield [(first, run)]
                else:
                    yield cast(Group, _runs(positions, events))  # lists of events, no None

    async def read_pages(
        self, from_position: int = 0, to_position: int | None = None
    ) -> AsyncGenerator[tuple[list[int], list[Event]], None]:
        """The log a page at a time: its rows' positions (ascending), and their events.

        Positions skip the rows compaction deleted.  Reads page by page as
        ``read_runs`` does.
        """
        self._check_open()
        position = max(from_position, 1)
        stop = MAX_POSITION if to_position is None else min(to_position, MAX_POSITION)
        if self.pin_head:
            stop = min(stop, self._head)
        while position <= stop:
            page = await self._query(
                "fetchrow", _SELECT_PAGE, position, stop, self.page_rows, PAGE_BYTES
            )
            positions, blob, page_rows = page[0], page[1], page[2]
            if not positions:
                return
            events = await self._decode_joined(positions, blob)
            last = positions[-1]
            if last > self._head:
                self._head = last
            yield positions, events
            if page_rows < self.page_rows and len(positions) == page_rows:
                return  # the page reached the end, uncut
            position = last + 1

    async def fetch(self, positions: Sequence[int]) -> list[Event]:
        if not positions:
            self._check_open()
            return []
        rows = await self._query("fetch", _SELECT_SOME, list(positions))
        found: dict[int, bytes] = {row[0]: row[1] for row in rows}
        missing = [pos for pos in positions if pos not in found]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise RowsMissing(f"{self.where}: no event at position {missing[0]}{more}")
        return self._decode([found[pos] for pos in positions], positions)

    async def holds_user(self, username: str) -> bool:
        if "\x00" not in username:
            # The column holds every event's user exactly (username_column).
            return bool(
                await self._query(
                    "fetchval",
                    "SELECT EXISTS (SELECT 1 FROM eventstore_events WHERE username = $1)",
                    username,
                )
            )
        # A name holding NUL has no username column, nor can it be a text
        # parameter: the rows of events with a user but without the column
        # are read.
        rows = await self._query(
            "fetch",
            "SELECT position, payload FROM eventstore_events "
            "WHERE username IS NULL AND tag = ANY($1::smallint[]) ORDER BY position",
            _USER_TAGS,
        )
        events = self._decode([row[1] for row in rows], [row[0] for row in rows])
        return any(getattr(ev, "username", None) == username for ev in events)

    async def compactions(self) -> int | None:
        return await count_compactions(functools.partial(self._query, "fetchval"))

    async def compacted_through(self) -> int | None:
        """The head when the last compaction committed (None: never compacted).

        Positions up to it may have lost rows no read could see any more, and
        statistics there may have been folded into absolute values.
        """
        # Two statements: a query naming a missing table fails to parse.
        if not await self._query(
            "fetchval", "SELECT to_regclass('eventstore_compactions') IS NOT NULL"
        ):
            return None
        through = await self._query("fetchval", "SELECT max(through) FROM eventstore_compactions")
        return None if through is None else int(through)

    @contextlib.asynccontextmanager
    async def dedicated(self) -> AsyncIterator[Any]:
        """A connection of its own, closed on exit; the log need not be open.

        For work that holds a transaction (compaction, and the consistent
        snapshot verify and info read in) and so must not share the read
        connection.  asyncpg's errors raised inside become ConnectionError
        (the connection failed) or QueryError (a statement failed).
        """
        conn = await self._connect()
        try:
            yield conn
        except StorageError:
            raise  # ours already (eventstore's ConnectionError is an OSError too)
        except (
            self._pg.PostgresError,
            self._pg.InterfaceError,
            OSError,
            asyncio.TimeoutError,
        ) as err:
            err = self._first_error(err)
            if self._lost(err):
                conn.terminate()
                raise ConnectionError(f"{self.where}: connection lost: {err}") from err
            raise QueryError(f"{self.where}: query failed: {err}") from err
        finally:
            await self._close_conn(conn)

    # -- following -----------------------------------------------------------------
    async def refresh(self) -> int:
        """Learn the head other processes have committed; return it."""
        if self.pin_head:
            self._check_open()
            return self._head
        head = await self._query("fetchval", "SELECT position FROM eventstore_head")
        if head is not None and head > self._head:
            self._head = int(head)
        return self._head

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            last = int(payload)
        except ValueError:
            last = MAX_POSITION  # not ours to parse: look anyway
        if last > self._head:
            self._signal_appended()

    def _signal_appended(self) -> None:
        self._appended = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for_appends(self, timeout: float) -> None:
        """Return when a notification names a position past the head, or after ``timeout``.

        A future and a timer rather than ``asyncio.wait_for``: up to Python
        3.11, wait_for can swallow a cancellation that arrives as the wait
        ends, and a store closing its follower while notifications pour in
        then waited for ever.
        """
        if not self._open or self.pin_head:
            await asyncio.sleep(timeout)
            return
        if not self._appended:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            timer = loop.call_later(timeout, _resolve, waiter)
            self._waiters.add(waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiters.discard(waiter)
        # Clearing here loses nothing: whatever was notified is committed,
        # and the caller's refresh() comes after this.
        self._appended = False


def _terminate(conn: Any) -> None:
    """Close ``conn`` at once, without a word to the server (synchronous)."""
    if conn is not None and not conn.is_closed():
        # Fails (RuntimeError) if its event loop is closed: the socket then
        # goes with the connection object.
        with contextlib.suppress(Exception):
            conn.terminate()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
