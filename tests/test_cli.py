"""The command line: exit codes, exact output and error text, JSON, filters, follow."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import queue
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from storeutil import copy_store
from typer.testing import CliRunner, Result

import cli.output
from cli.main import app
from eventstore import ConnectionError, EventStore, StorageError
from eventstore.demo import MAX_MINUTES
from eventstore.legacy import LEGACY_SCHEMA
from eventstore.lockfile import WriterLock
from eventstore.segment import FRAME_HEADER_SIZE, HEADER_SIZE
from eventstore.testing import FakeClock

T0 = 1_700_000_000  # 2023-11-14 22:13:20Z
NAMES = ("ada", "bob", "cy")
TYPES = (
    "channel_peak_raised, channel_stats_set, message_saved, messages_cleared, session_ended, "
    "user_action_logged, user_count_logged, user_counts_trimmed, user_forgotten, "
    "user_stats_saved, user_stats_set"
)
REPO = Path(__file__).resolve().parent.parent


def invoke(*args: Any) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


async def fill(directory: Path, *, segment_size: int = 1024) -> None:
    """The busy store: 123 events over several segments, every one known.

    Positions 1..120 alternate a chat line's stats update (odd) and its message
    (even, "line i" by NAMES[i % 3] at T0 + 10 i); then a join (121), a user
    count (122) and a new peak (123).
    """
    clock = FakeClock(T0)
    async with EventStore(
        directory, durability="flush", clock=clock, segment_size=segment_size
    ) as store:
        for i in range(60):
            t = T0 + 10 * i
            user = NAMES[i % 3]
            await store.save_user_stats(user, chat_lines=1, last_seen=t)
            await store.save_message(user, f"line {i}", timestamp=t)
        await store.log_user_action("ada", "join", timestamp=T0 + 5)
        await store.log_user_count(3, 7, timestamp=T0 + 600)
        await store.update_channel_stats(max_users=3, max_connected=7, timestamp=T0 + 600)


def busy_store(tmp_path: Path, name: str = "busy") -> Path:
    d = tmp_path / name
    asyncio.run(fill(d))
    return d


def empty_store(tmp_path: Path) -> Path:
    d = tmp_path / "empty"

    async def create() -> None:
        async with EventStore(d):
            pass

    asyncio.run(create())
    return d


def segment_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(".seg"))


def frame_offsets(path: Path) -> list[int]:
    data = path.read_bytes()
    offsets, off = [], HEADER_SIZE
    while off < len(data):
        offsets.append(off)
        off += FRAME_HEADER_SIZE + struct.unpack_from("<I", data, off)[0]
    return offsets


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def dumped(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


# -- errors every command shares ------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["info"],
        ["verify"],
        ["dump"],
        ["tail"],
        ["replay"],
        ["compact"],
        ["snapshot"],
        ["forget-user", "{d}", "ada"],
        ["export", "{d}", "--format", "jsonl", "{d}.jsonl"],
    ],
)
def test_missing_store_directory(tmp_path: Path, args: list[str]) -> None:
    d = tmp_path / "nope"
    argv = [a.format(d=d) for a in args]
    if len(argv) == 1:
        argv.append(str(d))
    result = invoke(*argv)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {d}: no such store directory\n"
    assert result.stdout == ""
    assert not d.exists()  # a writer command did not create it


def test_default_directory_is_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("info")
    assert result.exit_code == 1
    assert result.stderr == "Error: data: no such store directory\n"
    (tmp_path / "data").mkdir()
    result = invoke("info")
    assert result.exit_code == 1
    assert result.stderr == "Error: data: no event store here (no segment files)\n"
    # After the quick start the demo's store is below it: say so.
    busy_store(tmp_path, "data/demo")
    result = invoke("info")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: data: no event store here (no segment files); stores below it: data/demo\n"
    )
    busy_store(tmp_path, "data")
    assert invoke("info").exit_code == 0


def test_the_hint_passes_over_a_subdirectory_it_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The root of a volume holds lost+found (0700): no traceback for a hint."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "lost+found").mkdir(parents=True)
    busy_store(tmp_path, "data/demo")
    real = cli.output.list_segments

    def guarded(directory: str) -> Any:
        if directory.endswith("lost+found"):
            raise PermissionError(13, "Permission denied", directory)
        return real(directory)

    monkeypatch.setattr(cli.output, "list_segments", guarded)
    result = invoke("info")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: data: no event store here (no segment files); stores below it: data/demo\n"
    )


def test_store_locked_by_a_writer(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    lock = WriterLock(str(d))
    lock.acquire()
    try:
        result = invoke("forget-user", d, "ada")
        assert result.exit_code == 1
        assert result.stderr == (
            f"Error: {d} is open for writing by process {os.getpid()}; stop the bot or run "
            "this from it with await store.forget_user('ada')\n"
        )
        # Readers do not mind the lock, and info names its holder.
        info = invoke("info", d)
        assert info.exit_code == 0
        assert f"writer     process {os.getpid()} holds the lock\n" in info.stdout
        assert json.loads(invoke("info", d, "--json").stdout)["writer_pid"] == os.getpid()
    finally:
        lock.release()
    assert "writer     none\n" in invoke("info", d).stdout


def test_unknown_type_is_a_usage_error(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    result = invoke("dump", d, "--type", "message_saved", "--type", "chat_line")
    assert result.exit_code == 2
    assert result.stderr == f"Error: unknown event type 'chat_line'; valid types: {TYPES}\n"
    assert result.stdout == ""


def test_until_with_at_is_a_usage_error(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    result = invoke("replay", d, "--until", 5, "--at", T0)
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: --until and --at cannot be used together; give a position or a time\n"
    )


def test_bad_at_is_a_usage_error(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    result = invoke("replay", d, "--at", "yesterday")
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: --at: expected Unix seconds or an ISO 8601 time such as "
        "2025-11-02T14:00:00Z, got 'yesterday'\n"
    )


def test_typer_usage_errors_exit_2(tmp_path: Path) -> None:
    assert invoke("dump", tmp_path, "--from", "-1").exit_code == 2
    assert invoke("tail", tmp_path, "-n", "x").exit_code == 2
    assert invoke("export", tmp_path, "--format", "csv", "out").exit_code == 2
    assert invoke("frobnicate").exit_code == 2


# -- info ---------------------------------------------------------------------------------


def test_info_on_an_empty_store(tmp_path: Path) -> None:
    d = empty_store(tmp_path)
    result = invoke("info", d)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"store      {d}"
    assert "events     none" in lines
    assert "writer     none" in lines
    assert "snapshots  none" in lines
    data = json.loads(invoke("info", d, "--json").stdout)
    assert data["events"] == 0
    assert data["counts_by_type"] == {}
    assert data["first"] is None and data["last"] is None
    assert data["snapshots"] == []
    assert [s["events"] for s in data["segments"]] == [0]


def test_info_on_a_busy_store(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    result = invoke("info", d)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    segments = segment_files(d)
    assert len(segments) > 2
    assert "events     123, positions 1..123" in lines
    assert "first      #1  2023-11-14 22:13:20Z  user_stats_saved" in lines
    assert "last       #123  2023-11-14 22:23:20Z  channel_peak_raised" in lines
    assert "times      2023-11-14 22:13:20Z .. 2023-11-14 22:23:20Z" in lines
    assert any(
        line.startswith("snapshots  snapshot-00000000000000000123.snap  position 123")
        and line.endswith(", current")
        for line in lines
    )
    assert lines[lines.index("events by type") :] == [
        "events by type",
        "  type                 count",
        "  message_saved           60",
        "  user_stats_saved        60",
        "  channel_peak_raised      1",
        "  user_action_logged       1",
        "  user_count_logged        1",
    ]
    for seg in segments:
        assert any(line.startswith(f"  {seg.name}") for line in lines)

    data = json.loads(invoke("info", d, "--json").stdout)
    assert data["events"] == 123
    assert data["counts_by_type"] == {
        "message_saved": 60,
        "user_stats_saved": 60,
        "channel_peak_raised": 1,
        "user_action_logged": 1,
        "user_count_logged": 1,
    }
    assert data["first"] == {"position": 1, "time": T0, "type": "user_stats_saved"}
    assert data["last"] == {"position": 123, "time": T0 + 600, "type": "channel_peak_raised"}
    assert (data["earliest_time"], data["latest_time"]) == (T0, T0 + 600)
    assert [s["name"] for s in data["segments"]] == [p.name for p in segments]
    assert sum(s["events"] for s in data["segments"]) == 123
    assert data["segments_size"] == sum(p.stat().st_size for p in segments)
    assert data["writer_pid"] is None
    assert data["problems"] == []


# -- verify -------------------------------------------------------------------------------


def test_verify_a_healthy_store(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    result = invoke("verify", d)
    assert result.exit_code == 0, result.output
    n = len(segment_files(d))
    assert result.stdout.splitlines()[0].startswith(
        f"checked {n} segments, 123 frames, 123 events, positions 1..123 ("
    )
    assert result.stdout.splitlines()[-1] == "ok"
    data = json.loads(invoke("verify", d, "--json").stdout)
    assert data["ok"] is True
    assert data["problems"] == []
    assert (data["events"], data["frames"], data["snapshots_checked"]) == (123, 123, 1)


def test_verify_lists_damage_in_two_segments(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    segments = segment_files(d)
    first, third = segments[0], segments[2]
    bad1 = frame_offsets(first)[2]
    bad2 = frame_offsets(third)[1]
    flip(first, bad1 + FRAME_HEADER_SIZE + 1)  # inside a payload
    flip(third, bad2 + FRAME_HEADER_SIZE + 1)
    result = invoke("verify", d)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert f"problem: {first}: frame checksum mismatch at offset {bad1}" in lines
    assert f"problem: {third}: frame checksum mismatch at offset {bad2}" in lines
    assert lines[-1] == "2 problems found"
    assert "note: snapshots not checked: the log itself has problems" in lines

    data = json.loads(invoke("verify", d, "--json").stdout)
    assert data["ok"] is False
    assert data["problems"] == [
        {"path": str(first), "offset": bad1, "message": "frame checksum mismatch"},
        {"path": str(third), "offset": bad2, "message": "frame checksum mismatch"},
    ]
    # info reads past the damage too, and says so with exit code 1.
    info = invoke("info", d)
    assert info.exit_code == 1
    assert f"  {first}: frame checksum mismatch at offset {bad1}" in info.stdout.splitlines()


def test_info_names_the_end_of_a_damaged_log_by_its_last_good_frame(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    last = segment_files(d)[-1]
    flip(last, frame_offsets(last)[1] + FRAME_HEADER_SIZE + 1)  # the 2nd frame's payload
    first = int(last.name[:20])  # one event a frame: the first frame is the last good one
    info = invoke("info", d)
    assert info.exit_code == 1
    assert f"past the log's end {first}" in info.stdout, info.stdout


def test_verify_reports_a_missing_segment(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    segments = segment_files(d)
    segments[1].unlink()
    result = invoke("verify", d)
    assert result.exit_code == 1
    second_first = int(segments[2].name[:20])
    expected_first = int(segments[1].name[:20])
    assert (
        f"problem: {segments[2]}: segment starts at position {second_first}, expected "
        f"{expected_first} (positions {expected_first}..{second_first - 1} are missing) "
        "at offset 0"
    ) in result.stdout.splitlines()


def test_verify_torn_tail_is_a_problem_unless_a_writer_is_mid_write(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    last = segment_files(d)[-1]
    size = last.stat().st_size
    with last.open("ab") as f:  # the first 30 bytes of a frame that promises 200
        f.write(struct.pack("<IIQI", 200, 0, 124, 1) + b"\x00" * 10)
    result = invoke("verify", d)
    assert result.exit_code == 1
    assert (
        f"problem: {last}: torn tail: 30 bytes after the last complete frame (frame of 200 "
        "bytes runs past the end of the data); a crash mid-write leaves this, and the next "
        f"writer cuts it at offset {size}"
    ) in result.stdout.splitlines()
    lock = WriterLock(str(d))
    lock.acquire()
    try:
        live = invoke("verify", d)
    finally:
        lock.release()
    assert live.exit_code == 0, live.output
    assert (
        f"note: {last}: the writer (process {os.getpid()}) was writing 30 bytes at offset "
        f"{size}; not checked"
    ) in live.stdout.splitlines()


def test_verify_beside_a_live_writer(tmp_path: Path) -> None:
    d = busy_store(tmp_path)

    async def check_while_open() -> Result:
        async with EventStore(d, durability="flush") as store:
            await store.save_message("zed", "still here", timestamp=T0 + 5000)
            return await asyncio.to_thread(invoke, "verify", d)

    result = asyncio.run(check_while_open())
    assert result.exit_code == 0, result.output
    assert "124 events" in result.stdout


# -- dump -----------------------------------------------------------------------------------


def test_dump_everything(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    records = dumped(invoke("dump", d))
    assert [r["position"] for r in records] == list(range(1, 124))
    assert records[1] == {
        "position": 2,
        "type": "message_saved",
        "timestamp": T0,
        "username": "ada",
        "message": "line 0",
    }
    assert records[-1] == {
        "position": 123,
        "type": "channel_peak_raised",
        "timestamp": T0 + 600,
        "max_users": 3,
        "max_connected": 7,
    }


def test_dump_filters(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    window = dumped(invoke("dump", d, "--from", 10, "--to", 14))
    assert [r["position"] for r in window] == [10, 11, 12, 13, 14]

    messages = dumped(invoke("dump", d, "--type", "message_saved"))
    assert [r["position"] for r in messages] == list(range(2, 121, 2))
    assert {r["type"] for r in messages} == {"message_saved"}

    two = dumped(invoke("dump", d, "--type", "user_count_logged", "--type", "user_action_logged"))
    assert [(r["position"], r["type"]) for r in two] == [
        (121, "user_action_logged"),
        (122, "user_count_logged"),
    ]

    bob = dumped(invoke("dump", d, "--user", "bob", "--type", "message_saved", "--from", 50))
    assert [r["message"] for r in bob] == [f"line {i}" for i in range(25, 60) if i % 3 == 1]
    assert {r["username"] for r in bob} == {"bob"}

    ada = dumped(invoke("dump", d, "--user", "ada", "--to", 8))
    assert [r["position"] for r in ada] == [1, 2, 7, 8]
    assert dumped(invoke("dump", d, "--user", "nobody")) == []
    assert dumped(invoke("dump", d, "--from", 200)) == []
    assert dumped(invoke("dump", d, "--from", 5, "--to", 5))[0]["position"] == 5

    backwards = invoke("dump", d, "--from", 10, "--to", 5)
    assert backwards.exit_code == 2
    assert "--to 5 is before --from 10: the range is empty" in backwards.stderr


# -- tail -----------------------------------------------------------------------------------


def test_tail_n(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    result = invoke("tail", d, "-n", 3)
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "     121  2023-11-14 22:13:25Z  user_action_logged    "
        '{"timestamp":1700000005,"username":"ada","action_type":"join","details":null}',
        "     122  2023-11-14 22:23:20Z  user_count_logged     "
        '{"timestamp":1700000600,"chat_users":3,"connected_users":7}',
        "     123  2023-11-14 22:23:20Z  channel_peak_raised   "
        '{"timestamp":1700000600,"max_users":3,"max_connected":7}',
    ]
    assert [r["position"] for r in dumped(invoke("tail", d, "-n", 5, "--json"))] == list(
        range(119, 124)
    )
    assert len(invoke("tail", d).stdout.splitlines()) == 10
    assert len(invoke("tail", d, "-n", 1000).stdout.splitlines()) == 123
    assert invoke("tail", d, "-n", 0).stdout == ""


def test_tail_follows_a_live_writer(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    follower = subprocess.Popen(
        [sys.executable, "-m", "cli", "tail", str(d), "-n", "1", "-f", "--json"],
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

    def next_record() -> dict[str, Any]:
        return dict(json.loads(lines.get(timeout=15)))

    try:
        assert next_record()["position"] == 123  # -n 1: the last one

        async def write() -> None:
            async with EventStore(d, durability="flush", segment_size=1024) as store:
                for i in range(30):  # enough to roll a segment
                    await store.save_message("zed", f"live {i}", timestamp=T0 + 1000 + i)
                # Still open: the follower reads beside the writer.
                got = [await asyncio.to_thread(next_record) for _ in range(30)]
                assert [r["position"] for r in got] == list(range(124, 154))
                assert [r["message"] for r in got] == [f"live {i}" for i in range(30)]

        asyncio.run(write())
    finally:
        follower.send_signal(signal.SIGINT)
        try:
            _, err = follower.communicate(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover
            follower.kill()
            raise
    assert follower.returncode == 0, err
    assert "Traceback" not in err


async def test_tail_events_follow_stops_when_the_loop_is_left(tmp_path: Path) -> None:
    from eventstore.inspect import tail_events

    d = tmp_path / "s"
    async with EventStore(d) as store:
        await store.save_message("ada", "before", timestamp=T0)
        seen: list[str] = []
        events = tail_events(d, 5, follow=True, interval=0.05)
        async for _, event in events:
            seen.append(event.message)  # type: ignore[union-attr]
            if len(seen) == 1:
                await store.save_message("ada", "after", timestamp=T0 + 1)
            if len(seen) == 2:
                break
        await events.aclose()
    assert seen == ["before", "after"]


# -- replay ---------------------------------------------------------------------------------


def test_replay_text(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    result = invoke("replay", d, "--until", 6, "--limit", 2)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"{d} up to position 6: 6 events applied, last position 6 of 123; 3 users",
        "",
        "top chatters",
        "  user  lines  connected  first seen            last seen",
        "  ada       1  0s         2023-11-14 22:13:20Z  2023-11-14 22:13:20Z",
        "  bob       1  0s         2023-11-14 22:13:20Z  2023-11-14 22:13:30Z",
        "",
        "channel peaks",
        "                  users  at",
        "  most in chat        0  -",
        "  most connected      0  -",
        "",
        "recent chat",
        "  2023-11-14 22:13:40Z  cy: line 2",
        "  2023-11-14 22:13:30Z  bob: line 1",
        "",
        "recent actions",
        "  (no actions)",
        "",
        "user counts",
        "  (no samples)",
    ]


def test_replay_shows_control_characters_in_chat_as_escapes(tmp_path: Path) -> None:
    """Viewers write the chat; a terminal must not act on what they wrote."""

    async def write() -> None:
        async with EventStore(tmp_path / "s", clock=FakeClock(T0)) as store:
            await store.save_user_stats("e\x1bve", chat_lines=1)
            await store.save_message("e\x1bve", "hi\x1b[31mRED\n  2026-11-26 admin: fake\r\u202e")
            await store.log_user_action("e\x1bve", "pm\x07", details="!x\x1b]0;title\x07")

    asyncio.run(write())
    result = invoke("replay", tmp_path / "s", "--limit", 1)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert (
        "  2023-11-14 22:13:20Z  e\\u001bve: hi\\u001b[31mRED\\u000a  2026-11-26 admin: "
        "fake\\u000d\\u202e" in lines
    )
    assert "  2023-11-14 22:13:20Z  e\\u001bve pm\\u0007 !x\\u001b]0;title\\u0007" in lines
    assert any(line.startswith("  e\\u001bve ") for line in lines)  # top chatters
    assert not any(c in result.stdout for c in "\x1b\x07\r\u202e")


def test_tail_shows_what_json_leaves_raw_as_escapes(tmp_path: Path) -> None:
    """tail's text lines hold JSON, which escapes only the C0 controls: DEL,
    the C1 controls, line separators and direction overrides need escapes too."""
    nasty = "hi\u202e\u2028\x7f\x9b2J\x85\x1b[31m there"

    async def write() -> None:
        async with EventStore(tmp_path / "s", clock=FakeClock(T0)) as store:
            await store.save_message("mal\u2066lory", nasty)

    asyncio.run(write())
    result = invoke("tail", tmp_path / "s")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(
        '{"timestamp":1700000000,"username":"mal\\u2066lory","message":'
        '"hi\\u202e\\u2028\\u007f\\u009b2J\\u0085\\u001b[31m there"}\n'
    )
    assert not any(c in result.stdout for c in "\u202e\u2028\x7f\x9b\x85\x1b\u2066")
    # The JSON output keeps the text as it is, for programs.
    (line,) = invoke("tail", tmp_path / "s", "--json").stdout.removesuffix("\n").split("\n")
    assert json.loads(line)["message"] == nasty


def test_replay_limit_0_does_not_claim_empty_lists(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    result = invoke("replay", d, "--limit", 0)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "(no users)" not in out and "(no messages)" not in out and "(no actions)" not in out
    assert out.count("  (not listed: --limit 0)") == 3


def test_replay_json_at_a_moment(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    # T0 + 100: lines 0..10 said, the join (T0 + 5) made, no count or peak yet.
    result = invoke("replay", d, "--at", T0 + 100, "--json", "--limit", 3)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["at"] == T0 + 100
    assert data["events_applied"] == 23
    assert data["events_skipped"] == 100
    assert [m["message"] for m in data["recent_chat"]] == ["line 10", "line 9", "line 8"]
    assert [(u["username"], u["total_chat_lines"]) for u in data["top_chatters"]] == [
        ("ada", 4),
        ("bob", 4),
        ("cy", 3),
    ]
    assert data["channel_peaks"]["max_users"] == 0
    assert data["user_counts"] == {"samples": 0}
    assert [a["action_type"] for a in data["recent_actions"]] == ["join"]
    # The same moment in ISO 8601, with and without a zone.
    for text in ("2023-11-14T22:15:00Z", "2023-11-14T22:15:00", "2023-11-14T23:15:00+01:00"):
        same = json.loads(invoke("replay", d, "--at", text, "--json", "--limit", 3).stdout)
        assert same == data, text


def test_replay_at_a_time_in_milliseconds_says_so(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    millis = (T0 + 100) * 1000
    result = invoke("replay", d, "--at", millis, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["events_applied"] == 123  # every event: it is far ahead
    assert result.stderr == (
        f"note: --at {millis} is after the year 9999 in Unix seconds; if it is in "
        f"milliseconds, use {T0 + 100}\n"
    )
    # The last second an ISO 8601 time can name passes without a note.
    assert invoke("replay", d, "--at", 253_402_300_799, "--json").stderr == ""


def test_replay_now(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    data = json.loads(invoke("replay", d, "--json").stdout)
    assert (data["position"], data["events_applied"], data["users"]) == (123, 123, 3)
    assert data["channel_peaks"]["max_connected"] == 7
    assert data["user_counts"]["samples"] == 1


# -- demo ----------------------------------------------------------------------------------


def test_demo_minutes_are_bounded(tmp_path: Path) -> None:
    result = invoke("demo", tmp_path / "d", "--minutes", MAX_MINUTES + 1)
    assert result.exit_code == 2
    assert "--minutes" in result.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("minutes", [0, MAX_MINUTES + 1, 1.5])
async def test_play_refuses_minutes_out_of_range(tmp_path: Path, minutes: Any) -> None:
    from eventstore.demo import play

    async with EventStore(tmp_path / "d") as store:
        with pytest.raises(ValueError, match=f"minutes must be an int from 1 to {MAX_MINUTES}"):
            await play(store, minutes=minutes)
        assert store.position == 0


def test_demo_then_inspect_it(tmp_path: Path) -> None:
    d = tmp_path / "demo"
    started = time.monotonic()
    result = invoke("demo", d, "--minutes", 60, "--seed", 3)
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 30
    out = result.stdout
    assert out.startswith("played 60 simulated minutes of a busy channel (seed 3), ")
    for section in ("top chatters", "channel peaks", "recent chat", "user counts"):
        assert f"\n{section}\n" in out
    assert f"store: {d} (" in out
    assert "It persists" in out

    info = json.loads(invoke("info", d, "--json").stdout)
    assert info["events"] > 300
    assert set(info["counts_by_type"]) >= {
        "user_stats_saved",
        "message_saved",
        "user_action_logged",
        "session_ended",
        "user_count_logged",
        "channel_peak_raised",
    }
    assert invoke("verify", d).exit_code == 0
    now = json.loads(invoke("replay", d, "--json").stdout)
    assert now["position"] == info["last"]["position"]
    assert now["top_chatters"] and now["recent_chat"]
    assert now["user_counts"]["samples"] == 12  # one every five minutes

    # A second run appends to the same store, later in time.
    again = json.loads(invoke("demo", d, "--minutes", 10, "--json").stdout)
    assert again["played"]["first_position"] == info["last"]["position"] + 1
    assert again["played"]["start"] > info["latest_time"]
    assert again["answers"]["position"] == again["played"]["last_position"]


def test_demo_refuses_a_store_it_did_not_fill(tmp_path: Path) -> None:
    d = tmp_path / "bot"

    async def write() -> None:
        store = EventStore(d)
        await store.connect()
        await store.save_message("ada", "a demo name")
        await store.save_message("bob", "the bot's own viewer")
        # The bot dies: its zeros written ahead stay, which a writer's open cuts.
        store._log._lock.release()  # type: ignore[attr-defined]
        store._connected = False

    asyncio.run(write())
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    before = invoke("dump", d).stdout
    result = invoke("demo", d, "--minutes", 5)
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        "Error: the store is not a demo store: it knows users the demo does not play "
        "('bob'); the demo writes only into an empty store or one it filled; nothing written\n"
    )
    assert invoke("dump", d).stdout == before
    assert {p.name: p.read_bytes() for p in d.iterdir()} == files  # not even opened to write


# -- import and export ----------------------------------------------------------------------


def legacy_db(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(LEGACY_SCHEMA)
    conn.executescript(
        "CREATE TABLE api_tokens (token TEXT PRIMARY KEY);"
        f"INSERT INTO user_stats VALUES ('ada', {T0}, {T0 + 50}, 4, 60, NULL);"
        f"INSERT INTO channel_stats VALUES (1, 9, {T0}, 12, {T0}, {T0});"
        f"INSERT INTO user_actions (timestamp, username, action_type) VALUES ({T0}, 'ada', 'join');"
        f"INSERT INTO user_count_history (timestamp, chat_users, connected_users) "
        f"VALUES ({T0}, 3, 5);"
        f"INSERT INTO recent_chat (timestamp, username, message) VALUES ({T0 + 1}, 'ada', 'hi');"
    )
    conn.commit()
    conn.close()
    return path


def test_replay_at_on_an_imported_store_notes_the_records_it_leaves_out(tmp_path: Path) -> None:
    """An import writes each user's whole history as one UserStatsSet, dated
    by its last moment: a point before it shows the user unknown, and says why."""
    d = tmp_path / "store"
    assert invoke("import-sqlite", legacy_db(tmp_path / "bot.db"), d).exit_code == 0
    result = invoke("replay", d, "--at", T0 + 10)
    assert result.exit_code == 0, result.output
    assert (
        "note: 1 statistics record (a user's or the channel's whole history, written by an "
        "import or a compaction) is dated by its latest moment, after --at, and left out: "
        "those users and peaks show as unknown before it"
    ) in result.stdout
    data = json.loads(invoke("replay", d, "--at", T0 + 10, "--json").stdout)
    assert data["records_skipped"] == 1 and data["users"] == 0
    # Once past ada's last moment her record is in, and nothing is noted.
    later = invoke("replay", d, "--at", T0 + 50)
    assert "note:" not in later.stdout
    assert json.loads(invoke("replay", d, "--at", T0 + 50, "--json").stdout)["users"] == 1


def test_import_sqlite(tmp_path: Path) -> None:
    db = legacy_db(tmp_path / "bot.db")
    d = tmp_path / "store"
    result = invoke("import-sqlite", db, d)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"imported {db} into {d}: 5 events (positions 1..5)",
        "  user_stats: 1 row",
        "  channel_stats: 1 row",
        "  user_actions: 1 row",
        "  user_count_history: 1 row",
        "  recent_chat: 1 row",
        "  events: 5",
        "  ignored table: api_tokens",
    ]
    data = json.loads(invoke("replay", d, "--json").stdout)
    assert data["recent_chat"][0]["message"] == "hi"

    again = invoke("import-sqlite", db, d)
    assert again.exit_code == 1
    assert again.stderr == (
        f"Error: {d} is not empty (its last event is at position 5); import into a new "
        "directory, or pass --force to add the file's data to it\n"
    )
    forced = json.loads(invoke("import-sqlite", db, d, "--force", "--json").stdout)
    assert forced["events"] == 5 and forced["first_position"] == 6
    assert forced["ignored_tables"] == ["api_tokens"]


def _chat_db(path: Path, rows: int) -> Path:
    legacy_db(path)
    conn = sqlite3.connect(path)
    conn.executemany(
        "INSERT INTO recent_chat (timestamp, username, message) VALUES (?, 'bob', ?)",
        [(T0 + 2 + i, f"line {i}") for i in range(rows)],
    )
    conn.commit()
    conn.close()
    return path


def _after_each_batch(monkeypatch: pytest.MonkeyPatch, then: Callable[[], None]) -> None:
    """Make the CLI's import append 2 events a batch and call ``then`` after each."""
    import cli.transfer
    from eventstore.legacy import import_sqlite

    async def importing(store: EventStore, db: str, **kwargs: Any) -> Any:
        given = kwargs.get("progress")

        def progress(done: int) -> None:
            if given is not None:
                given(done)  # the CLI's own count of what was acknowledged
            then()

        kwargs.update(batch_size=2, progress=progress)
        return await import_sqlite(store, db, **kwargs)

    monkeypatch.setattr(cli.transfer, "import_legacy", importing)


