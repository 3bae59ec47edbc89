"""What every command shares: errors and exit codes, running the library, printing.

Exit codes: 0 for success, 1 when a problem was found or an operation was
refused (damage, a locked store, a library error), 2 for bad usage (Typer's
own usage errors already exit 2; :func:`usage_error` does the same for
checks Typer cannot express).  Errors are one line on stderr, ``Error: ...``;
data goes to stdout, progress bars to stderr and only on a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any, NoReturn, TypeVar

import msgspec
import typer

from eventstore import EventStore, StorageError
from eventstore.errors import ConnectionError, ValidationError
from eventstore.lockfile import lock_holder
from eventstore.pglog import PostgresLog, is_dsn, redact_dsn, refuse_other_urls
from eventstore.segment import list_segments
from eventstore.store import Durability

T = TypeVar("T")

#: A progress callback: (done, total or None when unknown).
Progress = Callable[..., None]

_json = msgspec.json.Encoder()


# -- errors ------------------------------------------------------------------------


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``Error: message`` on stderr and exit with ``code``.

    Also when stderr is a pipe whose reader has gone (``2>&1 | head``):
    the failure is still one, whoever reads about it.
    """
    try:
        typer.echo(f"Error: {message}", err=True)
    except BrokenPipeError:
        silence(sys.stderr)
    raise typer.Exit(code)


def usage_error(message: str) -> NoReturn:
    fail(message, 2)


def describe(err: BaseException) -> str:
    """One line for a library or OS error."""
    if isinstance(err, OSError) and not isinstance(err, StorageError) and err.filename:
        return f"{err.filename}: {err.strerror or err}"
    return str(err) or type(err).__name__


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one library call; its errors become ``Error: ...`` and exit code 1."""
    return call(asyncio.run, coro)


def call(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a blocking library function; its errors become ``Error: ...`` and exit 1."""
    try:
        return func(*args, **kwargs)
    except BrokenPipeError as err:
        if stdout_gone():
            raise  # the reader of stdout stopped: exit 0 (cli.main._reader_gone)
        fail(describe(err))
    except (StorageError, OSError) as err:
        fail(describe(err))
    except ImportError as err:
        _missing_driver(err)


def stdout_gone() -> bool:
    """Is stdout a pipe whose reader has closed it?

    A broken pipe elsewhere (a socket to the database) is an error to
    report, not a reader that has had enough.
    """
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, 0)  # POLLERR and POLLHUP are reported whatever is asked for
        # A pipe without its reader reports POLLERR, a socket whose peer has
        # gone POLLHUP (stdout of a systemd socket unit, socat).
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        # No real stdout (a test runner's capture): judge by the error alone.
        return True


def _missing_driver(err: ImportError) -> NoReturn:
    # A postgresql:// target without asyncpg installed; any other ImportError
    # is a bug, and keeps its traceback.
    if err.name != "asyncpg":
        raise err
    fail(str(err))


def store_target(target: str) -> str:
    """The store argument's check: a URL of another scheme is a usage error (exit 2).

    Left alone it would name a directory, and a writing command would make
    a store there (see eventstore.pglog.refuse_other_urls).
    """
    try:
        refuse_other_urls(target)
    except ValidationError as err:
        usage_error(str(err))
    return target


def need_store(target: str) -> None:
    """Refuse a directory that is not a store: missing, or without segment files.

    A writer would make a new, empty store there, and a reader would report
    an empty one; either way the operator most likely meant another path.
    Only ``import-sqlite`` and ``demo`` create stores.  A ``postgresql://``
    URL is checked when the store is opened.
    """
    if is_dsn(target):
        return
    if not os.path.isdir(target):
        not_a_directory(target)
        fail(f"{target}: no such store directory")
    if not call(list_segments, target)[0]:
        below = _stores_below(target)
        hint = f"; stores below it: {', '.join(below)}" if below else ""
        fail(f"{target}: no event store here (no segment files){hint}")


def _stores_below(target: str, most: int = 3) -> list[str]:
    """Up to ``most`` store directories right below ``target`` (data/ holds data/demo).

    Only a hint for an error message: a subdirectory that cannot be read
    (lost+found) is passed over, and the search stops once it has enough.
    """
    found: list[str] = []
    try:
        entries = sorted(os.scandir(target), key=lambda e: e.name)
    except OSError:
        return found
    for entry in entries:
        try:
            if entry.is_dir() and list_segments(entry.path)[0]:
                found.append(entry.path)
        except (OSError, StorageError):
            continue
        if len(found) == most:
            break
    return found


