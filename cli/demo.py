"""``eventstore demo``: a simulated busy channel, then what the store answers."""

from __future__ import annotations

import os
import shlex
from typing import Annotated, Any

import typer

from eventstore.demo import MAX_MINUTES, DemoSummary, check_demo_store, play
from eventstore.inspect import directory_size, postgres_info
from eventstore.pglog import is_dsn
from eventstore.replay import replay as replay_store
from eventstore.segment import list_segments

from . import output as out
from .inspect import Json

DEMO_DIR = "data/demo"


def demo(
    directory: Annotated[
        str,
        typer.Argument(
            help="Where to keep the demo store: a directory or a postgresql:// URL.",
            metavar="DIR|URL",
            callback=out.store_target,
        ),
    ] = DEMO_DIR,
    minutes: Annotated[
        int,
        typer.Option(
            "--minutes",
            min=1,
            max=MAX_MINUTES,
            help="Simulated minutes to play (at most a year).",
            metavar="MINUTES",
        ),
    ] = 120,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", help="Pick the channel (default: the store's position).", metavar="SEED"
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=0, help="Rows per list printed.", metavar="N")
    ] = 5,
    json: Json = False,
) -> None:
    """Play a simulated couple of hours of a busy channel into a store, then query it.

    Viewers join and leave (with sessions), chat, send the bot private
    commands; every five simulated minutes the bot logs the user counts and
    raises the channel peaks.  All of it goes through the same calls the bot
    makes, with simulated timestamps, so it takes a second or two.  Then it
    prints what the store answers: top chatters, peaks, recent chat and
    actions, and user counts.  The store persists: running the demo again
    appends a later stretch to it.  A store that knows users the demo does
    not play (the bot's own store, named by a slip) is refused, with nothing
    written.  For speed the demo writes with durability flush (safe if the
    process dies, not if the machine loses power); the bot's default is
    fsync.  Given a PostgreSQL URL it plays into that database instead
    (creating the store's tables if needed; durability is then the server's).

    Example: eventstore demo data/demo --minutes 180
    """
    postgres = is_dsn(directory)
    where = out.shown(directory)

    async def main() -> tuple[DemoSummary, dict[str, Any], int]:
        if not postgres and os.path.isdir(directory) and list_segments(directory)[0]:
            # Asked read-only first: a writer's open and close (recovery, a
            # snapshot) would change the files of a store the demo refuses.
            async with out.open_reader(directory) as reader:
                check_demo_store(reader)
        async with out.open_writer(
            directory, "await eventstore.demo.play(store)", create=True, durability="flush"
        ) as store:
            summary = await play(store, minutes=minutes, seed=seed)
        # Read the answers back from disk: what any later start of the bot sees.
        async with await replay_store(directory) as result:
            state = await result.summary(limit)
        size = (await postgres_info(directory)).total_size if postgres else 0
        return summary, state, size

    try:
        summary, state, total = out.run(main())
    except KeyboardInterrupt:
        # The store was closed on the way out (its snapshot written): what was
        # played is kept, and the next run continues after it.  Say so, or
        # the operator is left guessing whether the store is half written.
        # A URL is shown without its password, so not as a command to paste.
        again = "the demo on the same URL" if postgres else f"eventstore demo {shlex.quote(where)}"
        typer.echo(
            f"interrupted: {where} keeps what was played so far; {again} continues after it",
            err=True,
        )
        raise SystemExit(130) from None
    if not postgres:
        total = directory_size(directory)
    if json:
        out.print_json(
            {
                "directory": where,
                "size": total,
                "played": {
                    "seed": summary.seed,
                    "minutes": summary.minutes,
                    "start": summary.start,
                    "end": summary.end,
                    "first_position": summary.position_before + 1,
                    "last_position": summary.last_position,
                    "events": summary.events,
                    "joins": summary.joins,
                    "leaves": summary.leaves,
                    "chat_lines": summary.chat_lines,
                    "pm_commands": summary.pm_commands,
                    "user_count_samples": summary.samples,
                    "peaks_raised": summary.peaks_raised,
                    "viewers": len(summary.viewers),
                },
                "answers": state,
            }
        )
        return
    echo = typer.echo
    echo(
        f"played {summary.minutes} simulated minutes of a busy channel (seed {summary.seed}), "
        f"{out.when(summary.start)} .. {out.when(summary.end)}"
    )
    echo(
        f"  {len(summary.viewers)} viewers: {summary.joins} joins, {summary.leaves} leaves, "
        f"{summary.chat_lines} chat lines, {summary.pm_commands} PM commands, "
        f"{summary.samples} user counts, {summary.peaks_raised} new peaks"
    )
    echo(
        f"  {summary.events} events appended, positions "
        f"{summary.position_before + 1}..{summary.last_position}"
    )
    echo("")
    echo(f"what the store answers now ({state['position']} events, {state['users']} users):")
    out.print_state(state, limit)
    echo("")
    if postgres:
        echo(f"store: {where} ({out.size(total)})")
    else:
        echo(f"store: {where} ({out.size(total)}), written with durability flush")
    arg = shlex.quote(where)
    echo(
        "It persists: run the demo again to append another stretch, or look inside with\n"
        f"  eventstore info {arg}\n"
        f"  eventstore tail {arg} -n 5\n"
        f"  eventstore replay {arg} --at {out.iso(summary.start + summary.minutes * 30)}"
    )