def _stop_after_first_batch(monkeypatch: pytest.MonkeyPatch, stop: BaseException) -> None:
    """Make the CLI's import raise ``stop`` once its first batch (2 events) is appended."""

    def raise_stop() -> None:
        raise stop

    _after_each_batch(monkeypatch, raise_stop)


@pytest.mark.parametrize("existing", [False, True], ids=["new directory", "empty directory"])
def test_an_import_interrupted_half_way_removes_the_store_it_began(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    db = legacy_db(tmp_path / "bot.db")
    d = tmp_path / "store"
    if existing:
        d.mkdir()
    _stop_after_first_batch(monkeypatch, KeyboardInterrupt())
    result = invoke("import-sqlite", db, d)
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        f"Error: the import was interrupted after 2 events; the store it had begun in {d} "
        "was removed, so nothing of the file is kept\n"
    )
    assert d.exists() == existing and not (existing and any(d.iterdir()))


def test_an_import_that_fails_half_way_into_a_store_says_what_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = legacy_db(tmp_path / "bot.db")
    d = tmp_path / "store"
    assert invoke("import-sqlite", db, d).exit_code == 0
    held = invoke("dump", d).stdout
    _stop_after_first_batch(monkeypatch, OSError(28, "No space left on device"))
    result = invoke("import-sqlite", db, d, "--force")
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        "Error: [Errno 28] No space left on device\n"
        f"Error: the import failed after 2 events; they were removed again, so {d} holds "
        "what it held before (up to position 5)\n"
    )
    assert invoke("dump", d).stdout == held
    assert not (d / "IMPORTING-MORE").exists()
    assert asyncio.run(_position_after_connect(d)) == 5


