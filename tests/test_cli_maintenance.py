"""The commands that write: compact, snapshot, forget-user, repair."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from test_cli import REPO, T0, busy_store, frame_offsets, invoke, legacy_db, segment_files

from eventstore import EventStore, IntegrityError
from eventstore.lockfile import WriterLock
from eventstore.testing import FakeClock


async def churn(directory: Path) -> None:
    """A store with plenty for compaction: superseded stats and cleared chat."""
    async with EventStore(
        directory, durability="flush", clock=FakeClock(T0), segment_size=1024
    ) as s:
        for i in range(80):
            await s.save_user_stats(f"u{i % 4}", chat_lines=1, last_seen=T0 + i)
            await s.save_message(f"u{i % 4}", f"m{i}", timestamp=T0 + i)
        await s.log_user_count(1, 2, timestamp=T0)
        await s.clear_old_messages(keep_count=10)


def churned(tmp_path: Path) -> Path:
    d = tmp_path / "churn"
    asyncio.run(churn(d))
    return d


def reads(directory: Path) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        async with EventStore(directory, read_only=True) as store:
            return {
                "users": await store.get_all_user_stats(),
                "messages": await store.get_recent_messages(limit=1000),
                "counts": await store.get_user_count_history(),
                "channel": await store.get_channel_stats(),
            }

    return asyncio.run(read())


# -- refused while the bot writes ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["compact"], "await store.compact()"),
        (["snapshot"], "await store.write_snapshot()"),
        (["forget-user", "{d}", "bob"], "await store.forget_user('bob')"),
        # The call named carries the options given, so it does what was asked.
        (["compact", "{d}", "--keep-history", "30"], "await store.compact(keep_history_days=30)"),
        (
            ["import-sqlite", "{db}", "{d}", "--force"],
            "await import_sqlite(store, '{db}', force=True)",
        ),
    ],
)
def test_refused_while_a_writer_holds_the_store(tmp_path: Path, args: list[str], hint: str) -> None:
    d = busy_store(tmp_path)
    before = {p.name: p.read_bytes() for p in segment_files(d)}
    db = legacy_db(tmp_path / "bot.db")
    argv = [a.format(d=d, db=db) for a in args]
    hint = hint.format(db=db)
    if len(argv) == 1 or argv[1] == "--dry-run":
        argv.insert(1, str(d))
    lock = WriterLock(str(d))
    lock.acquire()
    try:
        result = invoke(*argv)
    finally:
        lock.release()
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {d} is open for writing by process {os.getpid()}; stop the bot or run this "
        f"from it with {hint}\n"
    )
    assert {p.name: p.read_bytes() for p in segment_files(d)} == before


# -- compact -------------------------------------------------------------------------------


def every_file(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*") if p.is_file()}


@pytest.mark.parametrize("state", ["as left", "torn tail, no snapshot", "beside the bot"])
def test_compact_dry_run_changes_nothing(tmp_path: Path, state: str) -> None:
    """Not a byte: no torn tail cut, no snapshot written, no lock needed."""
    d = churned(tmp_path)
    if state == "torn tail, no snapshot":
        for snap in d.glob("snapshot-*"):
            snap.unlink()
        last = segment_files(d)[-1]
        with open(last, "ab") as f:
            f.write(b"\x07\x00\x00")  # the start of a frame a crash cut short
    before = every_file(d)
    lock = WriterLock(str(d))
    if state == "beside the bot":
        lock.acquire()
    try:
        result = invoke("compact", d, "--dry-run")
    finally:
        if state == "beside the bot":
            lock.release()
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dry run: would rewrite ")
    assert lines[-1] == "nothing was changed"
    assert every_file(d) == before


@pytest.mark.parametrize(
    "args",
    [
        ["compact", "{d}"],
        ["compact", "{d}", "--dry-run"],
        ["snapshot", "{d}"],
        ["forget-user", "{d}", "alice"],
        ["info", "{d}"],
        ["verify", "{d}"],
        ["export", "{d}", "--format", "jsonl", "{out}"],
        ["dump", "{d}"],
    ],
)
@pytest.mark.parametrize("contents", ["empty", "unrelated files"])
def test_a_directory_that_is_not_a_store_is_refused_untouched(
    tmp_path: Path, args: list[str], contents: str
) -> None:
    """Only import-sqlite and demo make stores: a command pointed at the wrong
    directory says so instead of making (or reporting) an empty store there."""
    d = tmp_path / "notes"
    d.mkdir()
    if contents == "unrelated files":
        (d / "notes.txt").write_text("shopping list")
    before = every_file(d)
    out = tmp_path / "out.jsonl"
    result = invoke(*[a.format(d=d, out=out) for a in args])
    assert result.exit_code == 1, result.output
    assert result.stderr == f"Error: {d}: no event store here (no segment files)\n"
    assert every_file(d) == before
    assert not out.exists()


def test_forget_user_of_an_unknown_name_changes_nothing(tmp_path: Path) -> None:
    d = churned(tmp_path)
    for snap in d.glob("snapshot-*"):
        snap.unlink()  # a writer would write one on close
    before = every_file(d)
    result = invoke("forget-user", d, "nobody")
    assert result.exit_code == 0
    assert result.stdout == f"nothing to forget: {d} holds nothing of 'nobody'; nothing written\n"
    assert every_file(d) == before


def test_compact_keeps_every_read(tmp_path: Path) -> None:
    d = churned(tmp_path)
    before = reads(d)
    size_before = sum(p.stat().st_size for p in segment_files(d))
    result = invoke("compact", d, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dry_run"] is False
    assert report["segments_rewritten"] >= 1
    assert report["bytes_after"] < report["bytes_before"]
    assert report["dropped_by_type"]["message_saved"] == 70
    assert reads(d) == before
    assert sum(p.stat().st_size for p in segment_files(d)) < size_before
    assert invoke("verify", d).exit_code == 0


def test_compact_text_report(tmp_path: Path) -> None:
    d = churned(tmp_path)
    result = invoke("compact", d)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("rewrote ")
    assert "events dropped" in lines[0]
    assert any(line.split() == ["message_saved", "70"] for line in lines)


def test_compact_after_several_restarts_leaves_verify_clean(tmp_path: Path) -> None:
    d = churned(tmp_path)
    asyncio.run(churn(d))  # a second session: a second snapshot, for older frames
    assert len(list(d.glob("snapshot-*.snap"))) == 2
    before = reads(d)
    assert invoke("compact", d).exit_code == 0
    # The older snapshot named frames compaction moved: it must not be left
    # behind for verify to report as damage.
    assert len(list(d.glob("snapshot-*.snap"))) == 1
    result = invoke("verify", d)
    assert result.exit_code == 0, result.output
    assert reads(d) == before


def test_compact_twice_in_a_row_changes_nothing_the_second_time(tmp_path: Path) -> None:
    d = churned(tmp_path)
    assert invoke("compact", d).exit_code == 0
    files = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    # The dry run says what the real run then does.
    result = invoke("compact", d, "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("dry run: nothing to compact: the sealed segments (")
    result = invoke("compact", d)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("nothing to compact: the sealed segments (")
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == files
    assert not (d / "compacting").exists() and invoke("verify", d).exit_code == 0


def test_compact_keep_history_trims_old_user_counts(tmp_path: Path) -> None:
    d = churned(tmp_path)  # one user count, at T0 (2023): older than any DAYS here
    result = invoke("compact", d, "--keep-history", 30, "--json")
    assert result.exit_code == 0, result.output
    assert reads(d)["counts"] == []


def test_compact_keep_history_past_the_largest_int_is_bad_usage(tmp_path: Path) -> None:
    d = churned(tmp_path)
    files = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    result = invoke("compact", d, "--keep-history", 2**63)
    assert result.exit_code == 2, result.output
    assert "--keep-history" in result.stderr
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == files


def test_compact_refuses_when_reads_would_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = churned(tmp_path)

    async def refuse(self: EventStore, **kwargs: Any) -> Any:
        raise IntegrityError("compaction would change get_recent_messages; nothing was changed")

    monkeypatch.setattr(EventStore, "compact", refuse)
    result = invoke("compact", d)
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: compaction would change get_recent_messages; nothing was changed\n"
    )


# -- snapshot --------------------------------------------------------------------------------


def test_snapshot(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    for snap in d.glob("snapshot-*.snap"):
        snap.unlink()
    result = invoke("snapshot", d)
    assert result.exit_code == 0, result.output
    path = d / "snapshot-00000000000000000123.snap"
    assert result.stdout == f"wrote {path} (position 123)\n"
    assert path.exists()
    assert invoke("verify", d).exit_code == 0


def test_snapshot_of_an_empty_store_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "empty"

    async def create() -> None:
        async with EventStore(d):
            pass

    asyncio.run(create())
    result = invoke("snapshot", d)
    assert result.exit_code == 1
    assert result.stderr == "Error: nothing to snapshot: the store is empty\n"


# -- forget-user ------------------------------------------------------------------------------


def test_forget_user(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    result = invoke("forget-user", d, "bob")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"forgot 'bob': no read of {d} returns anything of them any more\n"
    now = reads(d)
    assert "bob" not in {u["username"] for u in now["users"]}
    assert "bob" not in {m["username"] for m in now["messages"]}
    # Gone from the files as well, not only from the reads.
    assert not any(b"bob" in p.read_bytes() for p in d.iterdir() if p.is_file())
    assert invoke("verify", d).exit_code == 0

    again = invoke("forget-user", d, "bob")
    assert again.exit_code == 0
    assert again.stdout == f"nothing to forget: {d} holds nothing of 'bob'; nothing written\n"


def test_forget_user_erases_chat_lines_cleared_from_the_reads(tmp_path: Path) -> None:
    """No read returns eve's cleared line, but the files still hold it."""
    d = tmp_path / "s"

    async def write() -> None:
        async with EventStore(d, clock=FakeClock(T0)) as store:
            await store.save_message("eve", "my phone is 555-0100")
            await store.save_message("bob", "hello")
            await store.clear_old_messages(1)

    asyncio.run(write())
    assert any(b"555-0100" in p.read_bytes() for p in segment_files(d))
    result = invoke("forget-user", d, "eve")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"forgot 'eve': no read of {d} returns anything of them any more\n"
    assert not any(b"555-0100" in p.read_bytes() for p in d.iterdir() if p.is_file())
    assert invoke("dump", d, "--user", "eve").stdout == ""
    assert invoke("verify", d).exit_code == 0


