"""Benchmark: p50/p99 latency of every read method at 10M events.

Command (from the repository root; under a minute once the 10M-event store
exists -- bench_connect builds it, or this script does, in about 15 s; a
method slower than the targets makes it longer, see ``--budget``)::

    python -m bench.bench_reads              # 10,000,000 events, 5 runs
    python -m bench.bench_reads --quick      # 50,000 events, 2 runs: checks the script

The store is the one of bench_connect (``bench.common.build_store``): the
first N events of the busy-channel workload, appended 10,000 at a time, so
its frames hold up to ``FRAME_EVENTS`` (64) events.  This process connects
from its snapshot, as a restarted bot would, and then calls each read method
``--calls`` times per run (or, for a method slow enough, as many times as
fit in ``--budget`` seconds, and at least 100), one awaited call at a time,
timing each call with ``perf_counter`` around the ``await``.  Arguments are
drawn at random (seeded) for every call, so that a method that reads rows
from the log (actions, messages) reads different frames each time, as a bot
answering many users would:

* users: any of the store's users; action types: join, leave, pm;
* ``get_user_count_history``: a random 24-hour window inside the history;
* ``get_recent_messages`` with an offset: a random offset into the whole
  message history (limit 100).

Only "the newest 100" calls (``get_user_actions()``, ``get_recent_messages()``)
repeat the same rows, and so are answered from the log's cache of decoded
frames after the first call.  The very first call of each method after
connect is reported apart ("first call"): the first read that needs an old
segment waits for its index (a walk of its frame headers and checksums, in
the log's thread, which a writer starts for every old segment at connect).

Per run, p50 and p99 of the calls; the table gives their medians over the
runs, the range of p99 over the runs, and the worst call seen.  RssAnon is
read after connect and again after all the reads (the frame cache is
included in the second).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from time import perf_counter
from typing import Any

from bench.common import (
    Target,
    add_common_args,
    bench_dir,
    build_store,
    finish,
    fmt_seconds,
    loadavg,
    machine_info,
    md_table,
    percentile,
    proc_status_kib,
    summarize,
    timer,
)
from eventstore import EventStore

DAY = 86_400
#: Calls per method and run however slow they are (p99 of fewer is the maximum).
MIN_CALLS = 100

Call = Callable[[random.Random], Awaitable[Any]]


def read_cases(store: EventStore) -> dict[str, Call]:
    """name -> a function making one call with random arguments."""
    proj = store.projections
    users = sorted(proj.user_stats.users)
    actors = sorted(n for n in proj.actions.users.codes if proj.actions.has_user(n))
    types = sorted(proj.actions.types.codes)
    ts = proj.counts.index.ts
    first_ts, last_ts = ts[0], ts[-1]
    n_messages = len(proj.messages)

    def window(rng: random.Random) -> tuple[int, int]:
        start = rng.randint(first_ts, max(first_ts, last_ts - DAY))
        return start, start + DAY - 1

    return {
        "get_user_stats(user)": lambda r: store.get_user_stats(r.choice(users)),
        "get_all_user_stats(limit=100)": lambda r: store.get_all_user_stats(limit=100),
        "get_channel_stats()": lambda r: store.get_channel_stats(),
        "get_user_actions() newest 100": lambda r: store.get_user_actions(),
        "get_user_actions(username)": lambda r: store.get_user_actions(username=r.choice(actors)),
        "get_user_actions(action_type)": lambda r: store.get_user_actions(
            action_type=r.choice(types)
        ),
        "get_user_actions(username, action_type)": lambda r: store.get_user_actions(
            username=r.choice(actors), action_type=r.choice(types)
        ),
        "get_user_count_history(24 h)": lambda r: store.get_user_count_history(*window(r)),
        "get_recent_messages(limit=100)": lambda r: store.get_recent_messages(limit=100),
        "get_recent_messages(limit=100, offset)": lambda r: store.get_recent_messages(
            limit=100, offset=r.randrange(max(1, n_messages - 100))
        ),
    }


async def _measure(directory: Path, runs: int, calls: int, budget: float) -> dict[str, Any]:
    store = EventStore(directory, snapshot_every=None)
    elapsed = timer()
    await store.connect()
    connect_seconds = elapsed()
    rss_connected = proc_status_kib("RssAnon") * 1024
    cases = read_cases(store)
    rng = random.Random(0)
    first: dict[str, float] = {}
    rows: dict[str, int] = {}
    for name, call in cases.items():
        began = perf_counter()
        result = await call(rng)
        first[name] = perf_counter() - began
        rows[name] = len(result) if isinstance(result, list) else 1
    latencies: dict[str, list[list[float]]] = {name: [] for name in cases}
    counts: dict[str, list[int]] = {name: [] for name in cases}
    names = list(cases)
    for run in range(runs):
        for name in names[run % len(names) :] + names[: run % len(names)]:
            call = cases[name]
            times: list[float] = []
            gc.collect()
            deadline = perf_counter() + budget
            while len(times) < calls and (len(times) < MIN_CALLS or perf_counter() < deadline):
                began = perf_counter()
                await call(rng)
                times.append(perf_counter() - began)
            latencies[name].append(times)
            counts[name].append(len(times))
        print(f"  run {run + 1}/{runs} done", flush=True)
    rss_after = proc_status_kib("RssAnon") * 1024
    # Connected from a snapshot at the last event and nothing written: close()
    # has no snapshot to write.
    await store.close()
    return {
        "connect_seconds": connect_seconds,
        "rss_anon_connected": rss_connected,
        "rss_anon_after_reads": rss_after,
        "first_call": first,
        "rows": rows,
        "calls_made": counts,
        "per_run": {
            name: [
                {"p50": percentile(t, 50), "p99": percentile(t, 99), "max": max(t)} for t in runs_
            ]
            for name, runs_ in latencies.items()
        },
    }


def measure(directory: Path, n: int, runs: int, calls: int, budget: float) -> dict[str, Any]:
    where = directory / f"store-{n}-b10000"
    print(f"  store of {n:,} events: {where}", flush=True)
    stamp = build_store(where, n)
    load = loadavg()[0]
    data = asyncio.run(_measure(where, runs, calls, budget))
    data.update(
        events=n, stamp=stamp, calls=calls, budget=budget, runs=runs, loadavg_1min_before=load
    )
    return data


#: (method, p99 ceiling in seconds) of the issue.
LIMITS = [
    ("get_user_stats(user)", 50e-6),
    ("get_channel_stats()", 50e-6),
    ("get_recent_messages(limit=100)", 1e-3),
    ("get_recent_messages(limit=100, offset)", 1e-3),
    ("get_user_actions(username)", 1e-3),
    ("get_user_count_history(24 h)", 1e-3),
]


def targets(data: dict[str, Any]) -> list[Target]:
    n = data["events"]
    label = f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n:,}"
    out = []
    for name, limit in LIMITS:
        p99 = summarize([r["p99"] for r in data["per_run"][name]]).median
        out.append(
            Target.check(
                f"At {label} events: {name} p99 < {fmt_seconds(limit)}",
                limit,
                p99,
                higher=False,
                shown=fmt_seconds(p99),
            )
        )
    return out


def report(data: dict[str, Any]) -> str:
    rows = []
    slow = []
    for name, made in data["calls_made"].items():
        if min(made) < data["calls"]:
            slow.append(f"{name}: {min(made)}-{max(made)}")
    for name, per_run in data["per_run"].items():
        p50 = summarize([r["p50"] for r in per_run])
        p99 = summarize([r["p99"] for r in per_run])
        rows.append(
            [
                name,
                data["rows"][name],
                fmt_seconds(p50.median),
                p99.spread(fmt_seconds),
                fmt_seconds(max(r["max"] for r in per_run)),
                fmt_seconds(data["first_call"][name]),
            ]
        )
    table = md_table(
        ["call", "rows", "p50", "p99 (range over runs)", "worst call", "first call"], rows
    )
    return (
        f"{table}\n\n{data['events']:,} events, {data['runs']} runs of {data['calls']:,} "
        f"calls per method"
        + (f" (fewer, in {data['budget']:.0f} s a run, for {'; '.join(slow)})" if slow else "")
        + "; connect() from the snapshot took "
        f"{fmt_seconds(data['connect_seconds'])}.  RssAnon after connect "
        f"{data['rss_anon_connected'] / 1e6:.0f} MB, after all the reads "
        f"{data['rss_anon_after_reads'] / 1e6:.0f} MB.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--events", type=int, help="events in the store (default 10,000,000)")
    parser.add_argument("--calls", type=int, default=1000, help="calls per method and run")
    parser.add_argument(
        "--budget",
        type=float,
        default=10.0,
        help=f"seconds per method and run after which a slow method stops (at {MIN_CALLS} calls "
        "or more)",
    )
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 5)
    n = args.events or (50_000 if args.quick else 10_000_000)
    calls = 200 if args.quick and args.calls == 1000 else args.calls
    directory = bench_dir(args.dir)
    info = machine_info(directory)
    print(f"bench_reads: {n:,} events, {runs} runs in {directory}, load {info['loadavg']}")
    data = measure(directory, n, runs, calls, args.budget)
    finish(data, info, targets, report, args.json)


if __name__ == "__main__":
    main()