async def _position_after_connect(d: Path) -> int:
    """Open ``d`` for writing (as the bot would) and return its position."""
    async with EventStore(d) as store:
        return store.position


def _disk_full_after_first_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the log's writes fail (ENOSPC) once the import's first batch (2 events) is in."""
    import eventstore.segmentlog as segmentlog

    def full(*args: Any) -> int:
        raise OSError(28, "No space left on device")

    _after_each_batch(monkeypatch, lambda: monkeypatch.setattr(segmentlog.os, "pwrite", full))


@pytest.mark.parametrize("existing", [False, True], ids=["new directory", "store"])
def test_an_import_that_fills_the_disk_says_what_the_store_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    """The write of the second batch fails: the store stops with that batch
    applied to its read models but not in the log, so its position counts
    two events the log does not hold.  The report must count only what the
    log acknowledged."""
    db = legacy_db(tmp_path / "bot.db")
    d = tmp_path / "store"
    if existing:
        assert invoke("import-sqlite", db, d).exit_code == 0
    held = invoke("dump", d).stdout if existing else ""
    _disk_full_after_first_batch(monkeypatch)
    result = invoke("import-sqlite", db, d, *(["--force"] if existing else []))
    monkeypatch.undo()
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Error: ") and lines[0].endswith("No space left on device")
    if existing:
        assert lines[1:] == [
            f"Error: the import failed after 2 events; they were removed again, so {d} "
            "holds what it held before (up to position 5)"
        ]
        assert invoke("dump", d).stdout == held
    else:
        assert lines[1:] == [
            f"Error: the import failed after 2 events; the store it had begun in {d} was "
            "removed, so nothing of the file is kept"
        ]
        assert not d.exists()


@pytest.mark.parametrize("existing", [False, True], ids=["new directory", "empty directory"])
def test_an_import_whose_store_cannot_be_created_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    """A disk with no room even for the new store's first segment: the error
    names the file, and the directory the import made (with its LOCK) is not
    left behind."""
    import eventstore.segmentlog as segmentlog

    def full(fd: int, data: Any) -> None:
        raise OSError(28, "No space left on device")

    db = legacy_db(tmp_path / "bot.db")
    d = tmp_path / "store"
    if existing:
        d.mkdir()
    monkeypatch.setattr(segmentlog, "write_all", full)
    result = invoke("import-sqlite", db, d)
    monkeypatch.undo()
    assert result.exit_code == 1, result.output
    assert result.stderr == f"Error: {d}/00000000000000000001.seg.tmp: No space left on device\n"
    assert d.exists() == existing and not (existing and any(d.iterdir()))


def _ctrl_c_once_written(d: Path, *args: str) -> tuple[int, str, str]:
    """Run ``eventstore ARGS`` and send it SIGINT once a segment of ``d`` holds a frame."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size > HEADER_SIZE for p in d.glob("*.seg")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_ctrl_c_during_an_import_leaves_no_store(tmp_path: Path) -> None:
    db = _chat_db(tmp_path / "bot.db", 300_000)
    d = tmp_path / "store"
    # Interrupted once the import has appended something (the file is checked first).
    code, out, err = _ctrl_c_once_written(d, "import-sqlite", str(db), str(d))
    assert code == 1, (out, err)
    assert err.startswith("Error: the import was interrupted after "), err
    assert "Traceback" not in err
    assert not d.exists()


