"""The command line on a PostgreSQL URL: every command that makes sense there.

Each test gets a fresh schema of the session's database (pgserver.py) and
fills it through EventStore, as the bot would; the commands then get the
schema's URL (``...?search_path=s_...``) where they would get a directory.
"""

from __future__ import annotations

import asyncio
import json
import queue
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from test_cli import NAMES, T0, _stop_after_first_batch, dumped, invoke, legacy_db

from eventstore import EventStore
from eventstore.pglog import PostgresLog, redact_dsn
from eventstore.testing import FakeClock

pytest_plugins = ["pgserver"]

REPO = Path(__file__).resolve().parent.parent


async def fill(dsn: str) -> None:
    """The busy store of test_cli.py: 123 events, every one known.

    Positions 1..120 alternate a chat line's stats update (odd) and its message
    (even, "line i" by NAMES[i % 3] at T0 + 10 i); then a join (121), a user
    count (122) and a new peak (123).
    """
    async with EventStore(dsn, clock=FakeClock(T0)) as store:
        for i in range(60):
            t = T0 + 10 * i
            user = NAMES[i % 3]
            await store.save_user_stats(user, chat_lines=1, last_seen=t)
            await store.save_message(user, f"line {i}", timestamp=t)
        await store.log_user_action("ada", "join", timestamp=T0 + 5)
        await store.log_user_count(3, 7, timestamp=T0 + 600)
        await store.update_channel_stats(max_users=3, max_connected=7, timestamp=T0 + 600)


@pytest.fixture
def busy(pg_schema: str) -> str:
    asyncio.run(fill(pg_schema))
    return pg_schema


@pytest.fixture
def pg_schema_2(pg_dsn: str, pg_admin: Any) -> str:
    """A second fresh schema, for a test that moves data between two stores."""
    from pgserver import with_params

    name = f"s_{secrets.token_hex(6)}"
    pg_admin.execute(pg_dsn, f"CREATE SCHEMA {name}")
    return with_params(pg_dsn, search_path=name)


