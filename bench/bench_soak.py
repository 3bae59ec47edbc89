"""Benchmark: a year in the life of one store -- memory, disk and upkeep over time.

Command (from the repository root; about 25 minutes on the project machine)::

    python -m bench.bench_soak                # 364 simulated days of the busy channel
    python -m bench.bench_soak --days 56      # eight weeks
    python -m bench.bench_soak --quick        # 14 days at 1/20 of the rate: checks the script

The other benchmarks measure a store built in one go.  A bot's store lives
for years instead: the history grows every day, the chat cache is cleared
every night, compactions and erasures rewrite the log, the process restarts.
This plays that life through the adapter, one simulated day after another,
in one process (so that memory the allocator keeps between days shows):

* every day, the day's calls of the busy channel (``bench.workload``, about
  46,000 events; ``--scale`` thins them), through ``EventStore`` with
  durability "none" (the durability mode changes how fast the days go,
  not what is kept) and a clock that follows the simulation; then the
  bot's nightly ``clear_old_messages(1000)``;
* every 7th day, ``compact(keep_history_days=90)``: user counts older than
  90 days are trimmed, and everything no read can see any more is dropped;
* every 21st day, ``forget_user`` of the user with the most chat lines
  (a compaction of its own), checked: no read shows the user afterwards;
* every 28th day and on the last, a restart: the reads are taken, the
  store closed and connected again (from its snapshot), and the reads
  compared; then a second, read-only store replays the whole log with the
  snapshots moved aside, and its reads are compared too.  Any difference
  stops the run with an error.

"The reads" are every user's statistics, the channel statistics, the 1,000
newest messages, the 100 newest actions of all users and of three of them,
and the last 24 hours of user counts.

Recorded on every 7th day: events written so far and held in the log, the
log's and the newest snapshot's bytes, RssAnon (anonymous resident memory:
/proc/self/status), the read models' history rows, and the seconds (wall
and CPU) of that week's writes, of the compaction, and of the connect() of
a restart.  There is no alternative beside it: what is measured is how this
store's costs grow with its age.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    add_common_args,
    bench_dir,
    fmt_bytes,
    loadavg,
    machine_info,
    md_table,
    proc_status_kib,
    write_json,
)
from bench.workload import DAY, START, Op, SimClock, apply, op_time, operations
from eventstore import EventStore

KEEP_MESSAGES = 1_000  # the bot's nightly clear_old_messages(keep_count)
KEEP_HISTORY_DAYS = 90  # user counts kept by the weekly compaction
COMPACT_EVERY = 7
FORGET_EVERY = 21
RESTART_EVERY = 28
#: Users whose actions are among the reads compared at a restart.
WATCHED = 3


def _days(scale: float, seed: int) -> Iterator[list[Op]]:
    """The busy channel's calls, a simulated day at a time (thinned by ``scale``)."""
    rng = random.Random(seed)
    ops = operations(10**12, seed=seed)  # as many as asked for: days end first
    day_end = START + DAY
    today: list[Op] = []
    for op in ops:
        while op_time(op) >= day_end:
            yield today
            today = []
            day_end += DAY
        # Thinning drops whole calls at random: user counts every 5 minutes
        # too, which keeps each kind's share of the day.
        if scale >= 1 or rng.random() < scale:
            today.append(op)


async def reads(store: EventStore, now: int) -> dict[str, Any]:
    """What the comparisons at a restart look at (see the module docstring)."""
    stats = await store.get_all_user_stats()
    top = sorted(stats, key=lambda r: (-r["total_chat_lines"], r["username"]))[:WATCHED]
    return {
        "user_stats": stats,
        "channel": await store.get_channel_stats(),
        "messages": await store.get_recent_messages(KEEP_MESSAGES),
        "actions": await store.get_user_actions(limit=100),
        "actions_of": {
            r["username"]: await store.get_user_actions(r["username"], limit=100) for r in top
        },
        "counts": await store.get_user_count_history(now - DAY, now),
    }


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    for key in a:
        if a[key] != b[key]:
            return key
    return None


def _files(directory: Path, pattern: str) -> list[Path]:
    return sorted(directory.glob(pattern))