def test_ctrl_c_during_the_demo_says_what_the_store_keeps(tmp_path: Path) -> None:
    d = tmp_path / "demo"
    code, out, err = _ctrl_c_once_written(d, "demo", str(d), "--minutes", "500000")
    assert code == 130, (out, err)
    assert err == (
        f"interrupted: {d} keeps what was played so far; eventstore demo {d} continues after it\n"
    )
    result = invoke("verify", d)
    assert result.exit_code == 0, result.output
    assert int(re.search(r"(\d+) events", result.stdout)[1]) > 0  # type: ignore[index]


def test_an_import_killed_half_way_is_imported_anew_by_the_next_run(tmp_path: Path) -> None:
    """SIGKILL (or a power cut) gives the import no chance to remove what it
    wrote into the new directory: the next run must not take that part of
    the file for a store (refusing, or adding the file again with --force)."""
    db = legacy_db(tmp_path / "bot.db")
    whole = tmp_path / "whole"
    assert invoke("import-sqlite", db, whole).exit_code == 0
    d = tmp_path / "store"
    script = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
import cli.transfer
from cli.main import app
from eventstore.legacy import import_sqlite
async def killed(store, db, **kwargs):
    def progress(done):
        os._exit(9)  # killed once the first batch is acknowledged
    kwargs.update(batch_size=2, progress=progress)
    return await import_sqlite(store, db, **kwargs)
