"""The ``eventstore`` command line: a thin layer over the library.

Each command opens the store, makes one library call, prints the result (as
text, or JSON with ``--json``) and turns library errors into one line on
stderr and an exit code.  The commands live by group in :mod:`cli.inspect`
(info, verify, dump, tail), :mod:`cli.replay`, :mod:`cli.maintenance`
(compact, snapshot, forget-user), :mod:`cli.transfer` (import-sqlite,
export) and :mod:`cli.demo`; :mod:`cli.main` assembles the app.
"""
