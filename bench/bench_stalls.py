"""Benchmark: how long the event loop stalls while the store does its upkeep.

Command (from the repository root; about six minutes with ``--against``,
plus about 50 s the first time to build the 10M-event store under the bench
directory, kept for the other benchmarks)::

    python -m bench.bench_stalls                          # the 10M store, 3 runs
    python -m bench.bench_stalls --store DIR              # a copy of another store
    python -m bench.bench_stalls --against ../old-checkout  # the same, beside other code
    python -m bench.bench_stalls --quick                  # 50,000 events, 1 run: checks the script
    python -m bench.bench_stalls --postgres 1000000       # PostgreSQL, 3 runs (see below)

A bot runs compaction, ``forget_user`` and snapshots in its own process,
beside its chat: the event loop that answers the chat is the one the store
works on.  Every await of the store's lets the chat's tasks run; the time
between two such moments, a *stall*, is how long the bot cannot answer.

Each run, in a fresh interpreter, copies the store (by default the first
10M events of the busy channel, ``bench.common.build_store``, never
compacted; ``--store`` names another, for instance the ``soak-store`` that
bench_soak leaves, a year old and compacted every week), connects to the
copy, then times four steps, one after the other, while a heartbeat task
loops on ``asyncio.sleep(HEARTBEAT)`` (5 ms) and records the time between
its wakeups:

* ``connect()`` (from the store's snapshot);
* ``compact(keep_history_days=90)`` (in the store's own clock, that of its
  last event);
* ``forget_user`` of the user with the most actions (a compaction of its own);
* ``write_snapshot()``.

Reported per step: its wall and CPU time (of the process: the heartbeat's
wakeups count too, and there are more of them the less the loop stalls),
the longest gap between two heartbeats (the longest stall, the heartbeat's
own 5 ms included), the 99th percentile of the gaps, and how many gaps
passed 100 ms; medians over the runs, with their range.  With ``--against
TREE`` every run is made twice, alternating, once with the code of this
checkout and once with the ``eventstore`` package of TREE (another checkout, say of the
commit before a change): both columns come from the same run.

With ``--postgres N`` the store is a PostgreSQL database instead: a
throwaway server is started as the tests start theirs (tests/pgserver.py,
or the one ``EVENTSTORE_PG_DSN`` names), and every run gets a new database
holding the first N events of the busy channel (written by this checkout,
``bench.bench_postgres.fill``).  The steps are the same but for
``write_snapshot`` (a PostgreSQL store keeps none), and ``connect()``
replays the whole log.  Beside it, another process, standing for another
bot on the same database, awaits a chat line every 5 ms (its clock going
on from the store's last moment, where the measured bot's stands): for
each step the table also gives the longest of its appends, and how many
took over 100 ms.  What one bot's upkeep costs the others shows there, as
their appends wait for the append lock that a compaction holds while it
commits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    Target,
    add_common_args,
    bench_dir,
    build_store,
    finish,
    fmt_seconds,
    machine_info,
    md_table,
    run_child,
    summarize,
)

STEPS = ["connect", "compact", "forget_user", "write_snapshot"]
#: A gap between heartbeats above this counts as a stall a person would notice.
NOTICEABLE = 0.1
#: The heartbeat's sleep: short against the stalls that matter, long enough
#: that its own wakeups cost little of the step's CPU.
HEARTBEAT = 0.005
#: How often the other bot of a --postgres run appends (awaiting each).
OTHER_EVERY = 0.005


def child(store: str, copy: str, tree: str) -> None:
    """One run, in this interpreter: print the result as one line of JSON.

    With ``tree``, the ``eventstore`` package of that checkout is the one
    imported (nothing imported it before: bench.common does so only inside
    its functions).
    """
    import asyncio
    import time

    if tree:
        sys.path.insert(0, tree)
    from eventstore import EventStore

    postgres = store.startswith("postgresql://")
    other = None
    if postgres:
        copy = store  # a database of its own, filled for this run
        other = _OtherBot(store, tree)
    else:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(store, copy)

    async def step(work: Any) -> dict[str, Any]:
        gaps: list[float] = []
        done = False

        async def heartbeat() -> None:
            last = time.perf_counter()
            while not done:
                await asyncio.sleep(HEARTBEAT)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        if other is not None:
            other.ask("mark")  # a blocking round trip: before the heartbeat counts gaps
        beating = asyncio.ensure_future(heartbeat())
        await asyncio.sleep(0.01)
        began, cpu = time.perf_counter(), time.process_time()
        await work
        seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
        done = True
        await beating
        gaps.sort()
        out: dict[str, Any] = {
            "seconds": seconds,
            "cpu": cpu,
            "longest": gaps[-1],
            "p99": gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))],
            "noticeable": sum(g > NOTICEABLE for g in gaps),
        }
        if other is not None:
            out["other"] = json.loads(other.ask("report"))
        return out

    # The store's clock reads the time of its newest event once connected:
    # keep_history_days counts back from the simulated present, not today.
    now = [int(time.time())]

    async def run() -> dict[str, Any]:
        store_ = EventStore(copy, clock=lambda: now[0])
        out: dict[str, Any] = {"connect": await step(store_.connect())}
        proj = store_.projections
        now[0] = max(
            index.ts[-1]
            for index in (proj.actions.all, proj.counts.index, proj.messages.index)
            if len(index)
        )
        actions = proj.actions
        users = sorted(store_.projections.user_stats.users)
        most = max(users, key=lambda u: len(actions.positions(u, None, 10**9, 0)))
        out["forgotten_actions"] = len(actions.positions(most, None, 10**9, 0))
        out["held_actions"] = len(actions.all)
        out["compact"] = await step(store_.compact(keep_history_days=90))
        out["forget_user"] = await step(store_.forget_user(most))
        if not postgres:
            out["write_snapshot"] = await step(store_.write_snapshot())
        await store_.close()
        return out

    try:
        result = asyncio.run(run())
    finally:
        if other is not None:
            other.close()
    if not postgres:
        shutil.rmtree(copy, ignore_errors=True)
    print(json.dumps(result))


class _OtherBot:
    """Another bot's process on the same PostgreSQL store (``--other``), for a child."""

    def __init__(self, dsn: str, tree: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_stalls", "--other", dsn, tree],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            if self._line() != "ready":
                raise RuntimeError("the other bot did not start")
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the other bot ended (exit code {self.proc.wait()})")
        return line.strip()

    def ask(self, command: str) -> str:
        """Send a command; the bot answers each with one line."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.ask("quit")
        self.proc.wait(30)


def other_bot(dsn: str, tree: str) -> None:
    """Another bot on the store ``dsn``: a chat line every OTHER_EVERY seconds, each awaited.

    Answers commands on stdin, a line each: ``mark`` forgets the appends
    timed so far, ``report`` gives those since as one line of JSON,
    ``quit`` ends it.
    """
    import asyncio
    import time

    if tree:
        sys.path.insert(0, tree)
    from eventstore import EventStore

    async def run() -> None:
        now = [int(time.time())]
        began = time.monotonic()
        # The simulated present, as the measured bot's clock reads it, going on.
        store = EventStore(dsn, clock=lambda: now[0] + int(time.monotonic() - began))
        await store.connect()
        proj = store.projections
        now[0] = max(
            (ix.ts[-1] for ix in (proj.actions.all, proj.messages.index) if len(ix)),
            default=now[0],
        )
        took: list[float] = []

        async def chat() -> None:
            while True:
                sent = time.perf_counter()
                await store.save_message("another_bot", "still here")
                took.append(time.perf_counter() - sent)
                await asyncio.sleep(OTHER_EVERY)

        chatting = asyncio.ensure_future(chat())
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while (command := (await loop.run_in_executor(None, sys.stdin.readline)).strip()) not in (
            "quit",
            "",
        ):
            if command == "mark":
                took.clear()
                print("ok", flush=True)
            else:
                if chatting.done():
                    chatting.result()  # it failed: raise its error, and end
                ordered = sorted(took)
                print(
                    json.dumps(
                        {
                            "appends": len(ordered),
                            "longest": ordered[-1] if ordered else 0.0,
                            "noticeable": sum(t > NOTICEABLE for t in ordered),
                        }
                    ),
                    flush=True,
                )
        chatting.cancel()
        await store.close()
        print("bye", flush=True)

    asyncio.run(run())


def measure(
    store: Callable[[], str], scratch: Path, trees: dict[str, Path | None], runs: int
) -> dict[str, list[dict[str, Any]]]:
    """Every run of every tree; ``store()`` names the store of the next one."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for i in range(runs):
        order = list(trees.items())
        if i % 2:
            order.reverse()  # neither code always runs first
        for name, tree in order:
            result = run_child(
                ["bench.bench_stalls", "--child", store(), str(scratch), str(tree or "")]
            )
            results[name].append(result)
            print(
                f"bench_stalls: run {i + 1} {name}: "
                + ", ".join(f"{s} {result[s]['longest'] * 1000:.0f} ms" for s in _steps(result)),
                flush=True,
            )
    return results


def _steps(result: dict[str, Any]) -> list[str]:
    return [s for s in STEPS if s in result]


def targets(data: dict[str, Any]) -> list[Target]:
    return []  # the issue names no target for stalls: the figures stand on their own


def report(data: dict[str, Any]) -> str:
    rows = []
    first = next(iter(data["results"].values()))[0]
    others = "other" in first["connect"]
    for name, results in data["results"].items():
        for s in _steps(results[0]):
            secs = summarize([r[s]["seconds"] for r in results])
            cpu = summarize([r[s]["cpu"] for r in results])
            longest = summarize([r[s]["longest"] * 1000 for r in results])
            p99 = summarize([r[s]["p99"] * 1000 for r in results])
            noticed = summarize([r[s]["noticeable"] for r in results])
            row = [
                name,
                s,
                secs.spread(fmt_seconds),
                cpu.spread(fmt_seconds),
                longest.spread(lambda x: f"{x:.0f} ms"),
                p99.spread(lambda x: f"{x:.1f} ms"),
                noticed.spread(lambda x: f"{x:.0f}"),
            ]
            if others:
                waited = summarize([r[s]["other"]["longest"] * 1000 for r in results])
                slow = summarize([r[s]["other"]["noticeable"] for r in results])
                row += [waited.spread(lambda x: f"{x:.0f} ms"), slow.spread(lambda x: f"{x:.0f}")]
            rows.append(row)
    head = ["code", "step", "wall time", "CPU time", "longest stall", "p99 gap", "gaps > 100 ms"]
    if others:
        head += ["other bot: longest append", "appends > 100 ms"]
    table = md_table(head, rows)
    return (
        f"{table}\n\nStore: {data['store']} ({first['held_actions']:,} actions held; "
        f"the user forgotten had {first['forgotten_actions']:,}); {data['runs']} runs.\n"
    )


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--other":
        other_bot(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--store", type=Path, help="measure on copies of this store")
    parser.add_argument(
        "--postgres",
        type=int,
        metavar="N",
        help="measure PostgreSQL instead: a new database of N events for every run",
    )
    parser.add_argument(
        "--against",
        type=Path,
        help="another checkout whose eventstore package to run beside this one",
    )
    args = parser.parse_args()
    directory = bench_dir(args.dir)
    if args.against is not None and not (args.against / "eventstore").is_dir():
        parser.error(f"--against {args.against}: no eventstore package in it")
    if args.postgres is not None and args.store is not None:
        parser.error("--postgres and --store: one store at a time")
    if args.postgres is not None and args.postgres < 1:
        parser.error(f"--postgres {args.postgres}: give a number of events, at least 1")
    trees: dict[str, Path | None] = {"this checkout": None}
    if args.against is not None:
        trees[str(args.against)] = args.against.resolve()
    runs = args.runs or (1 if args.quick else 3)
    info = machine_info(directory)
    if args.postgres is not None:
        results, where = measure_postgres(args.postgres, trees, runs, info)
    else:
        if args.store is not None:
            store = args.store.resolve()
            if not store.is_dir():
                parser.error(f"--store {store}: not a directory")
        else:
            n = 50_000 if args.quick else 10_000_000
            store = directory / f"store-{n}"
            build_store(store, n)
        where = str(store)
        print(f"bench_stalls: {store}, {runs} runs, load {info['loadavg']}", flush=True)
        results = measure(lambda: where, directory / "stalls-copy", trees, runs)
    data = {"store": where, "runs": runs, "results": results}
    finish(data, info, targets, report, args.json)


def measure_postgres(
    n: int, trees: dict[str, Path | None], runs: int, info: dict[str, Any]
) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """The runs on PostgreSQL: a throwaway server, a new database of ``n`` events per run."""
    import asyncio
    import importlib

    from bench.bench_postgres import fill  # which puts tests/ on sys.path: pgserver

    pgserver = importlib.import_module("pgserver")
    server = pgserver.start_server({"max_connections": "100"})
    admin = pgserver.Admin()
    try:
        print(f"bench_stalls: PostgreSQL, {n:,} events, {runs} runs, load {info['loadavg']}")

        def new_database() -> str:
            dsn: str = pgserver.make_database(server, admin, "stalls")
            asyncio.run(fill(dsn, n))
            return dsn

        results = measure(new_database, Path(), trees, runs)
    finally:
        server.stop()
    return results, f"PostgreSQL, a new database of the first {n:,} events for every run"


if __name__ == "__main__":
    main()