cli.transfer.import_legacy = killed
app(["import-sqlite", {str(db)!r}, {str(d)!r}])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    assert any(p.stat().st_size > HEADER_SIZE for p in d.glob("*.seg"))  # part of the file
    # Nothing writes into the half-import meanwhile (the next run removes it):
    # a writer is refused, saying why; read-only tools still look inside.
    with pytest.raises(ConnectionError, match="an import into it did not finish"):
        asyncio.run(EventStore(d).connect())
    assert invoke("info", d).exit_code == 0
    compact = invoke("compact", d)
    assert compact.exit_code == 1 and "did not finish (IMPORTING is there)" in compact.stderr
    again = invoke("import-sqlite", db, d)
    assert again.exit_code == 0, again.output
    assert "left unfinished" in again.stderr
    assert invoke("dump", d).stdout == invoke("dump", whole).stdout


def test_an_import_into_a_store_interrupted_half_way_leaves_it_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = legacy_db(tmp_path / "bot.db")
    d = busy_store(tmp_path)
    held = invoke("dump", d).stdout
    _stop_after_first_batch(monkeypatch, KeyboardInterrupt())
    result = invoke("import-sqlite", db, d, "--force")
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        f"Error: the import was interrupted after 2 events; they were removed again, so {d} "
        "holds what it held before (up to position 123)\n"
    )
    assert invoke("dump", d).stdout == held
    assert sorted(p.name for p in d.iterdir() if "IMPORTING" in p.name) == []
    assert invoke("verify", d).exit_code == 0
    assert asyncio.run(_position_after_connect(d)) == 123


