"""``eventstore replay``: the read models as they were at a past position or moment."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Annotated, Any

import typer

from eventstore.replay import replay as replay_store

from . import output as out
from .inspect import Directory, Json

_DIGITS = re.compile(r"^[0-9]+$")


#: 9999-12-31T23:59:59Z, the last moment an ISO 8601 time can name.
_LAST_SECOND_OF_9999 = 253_402_300_799


def parse_time(text: str) -> int:
    """Unix seconds, or an ISO 8601 time (UTC unless it carries an offset)."""
    text = text.strip()
    if _DIGITS.match(text):
        seconds = int(text)
        if seconds > _LAST_SECOND_OF_9999:
            # Not refused (a store takes any timestamp up to 2**63 - 1), but
            # most likely milliseconds, which would replay every event.
            typer.echo(
                f"note: --at {text} is after the year 9999 in Unix seconds; if it is in "
                f"milliseconds, use {seconds // 1000}",
                err=True,
            )
        return seconds
    iso = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        out.usage_error(
            f"--at: expected Unix seconds or an ISO 8601 time such as 2025-11-02T14:00:00Z, "
            f"got {text!r}"
        )
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    # Whole seconds at or before the moment: int() would round -0.5 up to 0.
    seconds = math.floor(moment.timestamp())
    if seconds < 0:
        out.usage_error(f"--at: {text!r} is before 1970")
    return seconds


def replay(
    directory: Directory = "data",
    until: Annotated[
        int | None,
        typer.Option(
            "--until", min=0, help="Replay up to this position (inclusive).", metavar="POSITION"
        ),
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            help="Replay the events recorded at or before this time: Unix seconds, or ISO 8601"
            " (UTC unless an offset is given).",
            metavar="TIMESTAMP",
        ),
    ] = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit", min=0, help="Rows per list (chatters, chat, actions).", metavar="N"
        ),
    ] = 10,
    json: Json = False,
) -> None:
    """Rebuild the read models from the log up to a point and print what they answer.

    Prints the top chatters, the channel peaks, the recent chat and actions and
    a summary of the user counts, as they were right after position --until,
    or as of the moment --at: every event whose recorded time is at or before
    it, so imported, back-dated history answers too.  Without either, the
    state now.  Read-only: works beside a running bot.

    Example: eventstore replay data/demo --until 800 --limit 5
    """
    if until is not None and at is not None:
        out.usage_error("--until and --at cannot be used together; give a position or a time")
    moment = parse_time(at) if at is not None else None
    out.need_store(directory)

    async def main() -> dict[str, Any]:
        with out.progress_bar("replaying") as progress:
            result = await replay_store(directory, until=until, at=moment, progress=progress)
        async with result:
            return await result.summary(limit)

    state = out.run(main())
    if json:
        out.print_json(state)
        return
    if state["at"] is not None:
        point = f"as of {out.when(state['at'])}"
    elif state["until"] is not None:
        point = f"up to position {state['until']}"
    else:
        point = "now"
    skipped = state["events_skipped"]
    typer.echo(
        f"{state['directory']} {point}: {state['events_applied']} events applied"
        + (f" ({skipped} recorded later skipped)" if skipped else "")
        + f", last position {state['position']} of {state['head']}; {state['users']} users"
    )
    compacted = state["compacted_through"]
    if compacted is not None and (until is not None or moment is not None):
        typer.echo(
            f"note: positions up to {compacted} were compacted; points in that stretch "
            "show only what compaction kept up to them (rows still stored; a user's "
            "final statistics, from their last update on), not the past as it was"
        )
    records = state["records_skipped"]
    if records:
        verb = "is" if records == 1 else "are"
        typer.echo(
            f"note: {out.plural(records, 'statistics record')} (a user's or the channel's "
            f"whole history, written by an import or a compaction) {verb} dated by its "
            "latest moment, after --at, and left out: those users and peaks show as "
            "unknown before it"
        )
    out.print_state(state, limit)
