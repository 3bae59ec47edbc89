"""PostgreSQL for the tests: a throwaway server, or the one ``$EVENTSTORE_PG_DSN`` names.

Register the fixtures in a test module with ``pytest_plugins = ["pgserver"]``:

* ``pg_server`` (session): the server, as a :class:`Server`.
* ``pg_dsn`` (session): the DSN of a database made for this test session.
* ``pg_database`` (function): the DSN of a new, empty database, dropped after
  the test.  About 0.1 s each: for tests that want a database to themselves.
* ``pg_schema`` (function): the DSN of a new, empty schema in the session
  database (``?search_path=...``).  About 1 ms each: for the contract suite's
  hundreds of tests.

Without ``EVENTSTORE_PG_DSN`` the session starts its own server: ``initdb``
into a temporary directory, then ``postgres`` listening only on a Unix
socket in that directory (no TCP port, so it cannot clash with a server
already running), with fsync off since nothing here survives the session.
The binaries are looked up on PATH, then under /usr/lib/postgresql/*/bin
(Debian's ``postgresql`` package).  PostgreSQL refuses to run as root, so
under root the server runs as the ``postgres`` user (which Debian's package
creates), else as ``nobody``.  If no binaries are found the fixture fails:
a skipped database test would pass without testing anything.

With ``EVENTSTORE_PG_DSN`` (a role allowed to CREATE DATABASE) the session
makes its databases there and drops them at the end.

Nothing here imports eventstore: ``bench/bench_postgres.py`` starts its
server with :class:`TempServer` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

ENV_DSN = "EVENTSTORE_PG_DSN"
#: Settings for a server whose data is thrown away: no fsync, no full pages.
TEST_SETTINGS = {"fsync": "off", "full_page_writes": "off", "max_connections": "200"}
START_TIMEOUT = 60.0


def find_bin_dir() -> Path | None:
    """The directory holding initdb and postgres, or None."""
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)

    def version(d: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", d)[-1:])

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        candidates.append(Path(d))
    candidates += [Path("/usr/local/pgsql/bin"), Path("/usr/pgsql/bin")]
    for d in candidates:
        if (d / "initdb").is_file() and (d / "postgres").is_file():
            return d
    return None


def with_params(dsn: str, **params: str) -> str:
    """``dsn`` with query parameters added (or replaced)."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in params]
    query += list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