def not_a_directory(target: str) -> None:
    """Refuse a path that exists but is not a directory (a store is one)."""
    if os.path.exists(target) and not os.path.isdir(target):
        fail(f"{target}: is a file, not a store directory")


def shown(target: str) -> str:
    """``target`` as messages name it: a URL without its password."""
    return redact_dsn(target) if is_dsn(target) else target


def postgres_log(target: str, **options: Any) -> PostgresLog:
    """A PostgresLog for ``target``, or exit 1 if asyncpg is not installed."""
    try:
        return PostgresLog(target, **options)
    except ImportError as err:
        fail(str(err))


def open_reader(target: str) -> EventStore:
    """A read-only store on ``target`` (not yet connected).

    On PostgreSQL its log is pinned at the head it finds on connect, so the
    store holds still while the bots append (export needs one state).
    """
    if is_dsn(target):
        log = postgres_log(target, read_only=True, create=False, pin_head=True)
        return EventStore(log, read_only=True)
    return EventStore(target, read_only=True)


@contextlib.asynccontextmanager
async def open_writer(
    directory: str, hint: str, *, create: bool = False, durability: Durability = "fsync"
) -> AsyncIterator[EventStore]:
    """Open ``directory`` (or a ``postgresql://`` URL) as a writer.

    A directory has one writer: while another process holds it, exit 1
    naming that process; ``hint`` is how to do the same from inside the
    bot, e.g. ``await store.compact()``.  Without ``create`` a missing
    directory (or a database without the store's tables) is an error
    instead of a new, empty store.  PostgreSQL has no writer lock: many
    processes write one log, so this works beside running bots.
    """
    if is_dsn(directory):
        store = EventStore(postgres_log(directory, create=create), durability=durability)
        await store.connect()
        try:
            yield store
        finally:
            await store.close()
        return
    if not create:
        need_store(directory)
    not_a_directory(directory)
    store = EventStore(directory, durability=durability)
    try:
        await store.connect()
    except ConnectionError:
        pid = lock_holder(directory)
        if pid is None:
            raise
        who = f"process {pid}" if pid > 0 else "another process"
        fail(
            f"{directory} is open for writing by {who}; "
            f"stop the bot or run this from it with {hint}"
        )
    try:
        yield store
    finally:
        await store.close()


# -- progress ------------------------------------------------------------------------


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator[Progress | None]:
    """A rich progress bar on stderr, or None when stderr is not a terminal.

    The callback takes ``(done, total=None)``; library calls pass it as their
    ``progress`` argument.
    """
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def update(done: int, total: int | None = None) -> None:
            if total is not None:
                bar.update(task, completed=done, total=total)
            else:
                bar.update(task, completed=done)

        yield update


