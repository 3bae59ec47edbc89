"""Moving data in and out: import-sqlite, export."""

from __future__ import annotations

import contextlib
import enum
import os
import shutil
from typing import Annotated, Any, NoReturn

import typer

from eventstore import EventStore
from eventstore.compaction import pending_commit
from eventstore.errors import StorageError
from eventstore.importmarker import (
    IMPORTING,
    IMPORTING_MORE,
    remove_marker,
    write_marker,
)
from eventstore.legacy import (
    ImportReport,
    LegacyReader,
    StoreNotEmptyError,
    export_jsonl,
    export_sqlite,
)
from eventstore.legacy import import_sqlite as import_legacy
from eventstore.lockfile import lock_holder
from eventstore.pglog import is_dsn
from eventstore.recovery import undo_import
from eventstore.segment import list_segments

from . import output as out
from .inspect import Directory, Json


def import_sqlite(
    db: Annotated[str, typer.Argument(help="The bot's legacy SQLite file.", metavar="DB")],
    directory: Directory = "data",
    force: Annotated[
        bool,
        typer.Option("--force", help="Import into a store that already holds events (adds to it)."),
    ] = False,
    json: Json = False,
) -> None:
    """Import the bot's legacy SQLite database into a store (created if missing).

    Statistics become absolute values; actions, user counts and chat keep
    their timestamps and order but get new ids (their log positions).  The
    whole file is checked before anything is written.  Tables the store does
    not keep (current_status, outbound_messages, api_tokens) are reported.
    A store that already holds events is refused unless --force.  A
    PostgreSQL URL gets the store's tables if it has none yet.  An import
    into a directory that stops half-way (Ctrl-C, a full disk; a kill is
    undone by the next import there) removes what it wrote, so the store
    holds what it held before; into a database it says what the store holds.

    Example: eventstore import-sqlite bot.db data/bot
    """
    if not os.path.isfile(db):
        if os.path.isdir(db):
            out.fail(f"{db}: is a directory")
        out.fail(f"{db}: not a regular file" if os.path.exists(db) else f"{db}: no such file")

    def check_file() -> int:
        with LegacyReader(db) as legacy:
            return legacy.validate()

    # Checked before the store is opened: a file that cannot be imported must
    # not leave a new, empty store (or PostgreSQL tables) behind.  The import
    # checks it again, an extra read of about two seconds a million rows.
    with out.progress_bar("checking the file"):
        events = out.call(check_file)

    # A directory this run creates (or finds empty) is removed again if the
    # import stops half-way, and what it added to a store that held events
    # is cut away: the file is then imported anew, with no half-import in
    # the way.
    where = out.shown(directory)
    if not is_dsn(directory) and os.path.isdir(directory) and lock_holder(directory) is None:
        _undo_killed_import(directory, where)
    fresh = not is_dsn(directory) and (
        not os.path.exists(directory) or (os.path.isdir(directory) and not os.listdir(directory))
    )
    made = not os.path.exists(directory)
    opened: list[EventStore] = []
    marker: list[str] = []  # the marker this run wrote, if it did
    before = acked = 0  # the store's position first; the file's events acknowledged
    refused = whole = False

    def not_empty(position: int) -> NoReturn:
        new = "an empty database or schema" if is_dsn(directory) else "a new directory"
        out.fail(
            f"{where} is not empty (its last event is at position "
            f"{position}); import into {new}, or pass --force "
            "to add the file's data to it"
        )

    async def main() -> ImportReport:
        nonlocal before, refused, whole
        call = f"await import_sqlite(store, {db!r}{', force=True' if force else ''})"
        if (
            not force
            and not is_dsn(directory)
            and os.path.isdir(directory)
            and list_segments(directory)[0]
            and pending_commit(directory) is None
            and lock_holder(directory) is None
        ):
            # Asked read-only first, as forget-user and demo do: a writer's
            # open and close (a torn tail cut, a snapshot written) would
            # change the files of a store the import then refuses.  (Not
            # while another process holds it: the writer's open then says
            # who, where this would count a running import's events.)
            async with out.open_reader(directory) as reader:
                if reader.position:
                    refused = True
                    not_empty(reader.position)
        async with out.open_writer(directory, call, create=True) as store:
            opened.append(store)
            before = store.position
            if not is_dsn(directory) and (fresh or force or not before):
                # Until the import is whole: a run killed before then (no
                # chance to undo what it wrote) is recognised by the next.
                marker.append(write_marker(directory, None if fresh else before))
            with out.progress_bar("importing", events) as bar:

                def progress(done: int) -> None:
                    nonlocal acked
                    acked = done
                    if bar is not None:
                        bar(done)

                try:
                    report = await import_legacy(store, db, force=force, progress=progress)
                    whole = True
                    if marker:
                        remove_marker(marker[0])
                        marker.clear()
                    return report
                except StoreNotEmptyError:
                    refused = True
                    not_empty(store.position)

    try:
        report = out.run(main())
    except (KeyboardInterrupt, typer.Exit) as err:
        # main() never exits 0.  For an error, its Error: line is printed
        # already; this one says what the store holds now.
        if refused:
            raise
        if whole:
            # Every event is durable ("fsync"): what failed came after (the
            # marker's removal, closing the store), and nothing is undone.
            if marker and os.path.exists(marker[0]):
                out.fail(
                    f"the import is whole, but {marker[0]} could not be removed, and keeps "
                    "writers out of the store: delete it"
                )
            out.fail(f"the import is whole: {where} holds every event of the file")
        stopped = "was interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        if is_dsn(directory):
            # Other processes write the same log: its position says nothing
            # of this import.  What the store acknowledged does, but for the
            # batch in flight, which its transaction may have committed.
            if not opened:
                raise
            out.fail(
                f"the import {stopped} after {acked} of the file's events were committed "
                f"(and perhaps the batch then in flight); {where} holds that part of the "
                "file, not the rest; to have the file whole, import it into an empty "
                "database or schema"
            )
        after = opened[0].position if opened else before
        if after == before:
            if fresh and os.path.isdir(directory):
                # Nothing of the file, but the directory (and its LOCK, or an
                # empty first segment) may be this run's: a new store that
                # could not even be created (a full disk) is not left behind.
                _remove_partial(directory, made)
            elif marker:
                # Cuts nothing, unless the log kept part of a failed write.
                out.call(undo_import, directory, before)
            if isinstance(err, KeyboardInterrupt):
                out.fail(f"the import was interrupted; nothing was written to {where}")
            raise
        # Interrupted, the store closes as usual and writes the batch in
        # flight: its position is what the log holds.  A failed write stops
        # the store with its batch applied to the read models (so counted
        # in its position) but taken back from the log: the log holds what
        # was acknowledged.
        held = after if isinstance(err, KeyboardInterrupt) else before + acked
        if fresh:
            _remove_partial(directory, made)
            out.fail(
                f"the import {stopped} after {held - before} events; the store it had begun "
                f"in {where} was removed, so nothing of the file is kept"
            )
        if held == before:
            if marker:
                out.call(undo_import, directory, before)
            out.fail(f"the import {stopped}; nothing of the file was written to {where}")
        try:
            undone = undo_import(directory, before)
        except (OSError, StorageError) as cut_err:
            why = out.describe(cut_err)
            if lock_holder(directory) == os.getpid():
                why = "this process still holds the store: it was interrupted again as it closed"
            out.fail(
                f"the import {stopped}: {where} holds the part of the file written before "
                f"that (positions {before + 1}..{held}), and it could not be removed "
                f"({why}); {IMPORTING_MORE} stays, so writers refuse the store until the "
                "next import-sqlite into it removes that part"
            )
        if undone is None:
            out.fail(
                f"the import {stopped} after {held - before} events, and another import-sqlite "
                f"into {where} has undone them since"
            )
        out.fail(
            f"the import {stopped} after {held - before} events; they were removed again, "
            f"so {where} holds what it held before (up to position {before})"
        )
    if json:
        out.print_json(report)
        return
    span = (
        f" (positions {report.first_position}..{report.first_position + report.events - 1})"
        if report.first_position is not None
        else ""
    )
    typer.echo(f"imported {report.path} into {where}: {report.events} events{span}")
    for line in report.describe():
        typer.echo(f"  {line}")


