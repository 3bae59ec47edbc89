"""Read-only commands: info, verify, dump, tail.

None of them takes the writer lock or writes a byte, so all of them work
while the bot is running.  Each takes a store directory or a
``postgresql://`` URL.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Annotated

import msgspec
import typer

from eventstore import ValidationError
from eventstore.events import Event, event_name, event_time
from eventstore.inspect import (
    PostgresInfo,
    StoreInfo,
    check_types,
    event_record,
    postgres_info,
    read_events,
    store_info,
    tail_events,
)
from eventstore.pglog import is_dsn
from eventstore.verify import PostgresVerifyReport, VerifyReport, verify_postgres
from eventstore.verify import verify as verify_store

from . import output as out

Directory = Annotated[
    str,
    typer.Argument(
        help="The store: a directory, or a postgresql:// URL.",
        metavar="DIR|URL",
        callback=out.store_target,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


# -- info -------------------------------------------------------------------------------


def info(directory: Directory = "data", json: Json = False) -> None:
    """Show what a store holds: segments, events by type, time span, snapshots, writer.

    Reads the files directly: takes no lock, changes nothing, and works while
    the bot is writing.  Every frame is checked on the way; damage is listed
    (verify gives the details) and makes the exit code 1.  For a PostgreSQL
    URL: rows by type, positions and times, table size, schema version and
    fingerprint, compactions, all read from the tables in one snapshot.

    Example: eventstore info data/demo
    """
    result: StoreInfo | PostgresInfo
    if is_dsn(directory):
        result = out.run(postgres_info(directory))
    else:
        out.need_store(directory)
        with out.progress_bar("reading") as progress:
            result = out.call(store_info, directory, progress=progress)
    if json:
        out.print_json(result)
    elif isinstance(result, PostgresInfo):
        _print_pg_info(result)
    else:
        _print_info(result)
    if result.problems:
        raise typer.Exit(1)


def _print_pg_info(info: PostgresInfo) -> None:
    echo = typer.echo
    echo(f"store      {info.where}")
    echo(f"schema     {info.schema}, tables version {info.schema_version}")
    echo(f"events     fingerprint {info.fingerprint}, {info.fingerprint_status}")
    echo(
        f"size       {out.size(info.total_size)} (eventstore_events {out.size(info.table_size)}, "
        f"payloads {out.size(info.payload_bytes)})"
    )
    if info.rows == 0:
        echo(f"rows       none, head {info.head}")
    else:
        first = info.first.position if info.first else "?"
        last = info.last.position if info.last else "?"
        echo(f"rows       {info.rows}, positions {first}..{last}, head {info.head}")
        for label, mark in (("first", info.first), ("last", info.last)):
            if mark is not None:
                echo(f"{label:<9}  #{mark.position}  {out.when(mark.time)}  {mark.type}")
        echo(f"recorded   {out.when(info.recorded_first)} .. {out.when(info.recorded_last)}")
    if info.compactions:
        echo(
            f"compacted  {out.plural(info.compactions, 'time')}, last "
            f"{out.when(info.last_compaction)} through position {info.compacted_through}; "
            f"{out.plural(info.deleted, 'position')} deleted"
        )
    else:
        echo("compacted  never")
    if info.counts_by_type:
        out.heading("events by type")
        out.table(list(info.counts_by_type.items()), ("type", "count"))
    if info.problems:
        out.heading("problems (eventstore verify lists them all)")
        for problem in info.problems:
            echo(f"  {problem}")


def _print_info(info: StoreInfo) -> None:
    echo = typer.echo
    echo(f"store      {info.directory}")
    echo(
        f"size       {out.size(info.total_size)} "
        f"({out.plural(len(info.segments), 'segment')}, {out.size(info.segments_size)})"
    )
    if info.first is None or info.last is None:
        echo("events     none")
    else:
        echo(f"events     {info.events}, positions {info.first.position}..{info.last.position}")
        echo(f"first      #{info.first.position}  {out.when(info.first.time)}  {info.first.type}")
        echo(f"last       #{info.last.position}  {out.when(info.last.time)}  {info.last.type}")
        echo(f"times      {out.when(info.earliest_time)} .. {out.when(info.latest_time)}")
    if info.writer_pid is None:
        echo("writer     none")
    elif info.writer_pid > 0:
        echo(f"writer     process {info.writer_pid} holds the lock")
    else:
        echo("writer     a process holds the lock (its pid is unreadable)")
    if not info.snapshots:
        echo("snapshots  none")
    for i, snap in enumerate(info.snapshots):
        label = "snapshots" if i == 0 else ""
        echo(
            f"{label:<9}  {snap.name}  position {snap.position}, {out.size(snap.size)}, "
            f"{snap.status}"
        )
    if info.other_files:
        echo(f"other      {', '.join(info.other_files)}")
    if info.in_progress:
        echo(f"note       the writer was in the middle of writing {info.in_progress} bytes")
    if info.segments:
        out.heading("segments")
        out.table(
            [
                (
                    s.name,
                    out.size(s.size),
                    s.first_position,
                    s.events,
                    "-" if s.last_position is None else str(s.last_position),
                    "compacted" if s.compacted else "",
                )
                for s in info.segments
            ],
            ("name", "size", "first", "events", "last", ""),
        )
    if info.counts_by_type:
        out.heading("events by type")
        out.table(list(info.counts_by_type.items()), ("type", "count"))
    if info.problems:
        out.heading(f"problems (eventstore verify {info.directory} lists them all)")
        for problem in info.problems:
            echo(f"  {problem}")


# -- verify ------------------------------------------------------------------------------


def verify(directory: Directory = "data", json: Json = False) -> None:
    """Check every frame checksum, every event, position continuity and the snapshots.

    Lists each problem with its file and byte offset; after a bad frame it
    carries on with the next segment, so one run shows all the damage it can
    reach.  Exit code 1 if anything is wrong.  Safe while the bot is writing.
    To cut a damaged log back to its last good frame: eventstore repair.

    A PostgreSQL URL is checked row by row, in one snapshot: every payload
    decodes, its tag and username agree with the row's columns, positions run
    from 1 to the head with gaps only where compaction recorded deleting
    rows.  Each problem names the row's position.

    Example: eventstore verify data/demo
    """
    report: VerifyReport | PostgresVerifyReport
    if is_dsn(directory):
        with out.progress_bar("verifying") as progress:
            report = out.run(verify_postgres(directory, progress=progress))
    else:
        out.need_store(directory)
        with out.progress_bar("verifying") as progress:
            report = out.call(verify_store, directory, progress=progress)
    if json:
        data = dataclasses.asdict(report)
        data["ok"] = report.ok
        out.print_json(data)
    elif isinstance(report, PostgresVerifyReport):
        _print_pg_report(report)
    else:
        _print_report(report)
    if not report.ok:
        raise typer.Exit(1)


def _print_pg_report(report: PostgresVerifyReport) -> None:
    span = (
        f", positions {report.first_position}..{report.last_position}"
        if report.first_position is not None
        else ""
    )
    deleted = (
        f"; {out.plural(report.deleted, 'position')} deleted by "
        f"{out.plural(report.compactions, 'compaction')}"
        if report.compactions
        else ""
    )
    typer.echo(
        f"checked {report.where}: {out.plural(report.rows, 'row')}{span}, head {report.head} "
        f"({out.size(report.bytes)}){deleted}"
    )
    for note in report.notes:
        typer.echo(f"note: {note}")
    for problem in report.problems:
        typer.echo(f"problem: {problem}")
    n = len(report.problems)
    typer.echo(f"{out.plural(n, 'problem')} found" if n else "ok")


def _print_report(report: VerifyReport) -> None:
    span = (
        f", positions {report.first_position}..{report.last_position}"
        if report.first_position is not None
        else ""
    )
    typer.echo(
        f"checked {out.plural(report.segments, 'segment')}, {out.plural(report.frames, 'frame')}, "
        f"{out.plural(report.events, 'event')}{span} ({out.size(report.bytes)})"
        + (
            ""
            if report.snapshots_checked is None
            else f"; {out.plural(report.snapshots_checked, 'snapshot')}"
        )
    )
    for note in report.notes:
        typer.echo(f"note: {note}")
    for problem in report.problems:
        typer.echo(f"problem: {problem}")
    n = len(report.problems)
    typer.echo(f"{out.plural(n, 'problem')} found" if n else "ok")


# -- dump -------------------------------------------------------------------------------


def dump(
    directory: Directory = "data",
    start: Annotated[
        int, typer.Option("--from", min=0, help="First position to print.", metavar="POS")
    ] = 1,
    stop: Annotated[
        int | None,
        typer.Option("--to", min=0, help="Last position to print (inclusive).", metavar="POS"),
    ] = None,
    types: Annotated[
        list[str] | None,
        typer.Option(
            "--type", help="Only events of this type (snake_case; repeatable).", metavar="TYPE"
        ),
    ] = None,
    user: Annotated[
        str | None,
        typer.Option("--user", help="Only events whose username is NAME.", metavar="NAME"),
    ] = None,
) -> None:
    """Print stored events as JSON lines: position, type, then the event's fields.

    Filters combine: a position range, one or more event types (names such as
    message_saved or user_action_logged), and a username.  Read-only; works
    on a directory or a PostgreSQL URL.

    Example: eventstore dump data/demo --type message_saved --user ada --from 1000
    """
    if stop is not None and stop < start:
        out.usage_error(f"--to {stop} is before --from {start}: the range is empty")
    if types:
        try:
            check_types(types)
        except ValidationError as err:
            out.usage_error(str(err))
    out.need_store(directory)
    lines = out.JsonLines()

    async def main() -> None:
        with out.progress_bar("dumping") as progress:
            async with contextlib.aclosing(
                read_events(
                    directory, start=start, stop=stop, types=types, user=user, progress=progress
                )
            ) as events:
                async for position, event in events:
                    lines.write(event_record(position, event))
        lines.flush()

    out.run(main())


# -- tail -------------------------------------------------------------------------------


def tail(
    directory: Directory = "data",
    count: Annotated[
        int, typer.Option("-n", "--lines", min=0, help="How many events.", metavar="N")
    ] = 10,
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="Keep printing new events until Ctrl-C.")
    ] = False,
    json: Json = False,
) -> None:
    """Print the last events; with -f keep printing new ones as the bot writes them.

    Following opens the store read-only and picks up new frames every half
    second; it never gets in the bot's way.  On a PostgreSQL URL it is woken
    by the writers' notifications (LISTEN/NOTIFY) as soon as they commit.
    Stop it with Ctrl-C.  Text lines are position, time, type and fields;
    --json prints the lines of dump.

    Example: eventstore tail data/demo -n 20 -f
    """
    out.need_store(directory)
    lines = out.JsonLines()

    async def main() -> None:
        async with contextlib.aclosing(tail_events(directory, count, follow=follow)) as events:
            async for position, event in events:
                if json:
                    lines.write(event_record(position, event))
                else:
                    out.write_stdout(_line(position, event).encode() + b"\n")
                if follow:
                    lines.flush()
        lines.flush()

    try:
        out.run(main())
    except KeyboardInterrupt:
        # Ctrl-C is how a follower is meant to stop: no traceback, exit 0.
        lines.flush()
        raise typer.Exit(0) from None


_fields = msgspec.json.Encoder()


def _line(position: int, event: Event) -> str:
    # JSON escapes only the C0 controls; DEL, the C1 controls (an 8-bit CSI
    # moves the cursor too), line separators and direction overrides that
    # viewers wrote would reach the terminal as they are.
    fields = msgspec.structs.asdict(event)
    return (
        f"{position:>8}  {out.when(event_time(event))}  {event_name(event):<20}  "
        f"{out.printable(_fields.encode(fields).decode())}"
    )