_KILLED_IMPORT = """
import os, sys
sys.path.insert(0, {repo!r})
import cli.transfer
from cli.main import app
from eventstore.legacy import import_sqlite
async def killed(store, db, **kwargs):
    def progress(done):
        if done >= {after}:
            os._exit(9)  # killed once a batch is acknowledged
    kwargs.update(batch_size=2, progress=progress)
    return await import_sqlite(store, db, **kwargs)
cli.transfer.import_legacy = killed
app(["import-sqlite", {db!r}, {d!r}, *{more!r}])
"""


def test_an_import_into_a_store_killed_half_way_is_removed_by_the_next_run(
    tmp_path: Path,
) -> None:
    """SIGKILL gives an import with --force no chance to take back what it
    added: the store keeps writers out, says which events are the file's,
    and the next run removes them before importing the file whole, once."""
    db = legacy_db(tmp_path / "bot.db")
    d = busy_store(tmp_path)
    whole = copy_store(d, tmp_path / "whole")
    assert invoke("import-sqlite", db, whole, "--force").exit_code == 0
    held = invoke("dump", d).stdout
    script = _KILLED_IMPORT.format(repo=str(REPO), after=4, db=str(db), d=str(d), more=["--force"])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    assert (d / "IMPORTING-MORE").exists()
    assert len(invoke("dump", d).stdout.splitlines()) == 123 + 4  # part of the file
    with pytest.raises(ConnectionError, match="the events after position 123 are part of a file"):
        asyncio.run(EventStore(d).connect())
    compact = invoke("compact", d)
    assert compact.exit_code == 1 and "(IMPORTING-MORE is there)" in compact.stderr
    # Without --force the part is removed all the same, and the store, which
    # holds events, is refused as ever.
    again = invoke("import-sqlite", db, d)
    assert again.exit_code == 1, again.output
    assert again.stderr.startswith(
        f"warning: {d} held part of a file that an import killed before it finished had "
        "added after position 123; removed it\n"
    )
    assert "pass --force" in again.stderr
    assert invoke("dump", d).stdout == held
    assert invoke("import-sqlite", db, d, "--force").exit_code == 0
    assert invoke("dump", d).stdout == invoke("dump", whole).stdout
    assert not (d / "IMPORTING-MORE").exists()


def test_an_import_into_a_store_sigkilled_mid_write_is_removed_by_the_next_run(
    tmp_path: Path,
) -> None:
    """The same with a real SIGKILL at an arbitrary moment of a long import,
    which can leave a torn frame at the end of the log."""
    db = _chat_db(tmp_path / "bot.db", 100_000)
    d = busy_store(tmp_path)
    whole = copy_store(d, tmp_path / "whole")
    assert invoke("import-sqlite", db, whole, "--force").exit_code == 0
    size = sum(p.stat().st_size for p in d.glob("*.seg"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "import-sqlite", str(db), str(d), "--force"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while sum(p.stat().st_size for p in d.glob("*.seg")) < size + 64 * 1024:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert (d / "IMPORTING-MORE").exists()
    again = invoke("import-sqlite", db, d, "--force")
    assert again.exit_code == 0, again.output
    assert "added after position 123; removed it\n" in again.stderr
    assert invoke("dump", d).stdout == invoke("dump", whole).stdout
    assert invoke("verify", d).exit_code == 0


def test_an_import_into_an_empty_store_killed_half_way_is_removed_too(tmp_path: Path) -> None:
    """A store with no events yet is not "new" (it has its files): its
    marker names position 0, and the next run cuts the log back to nothing."""
    db = legacy_db(tmp_path / "bot.db")
    d = empty_store(tmp_path)
    script = _KILLED_IMPORT.format(repo=str(REPO), after=2, db=str(db), d=str(d), more=[])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    assert "\nposition before the import: 0\n" in (d / "IMPORTING-MORE").read_text()
    again = invoke("import-sqlite", db, d)
    assert again.exit_code == 0, again.output
    assert "added after position 0; removed it\n" in again.stderr
    assert len(invoke("dump", d).stdout.splitlines()) == 5


@pytest.mark.parametrize("existing", [False, True], ids=["new directory", "store"])
def test_an_import_that_fails_after_it_is_whole_keeps_every_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    """A failure after the last event is durable (removing the marker,
    closing the store) must not undo the import as if it had stopped half-way."""
    db = legacy_db(tmp_path / "bot.db")
    d, d2, whole = tmp_path / "first", tmp_path / "again", tmp_path / "whole"
    if existing:
        base = busy_store(tmp_path)
        for copy in (d, d2, whole):
            copy_store(base, copy)
    assert invoke("import-sqlite", db, whole, "--force").exit_code == 0
    real_close = EventStore.close

    async def close_fails(self: EventStore) -> None:
        await real_close(self)
        raise StorageError("the snapshot could not be written")

    monkeypatch.setattr(EventStore, "close", close_fails)
    result = invoke("import-sqlite", db, d, "--force")
    monkeypatch.undo()
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        "Error: the snapshot could not be written\n"
        f"Error: the import is whole: {d} holds every event of the file\n"
    )
    assert invoke("dump", d).stdout == invoke("dump", whole).stdout

    def unlink_fails(path: str) -> None:
        raise OSError(5, "Input/output error", path)

    monkeypatch.setattr(cli.transfer, "remove_marker", unlink_fails)
    result = invoke("import-sqlite", db, d2, "--force")
    monkeypatch.undo()
    marker = d2 / ("IMPORTING-MORE" if existing else "IMPORTING")
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        f"Error: {marker}: Input/output error\n"
        f"Error: the import is whole, but {marker} could not be removed, and keeps writers "
        "out of the store: delete it\n"
    )
    assert marker.exists()
    marker.unlink()
    assert invoke("dump", d2).stdout == invoke("dump", whole).stdout