def test_forget_user_finishes_a_forget_cut_short_before_its_compaction(tmp_path: Path) -> None:
    from eventstore.events import UserForgotten

    d = busy_store(tmp_path)

    async def cut_short() -> None:
        # What a forget killed between its event and its compaction leaves.
        async with EventStore(d) as store:
            await store.append([UserForgotten("bob", T0 + 9_000)])
            assert not store.knows_user("bob")

    asyncio.run(cut_short())
    assert any(b"bob" in p.read_bytes() for p in d.iterdir() if p.is_file())
    result = invoke("forget-user", d, "bob")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"forgot 'bob': no read of {d} returns anything of them any more\n"
    assert not any(b"bob" in p.read_bytes() for p in d.iterdir() if p.is_file())
    assert invoke("verify", d).exit_code == 0


def test_forget_user_rejects_a_bad_name(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    result = invoke("forget-user", d, "")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert "username" in result.stderr


def test_after_a_crash_in_compactions_switch_forget_user_finishes_it(tmp_path: Path) -> None:
    """A reader cannot open a store whose switch is unfinished; forget-user's
    read-only question is skipped then, and its writer's open finishes it."""
    import subprocess
    import sys

    d = churned(tmp_path)
    before = reads(d)
    script = f"""
import asyncio, os, sys
sys.path.insert(0, {str(REPO)!r})
from eventstore import EventStore, compaction
real = os.replace
def replace_then_die(src, dst):
    real(src, dst)
    os._exit(9)
compaction.os.replace = replace_then_die
async def main():
    store = EventStore({str(d)!r}, segment_size=1024)
    await store.connect()
    await store.compact()
asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    assert (d / "compacting" / "COMMIT").exists()
    dry = invoke("compact", d, "--dry-run")
    assert dry.exit_code == 1
    assert "a compaction was interrupted after it committed" in dry.stderr
    result = invoke("forget-user", d, "u2")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("forgot 'u2'")
    assert not (d / "compacting").exists()
    after = reads(d)
    assert [u for u in before["users"] if u["username"] != "u2"] == after["users"]


# -- repair --------------------------------------------------------------------------------


def test_repair_leaves_a_store_without_damage_as_it_is(tmp_path: Path) -> None:
    d = churned(tmp_path)
    before = every_file(d)
    result = invoke("repair", d)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{d}: no damage found; nothing was cut\n"
    assert every_file(d) == before


def test_repair_cuts_at_a_flipped_byte_and_keeps_copies(tmp_path: Path) -> None:
    d = churned(tmp_path)  # several segments (segment_size 1024)
    segments = segment_files(d)
    assert len(segments) >= 3
    damaged = segments[1]
    whole = {p.name: p.read_bytes() for p in segments}
    offsets = frame_offsets(damaged)
    data = bytearray(whole[damaged.name])
    data[offsets[2] + 24] ^= 0xFF  # inside the third frame's payload
    damaged.write_bytes(bytes(data))
    assert invoke("verify", d).exit_code == 1

    result = invoke("repair", d, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["repaired"] is True
    assert report["damage"]["path"] == str(damaged)
    assert report["damage"]["offset"] == offsets[2]
    # The damaged segment keeps its first two frames; every later one is set aside.
    assert damaged.read_bytes() == bytes(data[: offsets[2]])
    kept = [Path(p) for p in report["set_aside"]]
    assert kept[0] == damaged.with_name(damaged.name + ".broken")
    assert kept[0].read_bytes() == bytes(data)
    assert [p.read_bytes() for p in kept[1:]] == [whole[p.name] for p in segments[2:]]
    assert report["bytes_cut"] == len(data) - offsets[2] + sum(
        len(whole[p.name]) for p in segments[2:]
    )
    assert invoke("verify", d).exit_code == 0

    # And the store opens again, ending at the last good position.
    async def position() -> int:
        async with EventStore(d, read_only=True) as store:
            return store.position

    assert asyncio.run(position()) == report["damage"]["last_good_position"]


def test_repair_refuses_beside_a_writer_and_a_url(tmp_path: Path) -> None:
    d = churned(tmp_path)
    before = every_file(d)
    lock = WriterLock(str(d))
    lock.acquire()
    try:
        result = invoke("repair", d)
    finally:
        lock.release()
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {d} is open for writing by process {os.getpid()}; stop it first; "
        "nothing was changed\n"
    )
    assert every_file(d) == before
    result = invoke("repair", "postgresql://bot@db.example/bot")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: PostgreSQL stores are not repaired by cutting")
