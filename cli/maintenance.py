"""Commands that write: compact, snapshot, forget-user, repair.

Each opens the store as its writer, so on a directory each refuses while the
bot has it open (one writer per store, held by a lock): the message names the
bot's process and the call to make from inside the bot instead.  A
PostgreSQL store has no such lock (many processes write one log), so there
they run beside the bots.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import msgspec
import typer

from eventstore import EventStore
from eventstore.compaction import pending_commit
from eventstore.lockfile import lock_holder
from eventstore.pgcompaction import PostgresCompactReport
from eventstore.pglog import is_dsn
from eventstore.recovery import repair as repair_store
from eventstore.validation import MAX_INT

from . import output as out
from .inspect import Directory, Json

#: The store argument of the commands that work on a directory only.
StoreDirectory = Annotated[
    str,
    typer.Argument(
        help="The store's directory (not a URL).", metavar="DIR", callback=out.store_target
    ),
]


def compact(
    directory: Directory = "data",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would change; change nothing.")
    ] = False,
    keep_history: Annotated[
        int | None,
        typer.Option(
            "--keep-history",
            min=0,
            max=MAX_INT,
            help="Also drop user counts older than DAYS days.",
            metavar="DAYS",
        ),
    ] = None,
    json: Json = False,
) -> None:
    """Rewrite the log without the events no read needs any more.

    Cleared messages, forgotten users and superseded statistics are dropped;
    every read returns the same before and after, and the store checks that
    before it replaces anything (if not, it changes nothing and the exit code
    is 1).  Positions, and so ids, never change.  Needs the bot stopped, or
    call await store.compact() from the bot; --dry-run only reads, and runs
    beside the bot.

    On a PostgreSQL URL it deletes those rows (and rewrites each user's last
    statistics row as absolute values) in one transaction, which takes the
    append lock at its end, to prove under it that no read changes.  The
    bots may keep running: their appends wait only for that proof.

    Example: eventstore compact data/demo --dry-run
    """
    out.need_store(directory)

    async def main() -> Any:
        if dry_run:
            # Read-only: no lock taken (it runs beside the bot), no recovery,
            # no snapshot written on close: a dry run changes no file.  On
            # PostgreSQL no writer's open either (it may record its schema's
            # fingerprint), and no pinned head: the plan reads up to the head
            # it finds in the table.
            reader = (
                EventStore(
                    out.postgres_log(directory, read_only=True, create=False), read_only=True
                )
                if is_dsn(directory)
                else out.open_reader(directory)
            )
            async with reader as store:
                with out.progress_bar("compacting (dry run)") as progress:
                    return await store.compact(
                        dry_run=True, keep_history_days=keep_history, progress=progress
                    )
        # The call the refusal names carries the options given.
        call = "await store.compact()"
        if keep_history is not None:
            call = f"await store.compact(keep_history_days={keep_history})"
        async with out.open_writer(directory, call) as store:
            with out.progress_bar("compacting") as progress:
                return await store.compact(
                    dry_run=dry_run, keep_history_days=keep_history, progress=progress
                )

    # An IntegrityError (compaction would change a read) exits 1 through out.run.
    report = out.run(main())
    if json:
        out.print_json(_plain(report))
        return
    if isinstance(report, PostgresCompactReport):
        _print_pg_report(report)
        return
    if not report.segments_rewritten:
        typer.echo(
            f"{'dry run: ' if report.dry_run else ''}nothing to compact: the sealed segments "
            f"({out.size(report.bytes_before)}) hold nothing to drop; "
            f"{'nothing was changed' if report.dry_run else 'no segment was rewritten'}"
        )
        return
    verb = "would rewrite" if report.dry_run else "rewrote"
    typer.echo(
        f"{'dry run: ' if report.dry_run else ''}{verb} "
        f"{out.plural(report.segments_rewritten, 'segment')}: "
        f"{out.size(report.bytes_before)} -> {out.size(report.bytes_after)}, "
        f"{report.events_dropped} events dropped"
    )
    if report.dropped_by_type:
        out.table(sorted(report.dropped_by_type.items()), ("type", "dropped"))
    if report.dry_run:
        typer.echo("nothing was changed")


def _print_pg_report(report: PostgresCompactReport) -> None:
    if not (report.events_dropped or report.rows_rewritten):
        typer.echo(
            f"{'dry run: ' if report.dry_run else ''}nothing to compact: positions "
            f"1..{report.through_position} hold nothing to drop; nothing was changed"
        )
        return
    verbs = ("would delete", "rewrite") if report.dry_run else ("deleted", "rewrote")
    typer.echo(
        f"{'dry run: ' if report.dry_run else ''}positions 1..{report.through_position}: "
        f"{verbs[0]} {out.plural(report.events_dropped, 'row')}, {verbs[1]} "
        f"{report.rows_rewritten} as absolute statistics; payloads "
        f"{out.size(report.bytes_before)} -> {out.size(report.bytes_after)}"
    )
    if report.dropped_by_type:
        out.table(sorted(report.dropped_by_type.items()), ("type", "deleted"))
    typer.echo(
        "nothing was changed"
        if report.dry_run
        else "PostgreSQL reuses the table's space after (auto)vacuum; "
        "REINDEX TABLE CONCURRENTLY returns its indexes' (see docs/cli.md)"
    )


def _plain(report: Any) -> dict[str, Any]:
    """The report's fields, plus ``events_dropped`` (a property, so not a field)."""
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        data = dataclasses.asdict(report)
    else:
        data = dict(msgspec.to_builtins(report))
    data["events_dropped"] = report.events_dropped
    return data


