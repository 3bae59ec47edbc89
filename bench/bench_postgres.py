"""Benchmark: the PostgreSQL log beside the segment log, same workload, one run.

Command (from the repository root; about 75 s on 2 cores; needs asyncpg and the
PostgreSQL server binaries, or ``EVENTSTORE_PG_DSN`` naming a server where the
role may CREATE DATABASE)::

    python bench/bench_postgres.py              # 5 runs of each measurement
    python bench/bench_postgres.py --runs 3 --seconds 2 --events 100000

What it measures:

* Write throughput.  P writer processes, each with T tasks; every task saves
  chat messages through ``EventStore.save_message``, one awaited write at a
  time, for ``--seconds`` after a common start signal.  Reported: events/s
  summed over the processes, and the p50/p99 latency of one write (pooled
  over the runs).  Every run starts on an empty store (a new database, a new
  directory).  The segment log runs with durability "fsync"; it admits one
  writer process per directory (its writer lock), so in place of 4
  processes it runs one process with 4 times the tasks.  PostgreSQL runs with its
  defaults: fsync on, synchronous_commit on; each commit waits for its WAL
  flush.
* Catch-up.  A new read-only instance connects to a store of ``--events``
  events of the busy-channel workload (bench/workload.py) and replays them
  all: events/s = N / (time to connect and replay).  The segment store's
  snapshots are deleted first, so both replay from event 1.

Each measurement runs ``--runs`` times; the table gives the median and the
range (min-max).  Medians, because a run's time is skewed by whatever else
the machine does, and one slow run should not move the figure.

The throwaway server is started like the tests' (tests/pgserver.py), in a
temporary directory on the same disk as the segment store, and listens on a
Unix socket only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from eventstore import EventStore  # noqa: E402

TEXT = "a chat line of about the usual length, with a few words and an emoji 🎉"


# -- the writer child ---------------------------------------------------------------------
async def child(target: str, tasks: int, seconds: float) -> None:
    """Connect, say ready, wait for "go", write for ``seconds``, print the result."""
    store = EventStore(target, durability="fsync", snapshot_every=None)
    await store.connect()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def run(task: int) -> None:
        n = 0
        while True:
            start = time.perf_counter()
            if start >= deadline:
                return
            await store.save_message(f"user{task}", TEXT, timestamp=n)
            latencies.append(time.perf_counter() - start)
            n += 1

    await asyncio.gather(*(run(t) for t in range(tasks)))
    print(json.dumps({"count": len(latencies), "latencies": latencies}), flush=True)
    await store.close()


# -- measurements -------------------------------------------------------------------------
def throughput(targets: Sequence[str], tasks: int, seconds: float) -> tuple[float, list[float]]:
    """Run one writer process per target at once; return (events/s, latencies)."""
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", target, str(tasks), str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for target in targets
    ]
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"writer did not start: {line!r}"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    count, latencies = 0, []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 120)
        result = json.loads(out.strip().splitlines()[-1])
        count += result["count"]
        latencies += result["latencies"]
        assert proc.returncode == 0
    return count / seconds, latencies


async def fill(target: str, n: int) -> None:
    from bench.workload import events

    store = EventStore(target, durability="none", snapshot_every=None)
    async with store:
        batch = []
        for event in events(n, seed=0):
            batch.append(event)
            if len(batch) == 10_000:
                await store.append(batch)
                batch = []
        if batch:
            await store.append(batch)
        assert store.position == n


async def catch_up(target: str, n: int) -> float:
    """Seconds for a new read-only instance to connect and replay the whole log."""
    if not target.startswith("postgres"):
        for snap in Path(target).glob("snapshot-*.snap"):
            snap.unlink()
    store = EventStore(target, read_only=True)
    start = time.perf_counter()
    await store.connect()
    elapsed = time.perf_counter() - start
    assert store.position == n
    await store.close()
    return elapsed


# -- reporting ----------------------------------------------------------------------------
def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    low, mid, high = (fmt.format(v) for v in (min(values), statistics.median(values), max(values)))
    return f"{mid} ({low}-{high})"


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def machine(server_version: str, load_before: str) -> list[str]:
    import asyncpg
    import msgspec

    def sh(cmd: str) -> str:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.rstrip()

    return [
        f"- nproc: {sh('nproc')}; CPU: {cpu_model()}",
        "- free -g:\n\n" + "\n".join("      " + line for line in sh("free -g").splitlines()),
        f"- Python {platform.python_version()}, asyncpg {asyncpg.__version__}, "
        f"msgspec {msgspec.__version__}",
        f"- {server_version}",
        f"- disk of the temporary directory: {sh('df -h ' + tempfile.gettempdir() + ' | tail -1')}",
        f"- load average (1, 5, 15 min) before: {load_before}; after: {load()} "
        "(other work on the machine skews the runs: compare the ranges)",
    ]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--tasks", type=int, default=8, help="write tasks per process")
    parser.add_argument("--events", type=int, default=200_000, help="events to catch up on")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        target, tasks, seconds = args.child
        asyncio.run(child(target, int(tasks), float(seconds)))
        return

    from pgserver import Admin, TempServer, make_database, start_server

    # PostgreSQL's own defaults: durable commits, as the segment log's "fsync".
    load_before = load()
    server = start_server({"max_connections": "100"})
    admin = Admin()
    work = Path(tempfile.mkdtemp(prefix="eventstore-bench-"))
    try:
        if isinstance(server, TempServer):
            version = server.version()
        else:
            version = "PostgreSQL at $EVENTSTORE_PG_DSN"
        rows: list[tuple[str, str, str, str]] = []
        runs, seconds, tasks = args.runs, args.seconds, args.tasks

        def measure(label: str, make_targets: Any, procs: int, per_proc: int) -> None:
            rates: list[float] = []
            lat: list[float] = []
            for _ in range(runs):
                rate, latencies = throughput(make_targets(procs), per_proc, seconds)
                rates.append(rate)
                lat += latencies
            p50, p99 = quantile(lat, 0.5) * 1e3, quantile(lat, 0.99) * 1e3
            rows.append((label, spread(rates), f"{p50:.2f}", f"{p99:.2f}"))
            print(f"  {label}: {spread(rates)} events/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms")

        def new_dir(_procs: int) -> list[str]:
            return [tempfile.mkdtemp(dir=work, prefix="seg-")]

        def new_db(procs: int) -> list[str]:
            dsn = make_database(server, admin, "bench")
            return [dsn] * procs

        print(f"write throughput ({runs} runs of {seconds:g} s each):")
        measure(f"segment log, fsync: 1 process x {tasks} tasks", new_dir, 1, tasks)
        measure(f"segment log, fsync: 1 process x {4 * tasks} tasks", new_dir, 1, 4 * tasks)
        measure(f"PostgreSQL: 1 process x {tasks} tasks", new_db, 1, tasks)
        measure(f"PostgreSQL: 4 processes x {tasks} tasks", new_db, 4, tasks)

        n = args.events
        print(f"catch-up: connect and replay {n:,} events ({runs} runs):")
        catch_rows: list[tuple[str, str, str]] = []
        for label, target in (
            ("segment log", str(work / "catchup")),
            ("PostgreSQL", make_database(server, admin, "bench_catchup")),
        ):
            asyncio.run(fill(target, n))
            times = [asyncio.run(catch_up(target, n)) for _ in range(runs)]
            rates = [n / t for t in times]
            catch_rows.append((label, spread(rates), spread(times, "{:.2f}")))
            print(f"  {label}: {spread(rates)} events/s, {spread(times, '{:.2f}')} s")

        print("\n## Results\n")
        print("Write throughput, chat messages through `save_message`, one awaited write per task")
        print(f"at a time; {runs} runs of {seconds:g} s; median (min-max):\n")
        print("| store | events/s | p50 write ms | p99 write ms |")
        print("| --- | ---: | ---: | ---: |")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print(f"\nCatch-up: a new read-only instance connects and replays {n:,} events of the")
        print(f"busy-channel workload; {runs} runs; median (min-max):\n")
        print("| store | events/s | seconds |")
        print("| --- | ---: | ---: |")
        for row3 in catch_rows:
            print("| " + " | ".join(row3) + " |")
        print("\nMachine:\n")
        print("\n".join(machine(version, load_before)))
    finally:
        admin.close()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