def _undo_killed_import(directory: str, where: str) -> None:
    """Undo what an import killed outright (SIGKILL, a power cut) left, as its marker says.

    Such a run could not undo it itself.  A new store it had begun holds
    only part of the file: removed, to start again as into an empty
    directory.  What it added to a store that held events is cut away.
    """
    if os.path.isfile(os.path.join(directory, IMPORTING)):
        _remove_partial(directory, made=False)
        typer.echo(
            f"warning: {where} held an import a killed run left unfinished; "
            "removed it, importing anew",
            err=True,
        )
        return
    if not os.path.isfile(os.path.join(directory, IMPORTING_MORE)):
        return  # (looked at before the lock is taken: that makes a LOCK file)
    before = out.call(undo_import, directory)
    if before is None:
        return  # another run undid it meanwhile
    typer.echo(
        f"warning: {where} held part of a file that an import killed before it finished "
        f"had added after position {before}; removed it",
        err=True,
    )


def _remove_partial(directory: str, made: bool) -> None:
    """Remove a store an import began: the directory it made, or what it put in an empty one."""
    try:
        if made:
            shutil.rmtree(directory)
            return
        for entry in os.scandir(directory):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    except OSError as err:
        out.fail(
            f"the import stopped, and its partial store {directory} could not be removed: "
            f"{out.describe(err)}; delete it before importing again"
        )


