"""``eventstore demo``: a simulated busy channel, then what the store answers."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from eventstore.demo import DemoSummary, play
from eventstore.inspect import directory_size
from eventstore.replay import replay as replay_store

from . import output as out
from .inspect import Json

DEMO_DIR = "data/demo"


def demo(
    directory: Annotated[
        str, typer.Argument(help="Where to keep the demo store.", metavar="DIR")
    ] = DEMO_DIR,
    minutes: Annotated[
        int, typer.Option("--minutes", min=1, help="Simulated minutes to play.", metavar="MINUTES")
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
    prints what the store answers: top chatters, peaks, recent chat and user
    counts.  The store persists: running the demo again appends a later
    stretch to it.  For speed the demo writes with durability flush (safe if
    the process dies, not if the machine loses power); the bot's default is
    fsync.

    Example: eventstore demo data/demo --minutes 180
    """

    async def main() -> tuple[DemoSummary, dict[str, Any]]:
        async with out.open_writer(
            directory, "eventstore.demo.play(store)", create=True, durability="flush"
        ) as store:
            summary = await play(store, minutes=minutes, seed=seed)
        # Read the answers back from disk: what any later start of the bot sees.
        async with await replay_store(directory) as result:
            return summary, await result.summary(limit)

    summary, state = out.run(main())
    total = directory_size(directory)
    if json:
        out.print_json(
            {
                "directory": directory,
                "size": total,
                "played": {
                    "seed": summary.seed,
                    "minutes": summary.minutes,
                    "start": summary.start,
                    "end": summary.end,
                    "first_position": summary.first_position + 1,
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
        f"{summary.first_position + 1}..{summary.last_position}"
    )
    echo("")
    echo(f"what the store answers now ({state['position']} events, {state['users']} users):")
    out.print_state(state)
    echo("")
    echo(f"store: {directory} ({out.size(total)}), written with durability flush")
    echo(
        "It persists: run the demo again to append another stretch, or look inside with\n"
        f"  eventstore info {directory}\n"
        f"  eventstore tail {directory} -n 5\n"
        f"  eventstore replay {directory} --at {out.iso(summary.start + summary.minutes * 30)}"
    )
