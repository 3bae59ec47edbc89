"""The ``eventstore`` command line: a thin layer over the library.

Each command opens the store, makes one library call, prints the result (as
text, or JSON with ``--json``) and turns library errors into one line on
stderr and an exit code.  The commands live by group in :mod:`cli.inspect`
(info, verify, dump, tail), :mod:`cli.replay`, :mod:`cli.maintenance`
(compact, snapshot, forget-user), :mod:`cli.transfer` (import-sqlite,
export) and :mod:`cli.demo`; :mod:`cli.main` assembles the app.
"""


def run() -> None:
    """The ``eventstore`` console script: import the app, then run it.

    A Ctrl-C in the first tenth of a second or so lands while Python is
    still importing the app (typer, the library) or typer is still building
    the commands from their signatures, outside the command, where typer
    would turn it into exit 130.  It should stop the command as quietly as
    one a moment later, not print a traceback of whatever it interrupted.
    """
    try:
        from .main import main

        main()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