@pytest.mark.parametrize("damage", ["a digit flipped", "cut short"])
def test_a_damaged_marker_is_refused_not_obeyed(tmp_path: Path, damage: str) -> None:
    """Obeyed, a flipped digit of its position would cut the store's own history."""
    from eventstore.importmarker import write_marker

    db = legacy_db(tmp_path / "bot.db")
    d = busy_store(tmp_path)
    held = invoke("dump", d).stdout
    marker = Path(write_marker(str(d), 123))
    text = marker.read_bytes()
    assert b"position before the import: 123\n" in text
    if damage == "a digit flipped":
        marker.write_bytes(text.replace(b": 123\n", b": 023\n"))
    else:
        marker.write_bytes(text[: text.index(b"position")])
    result = invoke("import-sqlite", db, d, "--force")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {d}/IMPORTING-MORE: damaged (its checksum line")
    assert invoke("dump", d).stdout == held
    expected = "the events at its end are part of a file"
    with pytest.raises(ConnectionError, match=expected):
        asyncio.run(EventStore(d).connect())


def test_library_warnings_are_prefixed_lines(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    assert invoke("snapshot", d).exit_code == 0
    newest = sorted(d.glob("snapshot-*"))[-1]
    newest.write_bytes(b"garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "snapshot", str(d)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith(f"warning: ignoring snapshot {newest}: "), proc.stderr


def test_bad_file_names_are_named(tmp_path: Path) -> None:
    result = invoke("import-sqlite", "/dev/null", tmp_path / "store")
    assert (result.exit_code, result.stderr) == (1, "Error: /dev/null: not a regular file\n")
    assert not (tmp_path / "store").exists()
    d = busy_store(tmp_path)
    result = invoke("export", d, "--format", "jsonl", "")
    assert (result.exit_code, result.stderr) == (
        2,
        "Error: OUT is empty; give a file name, or '-' for stdout\n",
    )
    result = invoke("replay", d, "--at", "1969-12-31T23:59:59.5Z")
    assert result.exit_code == 2 and "is before 1970" in result.stderr
    # Digits of other scripts are not Unix seconds.
    result = invoke("replay", d, "--at", "\uff11\uff12\uff13")
    assert result.exit_code == 2 and result.stderr.startswith("Error: --at: expected Unix seconds")


def test_import_sqlite_missing_file(tmp_path: Path) -> None:
    result = invoke("import-sqlite", tmp_path / "nope.db", tmp_path / "store")
    assert result.exit_code == 1
    assert result.stderr == f"Error: {tmp_path / 'nope.db'}: no such file\n"
    assert not (tmp_path / "store").exists()


def _bad_row_db(path: Path) -> Path:
    legacy_db(path)
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO recent_chat (timestamp, username, message) VALUES (-7, 'bob', 'x')")
    conn.commit()
    conn.close()
    return path


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda p: p.write_text("not a database\n") and p, "not a readable SQLite database"),
        (lambda p: p.write_bytes(b"") or p, "none of the bot's tables"),
        (_bad_row_db, "timestamp must be >= 0, got -7"),
    ],
    ids=["text file", "empty file", "bad row"],
)
def test_import_sqlite_of_a_bad_file_leaves_no_store(tmp_path: Path, make: Any, error: str) -> None:
    db = tmp_path / "bot.db"
    make(db)
    result = invoke("import-sqlite", db, tmp_path / "store")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"Error: {db}") and error in result.stderr, result.stderr
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    "args",
    [["demo", "{f}"], ["import-sqlite", "{db}", "{f}"], ["info", "{f}"], ["compact", "{f}"]],
    ids=lambda a: a[0],
)
def test_a_file_where_a_store_directory_belongs_is_named(tmp_path: Path, args: list[str]) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    db = legacy_db(tmp_path / "bot.db")
    result = invoke(*[a.format(f=f, db=db) for a in args])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {f}: is a file, not a store directory\n"
    assert f.read_text() == "x"


@pytest.mark.parametrize("fmt", ["jsonl", "sqlite"])
def test_export_into_a_missing_directory_names_it(tmp_path: Path, fmt: str) -> None:
    d = busy_store(tmp_path)
    target = tmp_path / "nosuchdir" / "out.db"
    result = invoke("export", d, "--format", fmt, target)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {target}: no such directory: {target.parent}\n"


def test_export_jsonl_and_sqlite(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    out = tmp_path / "events.jsonl"
    result = invoke("export", d, "--format", "jsonl", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"exported {d} to {out}: 123 events\n"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == dumped(invoke("dump", d))

    refused = invoke("export", d, "--format", "jsonl", out)
    assert refused.exit_code == 1
    assert refused.stderr == f"Error: {out}: already exists; refusing to overwrite it\n"

    db = tmp_path / "backup.db"
    result = invoke("export", d, "--format", "sqlite", db)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"exported {d} to {db}: 3 user_stats, ")
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM recent_chat").fetchone() == (60,)
    conn.close()


def test_export_jsonl_to_stdout(tmp_path: Path) -> None:
    d = busy_store(tmp_path)
    result = invoke("export", d, "--format", "jsonl", "-")
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 123
    assert result.stderr == f"exported {d} to stdout: 123 events\n"
    bad = invoke("export", d, "--format", "sqlite", "-")
    assert bad.exit_code == 2
    assert bad.stderr == "Error: --format sqlite needs a file name, not '-'\n"


URL_COMMANDS = [
    ["info", "{url}"],
    ["verify", "{url}"],
    ["dump", "{url}"],
    ["tail", "{url}"],
    ["replay", "{url}"],
    ["compact", "{url}"],
    ["forget-user", "{url}", "bob"],
    ["export", "{url}", "--format", "jsonl", "{tmp}/out.jsonl"],
    ["import-sqlite", "{legacy}", "{url}"],
    ["demo", "{url}"],
]


@pytest.mark.parametrize("args", URL_COMMANDS, ids=lambda a: a[0])
def test_a_url_without_asyncpg_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # import asyncpg now fails
    legacy = legacy_db(tmp_path / "legacy.db")
    values = {"url": "postgresql://bot@db.example/bot", "tmp": tmp_path, "legacy": legacy}
    result = invoke(*[a.format(**values) for a in args])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: the PostgreSQL log needs asyncpg, which is not installed: "
        "pip install 'eventstore[postgres]' (in a checkout: pip install -e '.[postgres]')"
    )