async def _sql(dsn: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def sql(dsn: str, query: str, *args: Any) -> list[Any]:
    return asyncio.run(_sql(dsn, query, *args))


def reads(target: str) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        async with EventStore(target, read_only=True) as store:
            return {
                "users": await store.get_all_user_stats(),
                "messages": await store.get_recent_messages(limit=1000),
                "actions": await store.get_user_actions(limit=1000),
                "counts": await store.get_user_count_history(),
                "channel": await store.get_channel_stats(),
            }

    return asyncio.run(read())


# -- info and verify ---------------------------------------------------------------------------


def test_info(busy: str) -> None:
    result = invoke("info", busy)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"store      {redact_dsn(busy)}"
    assert lines[1].startswith("schema     s_") and lines[1].endswith(", tables version 1")
    assert lines[2].endswith(", current")
    assert "rows       123, positions 1..123, head 123" in lines
    assert "first      #1  2023-11-14 22:13:20Z  user_stats_saved" in lines
    assert "last       #123  2023-11-14 22:23:20Z  channel_peak_raised" in lines
    assert "compacted  never" in lines
    assert lines[lines.index("events by type") :] == [
        "events by type",
        "  type                 count",
        "  message_saved           60",
        "  user_stats_saved        60",
        "  channel_peak_raised      1",
        "  user_action_logged       1",
        "  user_count_logged        1",
    ]
    data = json.loads(invoke("info", busy, "--json").stdout)
    assert (data["rows"], data["head"], data["schema_version"]) == (123, 123, 1)
    assert data["first"] == {"position": 1, "time": T0, "type": "user_stats_saved"}
    assert data["table_size"] > 0 and data["total_size"] >= data["table_size"]
    assert data["payload_bytes"] > 0
    assert data["problems"] == []


def test_a_url_without_a_store_is_an_error(pg_schema: str) -> None:
    for command in (["info"], ["verify"], ["dump"], ["tail"], ["replay"], ["compact"]):
        result = invoke(*command, pg_schema)
        assert result.exit_code == 1, command
        assert result.stderr.startswith(f"Error: {redact_dsn(pg_schema)}: no event store here")
    # Nothing was created by the writing command either.
    assert sql(pg_schema, "SELECT to_regclass('eventstore_schema')")[0][0] is None


def test_the_password_never_shows(busy: str) -> None:
    with_password = busy.replace("postgresql://postgres@", "postgresql://postgres:s3cret@")
    result = invoke("info", with_password)
    assert result.exit_code == 0, result.output  # the test server trusts everyone
    assert "s3cret" not in result.output
    assert "postgres:***@" in result.stdout


def test_verify_a_healthy_store(busy: str) -> None:
    result = invoke("verify", busy)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(
        f"checked {redact_dsn(busy)}: 123 rows, positions 1..123, head 123 ("
    )
    assert lines[-1] == "ok"
    data = json.loads(invoke("verify", busy, "--json").stdout)
    assert data["ok"] is True and data["rows"] == 123 and data["problems"] == []


def test_verify_names_damaged_and_missing_rows(busy: str) -> None:
    sql(busy, "UPDATE eventstore_events SET payload = '\\xc1c1'::bytea WHERE position = 17")
    sql(busy, "UPDATE eventstore_events SET tag = 7 WHERE position = 30")
    sql(busy, "DELETE FROM eventstore_events WHERE position IN (40, 41)")
    result = invoke("verify", busy)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    problems = [line for line in lines if line.startswith("problem: ")]
    assert problems[0].startswith("problem: position 17: payload does not decode: ")
    assert problems[1:] == [
        "problem: position 30: tag column says 7, the payload's tag is 8",
        "problem: position 40: missing: positions 40..41 are not in the table and no "
        "compaction deleted them",
    ]
    assert lines[-1] == "3 problems found"
    data = json.loads(invoke("verify", busy, "--json").stdout)
    assert [p["position"] for p in data["problems"]] == [17, 30, 40]
    # The store itself refuses to open past the damaged row, naming it too.
    replay = invoke("replay", busy)
    assert replay.exit_code == 1
    assert "position 17" in replay.stderr


def test_verify_after_compaction_tells_its_gaps_from_lost_rows(busy: str) -> None:
    asyncio.run(_clear(busy, 10))
    assert invoke("compact", busy).exit_code == 0
    result = invoke("verify", busy)
    assert result.exit_code == 0, result.output
    assert "deleted by 1 compaction" in result.stdout.splitlines()[0]
    # A row deleted by hand inside the compacted range is still missing.
    kept = sql(busy, "SELECT min(position) FROM eventstore_events")[0][0]
    sql(busy, "DELETE FROM eventstore_events WHERE position = $1", kept)
    damaged = invoke("verify", busy)
    assert damaged.exit_code == 1
    assert (
        f"problem: position {kept}: missing: position {kept} is not in the table and no "
        "compaction deleted it\n"
    ) in damaged.stdout


async def _clear(dsn: str, keep: int) -> None:
    async with EventStore(dsn, clock=FakeClock(T0 + 1000)) as store:
        await store.clear_old_messages(keep)


# -- dump, tail, replay ------------------------------------------------------------------------


def test_dump_with_filters(busy: str) -> None:
    records = dumped(invoke("dump", busy))
    assert [r["position"] for r in records] == list(range(1, 124))
    assert records[1] == {
        "position": 2,
        "type": "message_saved",
        "timestamp": T0,
        "username": "ada",
        "message": "line 0",
    }
    window = dumped(invoke("dump", busy, "--from", 10, "--to", 14))
    assert [r["position"] for r in window] == [10, 11, 12, 13, 14]
    two = dumped(
        invoke("dump", busy, "--type", "user_count_logged", "--type", "user_action_logged")
    )
    assert [(r["position"], r["type"]) for r in two] == [
        (121, "user_action_logged"),
        (122, "user_count_logged"),
    ]
    bob = dumped(invoke("dump", busy, "--user", "bob", "--type", "message_saved", "--from", 50))
    assert [r["message"] for r in bob] == [f"line {i}" for i in range(25, 60) if i % 3 == 1]
    assert dumped(invoke("dump", busy, "--from", 200)) == []


def test_tail_n(busy: str) -> None:
    result = invoke("tail", busy, "-n", 3)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "     121  2023-11-14 22:13:25Z  user_action_logged    "
        '{"timestamp":1700000005,"username":"ada","action_type":"join","details":null}',
        "     122  2023-11-14 22:23:20Z  user_count_logged     "
        '{"timestamp":1700000600,"chat_users":3,"connected_users":7}',
        "     123  2023-11-14 22:23:20Z  channel_peak_raised   "
        '{"timestamp":1700000600,"max_users":3,"max_connected":7}',
    ]
    assert len(invoke("tail", busy, "-n", 1000).stdout.splitlines()) == 123