# -- printing ------------------------------------------------------------------------


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON (dataclasses and Structs included)."""
    typer.echo(msgspec.json.format(_json.encode(data), indent=2).decode())


class JsonLines:
    """Write records as JSON lines to stdout, buffered; quiet on a closed pipe."""

    def __init__(self, flush_every: int = 1 << 16) -> None:
        self._buf = bytearray()
        self._flush_every = flush_every

    def write(self, record: Any) -> None:
        self._buf += _json.encode(record)
        self._buf += b"\n"
        if len(self._buf) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        data = bytes(self._buf)
        self._buf.clear()
        write_stdout(data)


def write_stdout(data: bytes) -> None:
    try:
        out = getattr(sys.stdout, "buffer", None)
        if out is not None:
            sys.stdout.flush()
            out.write(data)
            out.flush()
        else:  # pragma: no cover - a text-only stdout
            sys.stdout.write(data.decode())
            sys.stdout.flush()
    except BrokenPipeError:
        reader_gone()
    except OSError as err:  # a full disk behind stdout, as cli.main says for other writes
        fail(f"cannot write to stdout: {err.strerror or err}")


def reader_gone() -> NoReturn:
    """``eventstore dump | head``: the reader has had enough; exit 0."""
    silence(sys.stdout)
    raise typer.Exit(0) from None


def silence(stream: Any) -> None:
    """Point ``stream`` (stdout or stderr) at /dev/null, so the interpreter's
    final flush does not complain of the pipe whose reader has gone."""
    with contextlib.suppress(OSError, ValueError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)


def when(ts: int | None) -> str:
    """A Unix timestamp as ``2025-11-02 14:03:11Z`` (UTC), or ``-``."""
    if ts is None:
        return "-"
    try:
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return str(ts)


def iso(ts: int) -> str:
    """A Unix timestamp as ``2025-11-02T14:03:11Z``, the form ``--at`` takes."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def size(n: int) -> str:
    """Bytes for people: ``512 B``, ``1.5 KiB``, ``3.2 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def plural(n: int, word: str) -> str:
    """``1 segment``, ``3 segments``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def duration(seconds: int) -> str:
    """``3h07m``, ``12m05s``, ``40s``."""
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def table(rows: Sequence[Sequence[object]], headers: Sequence[str], indent: int = 2) -> None:
    """Print aligned columns; numbers are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    numeric = [
        all(isinstance(row[i], int) for row in rows) if rows else False for i in range(len(headers))
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    pad = " " * indent
    for r in cells:
        parts = [
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)
        ]
        typer.echo((pad + "  ".join(parts)).rstrip())


def heading(text: str) -> None:
    typer.echo("")
    typer.echo(text)


# -- the read models, as replay and demo print them -----------------------------------

# Control characters, line and paragraph separators, and bidirectional
# overrides: chat text is written by the channel's viewers, and these would
# reach the operator's terminal as escape sequences or as lines of their own.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with what a terminal would act on shown as ``\\u001b`` escapes."""
    return _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def print_state(state: dict[str, Any], limit: int) -> None:
    """Top chatters, channel peaks, recent chat and user counts (see ReplayResult.summary).

    ``limit`` is the one the lists were cut to: with 0 an empty list says
    nothing about the store.
    """
    none = "  (not listed: --limit 0)" if limit == 0 else None
    heading("top chatters")
    chatters = state["top_chatters"]
    if chatters:
        table(
            [
                (
                    printable(u["username"]),
                    u["total_chat_lines"],
                    duration(u["total_time_connected"]),
                    when(u["first_seen"]),
                    when(u["last_seen"]),
                )
                for u in chatters
            ],
            ("user", "lines", "connected", "first seen", "last seen"),
        )
    else:
        typer.echo(none or "  (no users)")

    heading("channel peaks")
    ch = state["channel_peaks"]
    table(
        [
            ("most in chat", ch["max_users"], when(ch["max_users_timestamp"])),
            ("most connected", ch["max_connected"], when(ch["max_connected_timestamp"])),
        ],
        ("", "users", "at"),
    )

    heading("recent chat")
    chat = state["recent_chat"]
    if chat:
        for m in chat:
            user, text = printable(m["username"]), printable(m["message"])
            typer.echo(f"  {when(m['timestamp'])}  {user}: {text}")
    else:
        typer.echo(none or "  (no messages)")

    if "recent_actions" in state:
        heading("recent actions")
        actions = state["recent_actions"]
        if actions:
            for a in actions:
                details = f" {printable(a['details'])}" if a["details"] is not None else ""
                user, kind = printable(a["username"]), printable(a["action_type"])
                typer.echo(f"  {when(a['timestamp'])}  {user} {kind}{details}")
        else:
            typer.echo(none or "  (no actions)")

    heading("user counts")
    counts = state["user_counts"]
    if not counts["samples"]:
        typer.echo("  (no samples)")
        return
    latest, top_chat, top_conn = (
        counts["latest"],
        counts["max_chat_users"],
        counts["max_connected_users"],
    )
    typer.echo(
        f"  {counts['samples']} samples, "
        f"{when(counts['first_timestamp'])} .. {when(counts['last_timestamp'])}"
    )
    typer.echo(
        f"  latest   {latest['chat_users']} in chat, {latest['connected_users']} connected"
        f" ({when(latest['timestamp'])})"
    )
    typer.echo(
        f"  highest  {top_chat['value']} in chat ({when(top_chat['timestamp'])}), "
        f"{top_conn['value']} connected ({when(top_conn['timestamp'])})"
    )
    typer.echo(
        f"  average  {counts['mean_chat_users']} in chat, "
        f"{counts['mean_connected_users']} connected"
    )