# Loaded now: the child between fork and exec should only call it.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """Runs in the server's process before exec: quit if the test process dies.

    So a test run killed outright (no fixture teardown) leaves no server behind.
    Set after Popen dropped root: a change of user clears it.
    """
    if _libc is not None:
        _libc.prctl(1, int(signal.SIGQUIT))  # PR_SET_PDEATHSIG; SIGQUIT: immediate shutdown


class Server:
    """A server the tests may create databases on."""

    def __init__(self, admin_dsn: str) -> None:
        #: A DSN for the ``postgres`` database, for CREATE DATABASE.
        self.admin_dsn = admin_dsn

    def dsn(self, database: str) -> str:
        return with_database(self.admin_dsn, database)

    def stop(self) -> None:
        """Nothing to stop for a server someone else runs."""


class TempServer(Server):
    """A throwaway server in a temporary directory: ``start()``, then ``stop()``."""

    def __init__(self, bin_dir: Path, settings: dict[str, str] | None = None) -> None:
        self.bin_dir = bin_dir
        self.settings = dict(settings or {})
        self.base = Path(tempfile.mkdtemp(prefix="eventstore-pg-"))
        self.data = self.base / "data"
        self.logfile = self.base / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # Any number works for a socket in a private directory; a free TCP
        # port keeps SysV shared memory keys (derived from it) apart too.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        super().__init__(f"postgresql://postgres@/postgres?host={self.base}&port={self.port}")

    def _as_server_user(self) -> dict[str, Any]:
        """Popen arguments that drop root (PostgreSQL refuses to run as root)."""
        if os.geteuid() != 0:
            return {}
        for name in ("postgres", "nobody"):
            try:
                user = pwd.getpwnam(name)
            except KeyError:
                continue
            return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        raise RuntimeError("running as root, and there is no postgres or nobody user to run as")

    def start(self) -> None:
        drop = self._as_server_user()
        if drop:
            os.chown(self.base, drop["user"], drop["group"])
        self.base.chmod(0o700)
        initdb = subprocess.run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            cwd=self.base,
            capture_output=True,
            text=True,
            check=False,
            **drop,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed ({initdb.returncode}):\n{initdb.stderr}")
        args = [str(self.bin_dir / "postgres"), "-D", str(self.data), "-k", str(self.base)]
        args += ["-p", str(self.port), "-c", "listen_addresses="]
        for key, value in self.settings.items():
            args += ["-c", f"{key}={value}"]
        with open(self.logfile, "wb") as log:
            if drop:
                os.chown(self.logfile, drop["user"], drop["group"])
            self.proc = subprocess.Popen(
                args,
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                **drop,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        pidfile = self.data / "postmaster.pid"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                # Line 8 of postmaster.pid is the postmaster's status.
                lines = pidfile.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"postgres was not ready after {START_TIMEOUT} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no server log)"

    def version(self) -> str:
        out = subprocess.run(
            [str(self.bin_dir / "postgres"), "--version"], capture_output=True, text=True
        )
        return out.stdout.strip()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            # SIGINT is a fast shutdown: clients are disconnected, no wait.
            for sig, wait in ((signal.SIGINT, 15), (signal.SIGQUIT, 5), (signal.SIGKILL, 5)):
                proc.send_signal(sig)
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(self.base, ignore_errors=True)


def start_server(settings: dict[str, str] | None = None) -> Server:
    """The server of ``$EVENTSTORE_PG_DSN``, or a new throwaway one (stop() it)."""
    env = os.environ.get(ENV_DSN)
    if env:
        return Server(env)
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise RuntimeError(
            "PostgreSQL server binaries (initdb, postgres) were found neither on PATH nor "
            "under /usr/lib/postgresql/*/bin: install them (apt-get install postgresql) "
            f"or set {ENV_DSN} to a server where this role may CREATE DATABASE"
        )
    server = TempServer(bin_dir, settings)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


class Admin:
    """Runs SQL from synchronous code (fixtures) on a loop in its own thread.

    The tests' event loops come and go with each test; asyncpg connections
    belong to one loop, so the admin connections live on their own.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._conns: dict[str, Any] = {}

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(120)

    def execute(self, dsn: str, sql: str) -> None:
        conn = self._conns.get(dsn)
        if conn is None:
            conn = self._conns[dsn] = self._call(asyncpg.connect(dsn))
        self._call(conn.execute(sql))

    def close(self) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(Exception):
                self._call(conn.close())
        self._conns.clear()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def _fresh_name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    try:
        server = start_server(TEST_SETTINGS)
    except RuntimeError as err:
        pytest.fail(f"no PostgreSQL server for the tests: {err}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Admin]:
    admin = Admin()
    try:
        yield admin
    finally:
        admin.close()


@pytest.fixture(scope="session")
def pg_dsn(pg_server: Server, pg_admin: Admin) -> Iterator[str]:
    """The DSN of a database made for this test session (dropped at its end)."""
    name = _fresh_name("eventstore_test")
    pg_admin.execute(pg_server.admin_dsn, f"CREATE DATABASE {name} TEMPLATE template0")
    try:
        yield pg_server.dsn(name)
    finally:
        pg_admin.execute(pg_server.admin_dsn, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def pg_database(pg_server: Server, pg_admin: Admin) -> Iterator[str]:
    """The DSN of a new, empty database; dropped after the test."""
    name = _fresh_name("eventstore_db")
    # FILE_COPY copies the template's files: for a template this small about
    # twice as fast as the default WAL_LOG.
    pg_admin.execute(
        pg_server.admin_dsn, f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY FILE_COPY"
    )
    try:
        yield pg_server.dsn(name)
    finally:
        pg_admin.execute(pg_server.admin_dsn, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def pg_schema(pg_dsn: str, pg_admin: Admin) -> str:
    """The DSN of a new, empty schema of the session database (its search_path)."""
    name = _fresh_name("s")
    pg_admin.execute(pg_dsn, f"CREATE SCHEMA {name}")
    return with_params(pg_dsn, search_path=name)


def make_database(server: Server, admin: Admin, prefix: str = "eventstore_db") -> str:
    """Create an empty database on ``server``; return its DSN (for scripts)."""
    name = _fresh_name(prefix)
    admin.execute(server.admin_dsn, f"CREATE DATABASE {name} TEMPLATE template0")
    return server.dsn(name)
