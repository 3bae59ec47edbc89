"""The ``eventstore`` app: every command, in the order ``--help`` lists them.

Exit codes: 0 success; 1 a problem was found (damage, a store locked by
the bot) or a library call refused; 2 bad usage; 130 Ctrl-C (see
:func:`cli.run` for its first moments).
"""

from __future__ import annotations

import errno
import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast

import typer

from . import demo, inspect, maintenance, replay, transfer
from . import output as out

app = typer.Typer(
    name="eventstore",
    help="Inspect, check, replay, maintain and move the bot's event store.\n\n"
    "DIR|URL is a store directory (default data/) or a postgresql:// URL.  Read-only "
    "commands (info, verify, dump, tail, replay, export) work while the bot runs; "
    "commands that write need the bot stopped, except on PostgreSQL, where many "
    "processes write one log.\n\n"
    "Example: eventstore info data/demo",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def _version(value: bool) -> None:
    if value:
        from eventstore import __version__

        typer.echo(f"eventstore {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_version, is_eager=True
    ),
) -> None:
    """Inspect, check, replay, maintain and move the bot's event store."""


def _stdout_checked(command: F) -> F:
    """Every command prints; a stdout that cannot take it is reported.

    ``eventstore info | head``: a reader that stops reading is not a
    failure.  Click would exit 1 on the broken pipe, which here means "a
    problem was found"; exit 0 instead, as dump and tail do (see
    output.write_stdout).  Any other error writing stdout (a full disk,
    ``>/dev/full``) is one line and exit 1, not a traceback; and a closed
    stdout (``>&-``) is refused before the command does anything, rather
    than letting it work unseen.
    """

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        if sys.stdout is None:
            out.fail("stdout is closed, so nothing could be printed; nothing was done")
        try:
            return command(*args, **kwargs)
        except BrokenPipeError as err:
            if out.stdout_gone():
                out.reader_gone()
            out.fail(out.describe(err))
        except OSError as err:
            # Library calls turn their OSErrors into Error: lines (out.call);
            # one without a file name that gets here came from printing.
            if err.filename is not None:
                out.fail(out.describe(err))
            out.fail(f"cannot write to stdout: {err.strerror or err}")

    return cast(F, run)


for name, command in [
    ("info", inspect.info),
    ("verify", inspect.verify),
    ("dump", inspect.dump),
    ("tail", inspect.tail),
    ("replay", replay.replay),
    ("compact", maintenance.compact),
    ("snapshot", maintenance.snapshot),
    ("forget-user", maintenance.forget_user),
    ("repair", maintenance.repair),
    ("import-sqlite", transfer.import_sqlite),
    ("export", transfer.export),
    ("demo", demo.demo),
]:
    app.command(name)(_stdout_checked(command))


class _Prefixed(logging.Formatter):
    """``warning: ignoring snapshot ...``, as the command's own lines read."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def main() -> None:
    # The library warns through logging (a cut torn tail, an ignored
    # snapshot); without a handler Python would print the bare message.
    # Warnings only: what it logs as an error it also raises, and the
    # command prints that as its Error: line.
    library = logging.getLogger("eventstore")
    if not library.handlers:
        handler = logging.StreamHandler()  # stderr
        handler.setFormatter(_Prefixed())
        handler.addFilter(lambda record: record.levelno == logging.WARNING)
        library.addHandler(handler)
    try:
        app(prog_name="eventstore")
    except SystemExit as done:
        # What click prints itself (--help, a command's help) is not inside
        # a command, so _stdout_checked does not see its broken pipe: click
        # exits 1 on one.  ``eventstore --help | head`` is not a failure.
        cause = done.__context__
        if done.code == 1 and isinstance(cause, OSError) and cause.errno == errno.EPIPE:
            out.silence(sys.stdout)
            # Click exits 1 on any broken pipe; a usage error whose message
            # met it (``eventstore --nonsense 2>&1 | true``) is still one.
            # (Its exception, click's UsageError, carries the exit code.)
            code = getattr(cause.__context__, "exit_code", 0)
            raise SystemExit(code if isinstance(code, int) else 1) from None
        raise


if __name__ == "__main__":
    main()