def test_tail_follows_writers_through_notifications(busy: str) -> None:
    follower = subprocess.Popen(
        [sys.executable, "-m", "cli", "tail", busy, "-n", "1", "-f", "--json"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert json.loads(lines.get(timeout=20))["position"] == 123

        async def write() -> list[dict[str, Any]]:
            async with EventStore(busy) as store:
                for i in range(5):
                    await store.save_message("zed", f"live {i}", timestamp=T0 + 1000 + i)
                return [json.loads(await asyncio.to_thread(lines.get, True, 20)) for _ in range(5)]

        got = asyncio.run(write())
        assert [r["position"] for r in got] == [124, 125, 126, 127, 128]
        assert [r["message"] for r in got] == [f"live {i}" for i in range(5)]
    finally:
        follower.send_signal(signal.SIGINT)
        try:
            _, err = follower.communicate(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover
            follower.kill()
            raise
    assert follower.returncode == 0, err
    assert "Traceback" not in err


def test_replay_at_a_moment(busy: str) -> None:
    result = invoke("replay", busy, "--at", T0 + 100, "--json", "--limit", 3)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["directory"] == redact_dsn(busy)
    assert (data["at"], data["events_applied"], data["events_skipped"]) == (T0 + 100, 23, 100)
    assert [m["message"] for m in data["recent_chat"]] == ["line 10", "line 9", "line 8"]
    assert [(u["username"], u["total_chat_lines"]) for u in data["top_chatters"]] == [
        ("ada", 4),
        ("bob", 4),
        ("cy", 3),
    ]
    assert data["compacted_through"] is None
    text = invoke("replay", busy, "--until", 6, "--limit", 2)
    assert text.exit_code == 0, text.output
    assert text.stdout.splitlines()[0] == (
        f"{redact_dsn(busy)} up to position 6: 6 events applied, last position 6 of 123; 3 users"
    )


def test_replay_notes_a_compacted_stretch(busy: str) -> None:
    asyncio.run(_clear(busy, 10))
    assert invoke("compact", busy).exit_code == 0
    result = invoke("replay", busy, "--until", 50)
    assert result.exit_code == 0, result.output
    assert "note: positions up to 124 were compacted" in result.stdout


# -- moving data ----------------------------------------------------------------------------


def test_export_then_import_round_trip(busy: str, pg_schema_2: str, tmp_path: Path) -> None:
    jsonl = tmp_path / "events.jsonl"
    result = invoke("export", busy, "--format", "jsonl", jsonl)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"exported {redact_dsn(busy)} to {jsonl}: 123 events\n"
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == dumped(
        invoke("dump", busy)
    )

    db = tmp_path / "backup.db"
    result = invoke("export", busy, "--format", "sqlite", db)
    assert result.exit_code == 0, result.output
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM recent_chat").fetchone() == (60,)
    conn.close()

    imported = invoke("import-sqlite", db, pg_schema_2)
    assert imported.exit_code == 0, imported.output
    assert imported.stdout.startswith(f"imported {db} into {redact_dsn(pg_schema_2)}: ")
    original, copy = reads(busy), reads(pg_schema_2)

    def without_ids(data: dict[str, Any]) -> dict[str, Any]:
        return {
            key: [{k: v for k, v in row.items() if k != "id"} for row in rows]
            if isinstance(rows, list)
            else rows
            for key, rows in data.items()
        }

    assert without_ids(copy) == without_ids(original)

    events = int(imported.stdout.split(": ")[1].split()[0])
    again = invoke("import-sqlite", db, pg_schema_2)
    assert again.exit_code == 1
    assert again.stderr == (
        f"Error: {redact_dsn(pg_schema_2)} is not empty (its last event is at position "
        f"{events}); import into an empty database or schema, or pass --force to add the "
        "file's data to it\n"
    )
    forced = invoke("import-sqlite", db, pg_schema_2, "--force", "--json")
    assert forced.exit_code == 0, forced.output


def test_import_sqlite_creates_the_tables(pg_schema: str, tmp_path: Path) -> None:
    db = legacy_db(tmp_path / "bot.db")
    result = invoke("import-sqlite", db, pg_schema)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        f"imported {db} into {redact_dsn(pg_schema)}: 5 events (positions 1..5)"
    )
    assert reads(pg_schema)["messages"][0]["message"] == "hi"


def test_export_holds_still_while_a_bot_appends(busy: str, tmp_path: Path) -> None:
    async def export_beside_a_writer() -> Any:
        async with EventStore(busy) as bot:
            stop = asyncio.Event()

            async def chatter() -> None:
                i = 0
                while not stop.is_set():
                    await bot.save_message("zed", f"live {i}", timestamp=T0 + 2000 + i)
                    i += 1
                    await asyncio.sleep(0.005)

            task = asyncio.create_task(chatter())
            try:
                return await asyncio.to_thread(
                    invoke, "export", busy, "--format", "sqlite", tmp_path / "live.db"
                )
            finally:
                stop.set()
                await task

    result = asyncio.run(export_beside_a_writer())
    assert result.exit_code == 0, result.output


# -- writing commands -------------------------------------------------------------------------


def test_forget_user_leaves_no_row_with_the_name(busy: str) -> None:
    result = invoke("forget-user", busy, "bob")
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"forgot 'bob': no read of {redact_dsn(busy)} returns anything of them any more\n"
    )
    hits = sql(
        busy,
        "SELECT position FROM eventstore_events WHERE username = $1 "
        "OR position(convert_to($1, 'UTF8') IN payload) > 0",
        "bob",
    )
    assert hits == []
    now = reads(busy)
    assert "bob" not in {u["username"] for u in now["users"]}
    assert invoke("verify", busy).exit_code == 0
    again = invoke("forget-user", busy, "bob")
    assert again.stdout == (
        f"nothing to forget: {redact_dsn(busy)} holds nothing of 'bob'; nothing written\n"
    )


def test_compact_dry_run_then_for_real(busy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_clear(busy, 10))
    before = reads(busy)
    rows_before = sql(busy, "SELECT position, tag, payload FROM eventstore_events")
    opened: list[bool] = []
    real_init = PostgresLog.__init__

    def spied(self: PostgresLog, dsn: str, **options: Any) -> None:
        opened.append(bool(options.get("read_only")))
        real_init(self, dsn, **options)

    monkeypatch.setattr(PostgresLog, "__init__", spied)
    dry = invoke("compact", busy, "--dry-run")
    monkeypatch.undo()
    assert opened == [True]  # a dry run opens no writer
    assert dry.exit_code == 0, dry.output
    lines = dry.stdout.splitlines()
    assert lines[0].startswith("dry run: positions 1..124: would delete 107 rows, rewrite 4 ")
    assert lines[-1] == "nothing was changed"
    assert sql(busy, "SELECT position, tag, payload FROM eventstore_events") == rows_before

    result = invoke("compact", busy, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dry_run"] is False
    assert report["through_position"] == 124
    assert report["events_before"] == 124 and report["events_dropped"] == 107
    assert report["dropped_by_type"] == {"message_saved": 50, "user_stats_saved": 57}
    assert report["users_folded"] == 3 and report["rows_rewritten"] == 4
    assert report["bytes_after"] < report["bytes_before"]
    assert report["segments_rewritten"] == 0
    assert reads(busy) == before
    kept = {r[0] for r in sql(busy, "SELECT position FROM eventstore_events")}
    assert len(kept) == 124 - 107 and kept <= {r[0] for r in rows_before}

    again = invoke("compact", busy)
    assert again.exit_code == 0, again.output
    assert again.stdout == (
        "nothing to compact: positions 1..124 hold nothing to drop; nothing was changed\n"
    )


def test_compact_keep_history(busy: str) -> None:
    result = invoke("compact", busy, "--keep-history", 30, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dropped_by_type"]["user_count_logged"] == 1
    assert reads(busy)["counts"] == []


def test_snapshot_is_refused(busy: str) -> None:
    result = invoke("snapshot", busy)
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: PostgreSQL stores keep no snapshots: every process replays the log when it "
        "connects\n"
    )


def test_demo_plays_into_a_url(pg_schema: str) -> None:
    result = invoke("demo", pg_schema, "--minutes", 20, "--seed", 1)
    assert result.exit_code == 0, result.output
    assert f"store: {redact_dsn(pg_schema)} (" in result.stdout
    info = json.loads(invoke("info", pg_schema, "--json").stdout)
    assert info["rows"] > 50
    assert invoke("verify", pg_schema).exit_code == 0


def test_an_import_that_stops_half_way_into_postgres_counts_its_own_events(
    tmp_path: Path, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the log's position: other bots write to it meanwhile."""
    db = legacy_db(tmp_path / "bot.db")
    _stop_after_first_batch(monkeypatch, OSError(28, "No space left on device"))

    async def another_bot() -> None:
        async with EventStore(pg_schema) as bot:
            for i in range(5):
                await bot.save_message("bot", f"line {i}")

    asyncio.run(another_bot())
    result = invoke("import-sqlite", db, pg_schema, "--force")
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[-1] == (
        "Error: the import failed after 2 of the file's events were committed (and perhaps "
        f"the batch then in flight); {redact_dsn(pg_schema)} holds that part of the file, not "
        "the rest; to have the file whole, import it into an empty database or schema"
    )


@pytest.mark.parametrize("table", ["eventstore_head", "eventstore_events"])
def test_info_on_a_store_missing_a_table_names_it(busy: str, table: str) -> None:
    """Not "no event store here": the store is there, damaged (as verify says)."""
    sql(busy, f"DROP TABLE {table}")
    for command in ("info", "verify"):
        result = invoke(command, busy)
        assert result.exit_code == 1, result.output
        assert result.stderr == f"Error: {redact_dsn(busy)}: table {table} missing\n"