def test_a_broken_pipe_that_is_not_stdout_is_an_error() -> None:
    """A socket to the database breaking is a failure, even if it is EPIPE."""
    script = (
        "import typer\n"
        "from cli import output as out\n"
        "async def boom():\n"
        "    raise BrokenPipeError(32, 'Broken pipe')\n"
        "try:\n"
        "    out.run(boom())\n"
        "except typer.Exit as done:\n"
        "    raise SystemExit(done.exit_code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1, proc
    assert proc.stderr.strip() == "Error: [Errno 32] Broken pipe"


@pytest.mark.parametrize(
    ("command", "more"),
    [
        ("info", []),
        ("verify", []),
        ("dump", []),
        ("replay", []),
        ("export", ["--format", "jsonl", "-"]),
    ],
)
def test_a_reader_that_stops_reading_is_not_a_failure(
    tmp_path: Path, command: str, more: list[str]
) -> None:
    """``eventstore info | head -1``: exit 0 and nothing on stderr, not the
    exit 1 that means a problem was found."""
    d = busy_store(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", command, str(d), *more],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # gone before the first line: every write is a broken pipe
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 0
    assert stderr == b""


@pytest.mark.parametrize("args", [["--help"], ["dump", "--help"]])
def test_a_reader_that_stops_reading_help_is_not_a_failure(args: list[str]) -> None:
    """``eventstore --help | head -1``: click prints help itself, and exits 1
    on a broken pipe; exit 0 instead, as the commands do."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 0
    assert stderr == b""


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--nonsense"], 2),
        (["dump", "--nonsense"], 2),
        (["dump", "{store}", "--type", "no_such_type"], 2),
        (["dump", "{store}/no-such-store"], 1),
    ],
)
def test_a_failure_into_a_closed_pipe_is_still_a_failure(
    tmp_path: Path, args: list[str], code: int
) -> None:
    """``eventstore --nonsense 2>&1 | true``: the exit code it has without the pipe."""
    store = busy_store(tmp_path)
    argv = [a.format(store=store) for a in args]
    assert (
        subprocess.run(
            [sys.executable, "-m", "cli", *argv], cwd=REPO, capture_output=True, timeout=60
        ).returncode
        == code
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    proc.stdout.close()
    assert proc.wait(timeout=60) == code


@pytest.mark.parametrize("command", ["info", "verify", "replay", "dump", "tail", "export"])
def test_a_stdout_that_cannot_be_written_is_one_error_line(tmp_path: Path, command: str) -> None:
    d = busy_store(tmp_path)
    extra = ["--format", "jsonl", "-"] if command == "export" else []
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "cli", command, str(d), *extra],
            cwd=REPO,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert (proc.returncode, proc.stderr) == (
        1,
        "Error: cannot write to stdout: No space left on device\n",
    )


@pytest.mark.parametrize("command", ["info", "dump", "compact"])
def test_a_closed_stdout_is_refused_before_anything_is_done(tmp_path: Path, command: str) -> None:
    d = busy_store(tmp_path)
    before = sorted(p.name for p in d.iterdir())
    proc = subprocess.run(
        [sys.executable, "-m", "cli", command, str(d)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        # Close fd 1 in the child: Python then has no sys.stdout.
        preexec_fn=lambda: os.close(1),
    )
    assert (proc.returncode, proc.stderr) == (
        1,
        "Error: stdout is closed, so nothing could be printed; nothing was done\n",
    )
    assert sorted(p.name for p in d.iterdir()) == before


@pytest.mark.parametrize("command", ["info", "verify", "tail"])
def test_a_socket_reader_that_goes_away_is_not_a_failure(tmp_path: Path, command: str) -> None:
    """stdout a socket (a systemd socket unit, socat) whose peer has closed."""
    d = busy_store(tmp_path)
    ours, theirs = socket.socketpair()
    ours.close()  # the reader is gone before the first line
    with theirs:
        proc = subprocess.run(
            [sys.executable, "-m", "cli", command, str(d)],
            cwd=REPO,
            stdout=theirs.fileno(),
            stderr=subprocess.PIPE,
            timeout=60,
        )
    assert (proc.returncode, proc.stderr) == (0, b"")


class _InterruptedImport:
    """A meta path finder that is Ctrl-C arriving while ``cli.main`` imports."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name == "cli.main":
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_the_app_imports_exits_130_quietly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The console script's first tenth of a second is spent importing: a
    Ctrl-C then is no traceback, but the 130 typer gives one a moment later."""
    import cli

    monkeypatch.delitem(sys.modules, "cli.main")
    monkeypatch.setattr(sys, "meta_path", [_InterruptedImport(), *sys.meta_path])
    with pytest.raises(SystemExit) as done:
        cli.run()
    assert done.value.code == 130
    assert capsys.readouterr().err == ""


def test_ctrl_c_while_typer_builds_the_commands_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    """Typer reads every command's signature before its own Ctrl-C handler
    runs; an interrupt there is the same quiet 130."""
    import cli
    import cli.main

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.main, "app", interrupted)
    with pytest.raises(SystemExit) as done:
        cli.run()
    assert done.value.code == 130


@pytest.mark.parametrize("command", ["info", "verify", "dump", "tail", "replay", "compact"])
def test_a_directory_named_like_a_segment_is_named(tmp_path: Path, command: str) -> None:
    d = busy_store(tmp_path)
    odd = d / "00000000000000000500.seg"
    odd.mkdir()
    result = invoke(command, d)
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        f"Error: {odd}: named like a segment, but not a regular file; move it out of the "
        "store directory\n"
    )


def test_import_sqlite_refused_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    """A store without a current snapshot: the refusal writes none (nor cuts anything)."""
    db = legacy_db(tmp_path / "bot.db")
    d = tmp_path / "store"
    assert invoke("import-sqlite", db, d).exit_code == 0
    for snap in d.glob("snapshot-*"):
        snap.unlink()

    def contents() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(d.iterdir())}

    before = contents()
    again = invoke("import-sqlite", db, d)
    assert again.exit_code == 1
    assert "is not empty (its last event is at position 5)" in again.stderr
    assert contents() == before
    # Held by another process (the bot, or an import still running, whose
    # events so far this must not take for the store's): it says so.
    lock = WriterLock(str(d))
    lock.acquire()
    try:
        held = invoke("import-sqlite", db, d)
    finally:
        lock.release()
    assert held.exit_code == 1
    assert held.stderr.startswith(f"Error: {d} is open for writing by process {os.getpid()}; ")


def test_an_export_that_fills_the_disk_names_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = busy_store(tmp_path)
    target = tmp_path / "out.jsonl"

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    result = invoke("export", d, "--format", "jsonl", target)
    monkeypatch.undo()
    assert (result.exit_code, result.stderr) == (
        1,
        f"Error: {target}: No space left on device\n",
    )
    assert not target.exists()


@pytest.mark.parametrize("fmt", ["jsonl", "sqlite"])
def test_an_exports_bar_knows_its_total_and_ends_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """On a terminal: sqlite's bar showed a count with no total."""
    from cli import output, transfer

    d = busy_store(tmp_path)
    calls: list[tuple[str, int | None, list[int]]] = []

    @contextlib.contextmanager
    def bar(description: str, total: int | None = None) -> Iterator[Any]:
        seen: list[int] = []
        calls.append((description, total, seen))
        yield lambda done, total=None: seen.append(done)

    monkeypatch.setattr(output, "progress_bar", bar)
    assert transfer.out is output
    result = invoke("export", d, "--format", fmt, tmp_path / f"out.{fmt}")
    assert result.exit_code == 0, result.output
    [(description, total, seen)] = calls
    assert description == "exporting" and total is not None and seen[-1] == total