def snapshot(
    directory: StoreDirectory = "data",
) -> None:
    """Save the read models now, so the next start replays only what follows.

    The store also snapshots on close and every 100,000 events; this is for
    before a planned restart of a long-running store.  Needs the bot stopped,
    or call await store.write_snapshot() from the bot.

    A PostgreSQL store keeps no snapshots (every process replays the log on
    connect); on a URL this refuses with exit code 1.

    Example: eventstore snapshot data/demo
    """
    if is_dsn(directory):
        out.fail(
            "PostgreSQL stores keep no snapshots: every process replays the log when it connects"
        )
    out.need_store(directory)

    async def main() -> tuple[str, int]:
        async with out.open_writer(directory, "await store.write_snapshot()") as store:
            return await store.write_snapshot(), store.position

    path, position = out.run(main())
    typer.echo(f"wrote {path} (position {position})")


def forget_user(
    directory: Directory,
    name: Annotated[str, typer.Argument(help="The username to forget.", metavar="NAME")],
) -> None:
    """Erase a user from every read: statistics, actions and chat lines.

    Appends a UserForgotten event (reads stop returning the user at once) and
    compaction then removes the user's events from the files.  Needs the bot
    stopped, or call await store.forget_user(name) from the bot.  A user the
    store keeps nothing of is reported and nothing is written.  A user no
    read returns may still be in the files (chat lines cleared from the
    reads, a forget whose compaction was interrupted): compaction erases
    them.  On a
    PostgreSQL URL compaction deletes every row of the user, the
    UserForgotten row too, and the bots may keep running.

    Example: eventstore forget-user data/demo ada
    """
    out.need_store(directory)

    async def main() -> bool:
        if not is_dsn(directory) and pending_commit(directory) is None:
            # Asked read-only first: for a name the store does not know, the
            # writer's open (recovery, a snapshot on close) would change files.
            # (Not while a compaction's switch is unfinished: a reader cannot
            # open the store then, and the writer's open finishes it.)
            async with out.open_reader(directory) as reader:
                if not reader.knows_user(name) and not await reader.erasure_unfinished(name):
                    return False
        async with out.open_writer(directory, f"await store.forget_user({name!r})") as store:
            with out.progress_bar(f"forgetting {out.printable(name)}") as progress:
                return await store.forget_user(name, progress=progress)

    where = out.shown(directory)
    if out.run(main()):
        typer.echo(f"forgot {name!r}: no read of {where} returns anything of them any more")
    else:
        typer.echo(f"nothing to forget: {where} holds nothing of {name!r}; nothing written")


# -- repair ------------------------------------------------------------------------------------


def repair(
    directory: StoreDirectory = "data",
    json: Json = False,
) -> None:
    """Cut a damaged log back to its last good frame, keeping copies of what is cut.

    The store refuses to open past damage (a flipped byte, a bad sector): it
    never skips events.  This is the explicit way on.  The segment holding
    the first damage verify reports is copied to NAME.broken and cut at its
    last good frame; the segments after it are renamed to NAME.broken (their
    positions would follow a gap).  Their events are then no longer in the
    store: keep the copies until you have looked at them.  A store without
    damage is left as it is.  Needs the bot stopped (it takes the writer
    lock).  A PostgreSQL store has no segments to cut; on a URL this refuses
    with exit code 1.

    Example: eventstore repair data/demo
    """
    if is_dsn(directory):
        out.fail(
            "PostgreSQL stores are not repaired by cutting: eventstore verify names the "
            "rows that do not decode"
        )
    out.need_store(directory)
    pid = lock_holder(directory)
    if pid is not None:
        # Not "run this from the bot", as the other writing commands say: a
        # store that needs repair does not open, so its holder is some other
        # writer, to stop first.
        who = f"process {pid}" if pid > 0 else "another process"
        out.fail(f"{directory} is open for writing by {who}; stop it first; nothing was changed")
    report = out.call(repair_store, directory)
    if json:
        out.print_json(
            {
                "directory": directory,
                "repaired": report.repaired,
                "damage": dataclasses.asdict(report.damage) if report.damage else None,
                "bytes_cut": report.bytes_cut,
                "set_aside": report.set_aside,
                "compaction": report.compaction,
            }
        )
        return
    if report.compaction:
        typer.echo(f"first {report.compaction}")
    damage = report.damage
    if damage is None:
        typer.echo(f"{directory}: no damage found; nothing was cut")
        return
    typer.echo(f"damage: {damage}")
    typer.echo(
        f"cut {out.size(report.bytes_cut)}: the log now ends at position "
        f"{damage.last_good_position}"
    )
    for path in report.set_aside:
        typer.echo(f"  kept a copy: {path}")