def _rows(store: EventStore) -> dict[str, int]:
    """History rows the read models hold (a benchmark may look inside)."""
    proj = store._proj
    return {
        "users": len(proj.user_stats.users),
        "actions": len(proj.actions.all),
        "user_counts": len(proj.counts.index),
        "messages": len(proj.messages.index),
    }


class Soak:
    def __init__(self, directory: Path, clock: SimClock) -> None:
        self.directory = directory
        self.clock = clock
        self.store = self._open()
        self.events_written = 0
        self.restarts: list[dict[str, Any]] = []
        self.forgets: list[dict[str, Any]] = []

    def _open(self, **kwargs: Any) -> EventStore:
        return EventStore(
            self.directory, durability="none", clock=self.clock, snapshot_every=100_000, **kwargs
        )

    async def restart(self, day: int) -> dict[str, Any]:
        before = await reads(self.store, self.clock.now)
        await self.store.close()
        gc.collect()
        self.store = self._open()
        began, cpu = time.perf_counter(), time.process_time()
        await self.store.connect()
        took, took_cpu = time.perf_counter() - began, time.process_time() - cpu
        after = await reads(self.store, self.clock.now)
        if (key := _first_difference(before, after)) is not None:
            raise RuntimeError(f"day {day}: after a restart, {key} differs")
        # A full replay, by a reader beside the writer (no snapshot to start from).
        aside = self.directory.with_name(self.directory.name + ".snapshots-aside")
        aside.mkdir(exist_ok=True)
        moved = [(p, aside / p.name) for p in _files(self.directory, "*.snap")]
        for p, q in moved:
            p.rename(q)
        try:
            fresh = self._open(read_only=True)
            began_full = time.perf_counter()
            await fresh.connect()
            full = time.perf_counter() - began_full
            replayed = await reads(fresh, self.clock.now)
            await fresh.close()
        finally:
            for p, q in moved:
                q.rename(p)
        if (key := _first_difference(before, replayed)) is not None:
            raise RuntimeError(f"day {day}: a full replay's {key} differs from the store's")
        rec = {
            "day": day,
            "connect_s": took,
            "connect_cpu_s": took_cpu,
            "full_replay_s": full,
            "rss_anon_after_mib": proc_status_kib("RssAnon") / 1024,
        }
        self.restarts.append(rec)
        return rec

    async def forget(self, day: int) -> dict[str, Any]:
        stats = await self.store.get_all_user_stats()
        name = max(stats, key=lambda r: (r["total_chat_lines"], r["username"]))["username"]
        began, cpu = time.perf_counter(), time.process_time()
        await self.store.forget_user(name)
        took, took_cpu = time.perf_counter() - began, time.process_time() - cpu
        left = [
            await self.store.get_user_stats(name),
            await self.store.get_user_actions(name, limit=1),
            [
                m
                for m in await self.store.get_recent_messages(KEEP_MESSAGES)
                if m["username"] == name
            ],
        ]
        if any(left):
            raise RuntimeError(f"day {day}: forget_user({name!r}) left {left}")
        rec = {"day": day, "seconds": took, "cpu_s": took_cpu}
        self.forgets.append(rec)
        return rec


