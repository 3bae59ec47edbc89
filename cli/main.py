"""The ``eventstore`` app: every command, in the order ``--help`` lists them.

Exit codes: 0 success; 1 a problem was found (damage, a store locked by
the bot) or a library call refused; 2 bad usage.
"""

from __future__ import annotations

import typer

from . import demo, inspect, maintenance, replay, transfer

app = typer.Typer(
    name="eventstore",
    help="Inspect, check, replay, maintain and move the bot's event store.\n\n"
    "DIR|URL is a store directory (default data/) or a postgresql:// URL.  Read-only "
    "commands (info, verify, dump, tail, replay, export) work while the bot runs; "
    "commands that write need the bot stopped, except on PostgreSQL, where many "
    "processes write one log.\n\n"
    "Example: eventstore info data/",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("info")(inspect.info)
app.command("verify")(inspect.verify)
app.command("dump")(inspect.dump)
app.command("tail")(inspect.tail)
app.command("replay")(replay.replay)
app.command("compact")(maintenance.compact)
app.command("snapshot")(maintenance.snapshot)
app.command("forget-user")(maintenance.forget_user)
app.command("import-sqlite")(transfer.import_sqlite)
app.command("export")(transfer.export)
app.command("demo")(demo.demo)


def main() -> None:
    app(prog_name="eventstore")


if __name__ == "__main__":
    main()