class Format(str, enum.Enum):
    jsonl = "jsonl"
    sqlite = "sqlite"


def export(
    directory: Directory,
    format: Annotated[
        Format, typer.Option("--format", help="jsonl: every event; sqlite: the legacy schema.")
    ],
    target: Annotated[
        str, typer.Argument(help="The file to create ('-' for stdout, jsonl only).", metavar="OUT")
    ],
) -> None:
    """Export a store: every event as JSON lines, or what its reads return as legacy SQLite.

    jsonl writes the lines of dump, for every event in the log.  sqlite writes
    a new file with the bot's legacy schema (ids kept), built under a temporary
    name and renamed when complete.  Neither overwrites an existing file.
    Read-only: works beside a running bot.  From a PostgreSQL URL it exports
    the log as it was when the export began; what the bots append meanwhile
    is left out, and a compaction committed meanwhile fails it (export again).

    Example: eventstore export data/demo --format sqlite backup.db
    """
    out.need_store(directory)
    to_stdout = target == "-"
    if not target:
        out.usage_error("OUT is empty; give a file name, or '-' for stdout")
    if to_stdout and format is Format.sqlite:
        out.usage_error("--format sqlite needs a file name, not '-'")
    if not to_stdout and os.path.lexists(target):
        out.fail(f"{target}: already exists; refusing to overwrite it")
    folder = os.path.dirname(target) or "."
    if not to_stdout and not os.path.isdir(folder):
        what = "not a directory" if os.path.exists(folder) else "no such directory"
        out.fail(f"{target}: {what}: {folder}")

    async def main() -> dict[str, int]:
        async with out.open_reader(directory) as store:
            if format is Format.jsonl:
                total = store.position  # a line per event
            else:
                # A row per user, the channel's, and one per history row the
                # reads return.
                proj = store.projections
                total = (
                    len(proj.user_stats.users)
                    + 1
                    + len(proj.actions.all)
                    + len(proj.counts.index)
                    + len(proj.messages.index)
                )
            with out.progress_bar("exporting", total=total) as progress:
                if format is Format.sqlite:
                    return await export_sqlite(store, target, progress=progress)
                if to_stdout:
                    return {"events": await export_jsonl(store, _Counting(_stdout(), progress))}
                with _exclusive(target) as f:
                    return {"events": await export_jsonl(store, _Counting(f, progress))}

    counts = out.run(main())
    summary = ", ".join(f"{n} {what}" for what, n in counts.items())
    typer.echo(
        f"exported {out.shown(directory)} to {'stdout' if to_stdout else target}: {summary}",
        err=to_stdout,
    )


class _Counting:
    """A binary writer that reports lines written (one line per event)."""

    def __init__(self, f: Any, progress: Any) -> None:
        self._f = f
        self._progress = progress
        self._lines = 0

    def write(self, data: bytes) -> None:
        self._f.write(data)
        if self._progress is not None:
            self._lines += data.count(b"\n")
            self._progress(self._lines)


class _Stdout:
    """Binary stdout whose failures read as such: a reader gone is exit 0, a
    full disk ``Error: cannot write to stdout: ...`` (see out.write_stdout)."""

    def write(self, data: bytes) -> None:
        out.write_stdout(data)


def _stdout() -> Any:
    return _Stdout()


@contextlib.contextmanager
def _exclusive(path: str) -> Any:
    """Create ``path`` (never replacing a file); remove it again if the export fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(path)
        if type(err) is OSError and err.filename is None:
            # write() and fsync() name no file: "Error: [Errno 28] No space
            # left on device" alone does not say which (the store's, or OUT).
            raise OSError(err.errno, err.strerror, path) from err
        raise