async def soak(directory: Path, days: int, scale: float, seed: int) -> dict[str, Any]:
    clock = SimClock(START)
    s = Soak(directory, clock)
    await s.store.connect()
    weeks: list[dict[str, Any]] = []
    week_wall = week_cpu = 0.0
    week_events = 0
    compact: dict[str, Any] = {}
    try:
        for day, ops in enumerate(_days(scale, seed), 1):
            if day > days:
                break
            began, cpu = time.perf_counter(), time.process_time()
            position = s.store.position
            await apply(s.store, ops, clock=clock)
            clock.now = START + day * DAY - 1
            await s.store.clear_old_messages(KEEP_MESSAGES)
            week_wall += time.perf_counter() - began
            week_cpu += time.process_time() - cpu
            week_events += s.store.position - position
            if day % FORGET_EVERY == 0:
                await s.forget(day)
            if day % COMPACT_EVERY == 0:
                began, cpu = time.perf_counter(), time.process_time()
                report = await s.store.compact(keep_history_days=KEEP_HISTORY_DAYS)
                compact = {
                    "compact_s": time.perf_counter() - began,
                    "compact_cpu_s": time.process_time() - cpu,
                    "events_held": report.events_after,
                }
            if day % RESTART_EVERY == 0 or day == days:
                await s.restart(day)
            if day % COMPACT_EVERY == 0 or day == days:
                logs = _files(directory, "*.seg")
                snaps = _files(directory, "*.snap")
                row = {
                    "day": day,
                    "events": s.store.position,
                    "log_bytes": sum(p.stat().st_size for p in logs),
                    "snapshot_bytes": snaps[-1].stat().st_size if snaps else 0,
                    "rss_anon_mib": proc_status_kib("RssAnon") / 1024,
                    "rows": _rows(s.store),
                    "week_events": week_events,
                    "week_write_s": week_wall,
                    "week_write_cpu_s": week_cpu,
                    **compact,
                }
                weeks.append(row)
                print(
                    f"day {day:3}: {row['events']:>10,} events, "
                    f"held {row.get('events_held', 0):>10,}, "
                    f"log {fmt_bytes(row['log_bytes']):>9}, "
                    f"RssAnon {row['rss_anon_mib']:6.1f} MiB, "
                    f"writes {week_wall:5.1f} s, compact {row.get('compact_s', 0):5.1f} s",
                    flush=True,
                )
                week_wall = week_cpu = 0.0
                week_events = 0
                compact = {}
    finally:
        await s.store.close()
    return {
        "days": days,
        "scale": scale,
        "seed": seed,
        "weeks": weeks,
        "restarts": s.restarts,
        "forgets": s.forgets,
        "peak_rss_mib": proc_status_kib("VmHWM") / 1024,
    }


def report(data: dict[str, Any]) -> str:
    rows = []
    for w in data["weeks"]:
        r = w["rows"]
        rows.append(
            [
                str(w["day"]),
                f"{w['events']:,}",
                f"{w['events_held']:,}" if "events_held" in w else "-",
                fmt_bytes(w["log_bytes"]),
                fmt_bytes(w["snapshot_bytes"]),
                f"{r['actions']:,} / {r['user_counts']:,} / {r['messages']:,}",
                f"{w['rss_anon_mib']:.0f} MiB",
                f"{w['week_write_cpu_s']:.1f} s",
                f"{w['compact_cpu_s']:.1f} s" if "compact_cpu_s" in w else "-",
            ]
        )
    table = md_table(
        [
            "day",
            "events written",
            "held after compaction",
            "log",
            "snapshot",
            "rows: actions / user counts / messages",
            "RssAnon",
            "week's writes (CPU)",
            "compaction (CPU)",
        ],
        rows,
    )
    restarts = md_table(
        ["day", "connect() from the snapshot", "full replay (read-only)", "RssAnon after"],
        [
            [
                str(r["day"]),
                f"{r['connect_s'] * 1e3:.0f} ms",
                f"{r['full_replay_s']:.2f} s",
                f"{r['rss_anon_after_mib']:.0f} MiB",
            ]
            for r in data["restarts"]
        ],
    )
    forgets = ", ".join(f"day {f['day']}: {f['cpu_s']:.1f} s" for f in data["forgets"]) or "none"
    return (
        f"{data['days']} days at scale {data['scale']}; peak RSS {data['peak_rss_mib']:.0f} MiB\n\n"
        f"{table}\n\nRestarts (every read compared, all equal):\n\n{restarts}\n\n"
        f"forget_user (CPU): {forgets}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--days", type=int, help="simulated days (default 364)")
    parser.add_argument("--scale", type=float, help="share of the busy channel's calls (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    days = args.days or (14 if args.quick else 364)
    scale = args.scale or (0.05 if args.quick else 1.0)
    if days < 1 or not 0 < scale <= 1:
        parser.error("--days must be at least 1 and --scale in (0, 1]")
    where = bench_dir(args.dir) / "soak-store"
    shutil.rmtree(where, ignore_errors=True)
    info = machine_info(where.parent)
    began = time.perf_counter()
    data = asyncio.run(soak(where, days, scale, args.seed))
    data["wall_s"] = time.perf_counter() - began
    data["machine"] = info
    data["loadavg_after"] = loadavg()
    print(report(data))
    print(f"took {data['wall_s']:.0f} s")
    write_json(args.json, data)


if __name__ == "__main__":
    main()
