"""Benchmark: write throughput of each durability mode, beside SQLite and the disk.

Command (from the repository root; about three minutes, writes under the
bench directory, see ``--dir``)::

    python -m bench.bench_write             # 7 runs of every case
    python -m bench.bench_write --quick     # small counts, 2 runs: checks the script

What it measures, all in one process and one run, case after case:

* ``EventStore`` in each durability mode ("fsync", "flush", "none") and the
  aiosqlite baseline ``SqliteAdapter`` (WAL; synchronous FULL and NORMAL),
  both driven through the same ``StorageAdapter`` calls: the first N
  operations of the busy-channel workload (``bench.workload.operations``),
  with the clock following the simulation.  Either ONE producer that awaits
  every call, or 64 producers (asyncio tasks) that each take the next call
  of the same stream whenever their previous call has returned.
  Rate = calls / seconds, from the first call to the last one returning;
  for "flush" and "none" that includes a final ``log.flush()``, so every
  byte was handed to the kernel.  Every case starts on a new, empty store
  (connect and close are outside the timing).  The store keeps its default
  ``snapshot_every`` (100,000), as a bot would.
* The raw limit of the disk, measured in the same run: a loop of
  ``os.write`` + ``os.fdatasync`` of the frames the store writes for one
  event each (the first N events of ``bench.workload.events``, each as its
  own frame, header included) appended to a file in the same directory.
  Two variants show where the time goes: the same loop overwriting a file
  filled and synced beforehand (no size change for fdatasync to journal),
  and the appending loop driven from asyncio through a one-thread executor
  (how the store's writer reached its thread until it got one of its own,
  ``eventstore/logthread.py``, with a cheaper hand-over).

Each case runs ``--runs`` times; the order of the cases rotates from run to
run so that a slow period of the machine does not always hit the same case.
Reported: the median rate with its range (min-max), the median of the
per-run ratios (each ratio pairs two cases of the same run), and for the
awaited cases the p50/p99 latency of one call (median over the runs).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

from bench.common import (
    Target,
    add_common_args,
    bench_dir,
    event_frames,
    finish,
    fmt_rate,
    fmt_seconds,
    loadavg,
    machine_info,
    md_table,
    percentile,
    summarize,
    timer,
)
from bench.sqlite_adapter import SqliteAdapter
from bench.workload import Op, SimClock, events, op_time, operations
from eventstore import EventStore

PRODUCERS = 64


@dataclass(frozen=True)
class Case:
    key: str
    kind: str  # "store", "sqlite", "null", "raw-append", "raw-overwrite", "raw-thread"
    mode: str  # durability, or SQLite's synchronous
    producers: int
    size: str  # which count of operations: "sync1", "sync64", "fast", "none"


CASES = [
    Case("raw-append", "raw-append", "fdatasync", 1, "sync1"),
    Case("raw-overwrite", "raw-overwrite", "fdatasync", 1, "sync1"),
    Case("raw-thread", "raw-thread", "fdatasync", 1, "sync1"),
    Case("store-fsync-1", "store", "fsync", 1, "sync1"),
    Case("sqlite-FULL-1", "sqlite", "FULL", 1, "sync1"),
    Case("store-flush-1", "store", "flush", 1, "fast"),
    Case("sqlite-NORMAL-1", "sqlite", "NORMAL", 1, "fast"),
    Case("store-none-1", "store", "none", 1, "none"),
    Case("store-fsync-64", "store", "fsync", PRODUCERS, "sync64"),
    Case("sqlite-FULL-64", "sqlite", "FULL", PRODUCERS, "sync64"),
    Case("store-flush-64", "store", "flush", PRODUCERS, "fast"),
    Case("sqlite-NORMAL-64", "sqlite", "NORMAL", PRODUCERS, "fast"),
    Case("store-none-64", "store", "none", PRODUCERS, "none"),
    Case("harness-1", "null", "none", 1, "none"),
]

#: Operations per case (full run, --quick).  Sized so that each case takes
#: about a second or more at the rates this machine reaches.
SIZES = {
    "sync1": (4_000, 400),
    "sync64": (100_000, 4_000),
    "fast": (40_000, 4_000),
    "none": (300_000, 30_000),
}

#: (eventstore case, SQLite case) pairs reported as ratios.
PAIRS = [
    ("store-fsync-1", "sqlite-FULL-1"),
    ("store-flush-1", "sqlite-NORMAL-1"),
    ("store-fsync-64", "sqlite-FULL-64"),
    ("store-flush-64", "sqlite-NORMAL-64"),
]


# -- driving an adapter --------------------------------------------------------------------
async def _drive(
    adapter: Any, ops: Iterator[Op], clock: SimClock, latencies: list[float] | None
) -> None:
    """Make the calls ``ops`` in order, as bench.workload.apply does, timing each if asked.

    Producers share one iterator: each takes the next call when its last one
    returns, so calls start in the workload's time order however the
    producers interleave.  (Giving producer i every 64th call instead lets one
    that never has to wait -- "none" -- run all its calls before the next
    starts, and the others then write history older than what is in the
    indexes: inserts in the middle instead of appends.)
    """
    methods: dict[str, Any] = {}
    for op in ops:
        name, args, kwargs = op
        method = methods.get(name)
        if method is None:
            method = methods[name] = getattr(adapter, name)
        clock.now = op_time(op)
        if latencies is None:
            await method(*args, **kwargs)
        else:
            began = perf_counter()
            await method(*args, **kwargs)
            latencies.append(perf_counter() - began)


class _NullAdapter:
    """Every call a coroutine that does nothing: what the driving loop itself costs."""

    def __getattr__(self, name: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> None:
            return None

        return call

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def _adapter_case(case: Case, ops: Sequence[Op], where: Path) -> dict[str, float]:
    clock = SimClock(op_time(ops[0]))
    adapter: Any
    if case.kind == "null":
        adapter = _NullAdapter()
    elif case.kind == "store":
        shutil.rmtree(where, ignore_errors=True)
        adapter = EventStore(where, durability=case.mode, clock=clock)  # type: ignore[arg-type]
    else:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{where}{suffix}").unlink(missing_ok=True)
        adapter = SqliteAdapter(where, synchronous=case.mode, clock=clock)  # type: ignore[arg-type]
    await adapter.connect()
    # Latencies cost two clock reads a call: nothing beside an fsync, but
    # about 3% of a "none" write, whose figure is a throughput target.
    latencies: list[float] | None = [] if case.mode != "none" else None
    gc.collect()
    elapsed = timer()
    stream = iter(ops)
    await asyncio.gather(
        *(_drive(adapter, stream, clock, latencies) for _ in range(case.producers))
    )
    if case.kind == "store":
        await adapter.log.flush()
    seconds = elapsed()
    result = {"rate": len(ops) / seconds, "seconds": seconds}
    if case.kind == "store":
        result["events"] = adapter.position
        result["event_rate"] = adapter.position / seconds
    if latencies:
        result["p50"] = percentile(latencies, 50)
        result["p99"] = percentile(latencies, 99)
    await adapter.close()
    if case.kind == "store":
        shutil.rmtree(where, ignore_errors=True)
    elif case.kind == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{where}{suffix}").unlink(missing_ok=True)
    return result


# -- the disk's own limit ---------------------------------------------------------------------
def _raw_loop(frames: Sequence[bytes], path: Path, overwrite: bool) -> dict[str, float]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if overwrite:
            os.write(fd, b"\0" * sum(len(f) for f in frames))
            os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_SET)
        latencies = []
        write, sync = os.write, os.fdatasync
        elapsed = timer()
        for frame in frames:
            began = perf_counter()
            write(fd, frame)
            sync(fd)
            latencies.append(perf_counter() - began)
        seconds = elapsed()
    finally:
        os.close(fd)
        path.unlink()
    return _raw_result(frames, seconds, latencies)


async def _raw_thread(frames: Sequence[bytes], path: Path) -> dict[str, float]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    loop = asyncio.get_running_loop()

    def write(frame: bytes) -> None:
        os.write(fd, frame)
        os.fdatasync(fd)

    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            latencies = []
            elapsed = timer()
            for frame in frames:
                began = perf_counter()
                await loop.run_in_executor(pool, write, frame)
                latencies.append(perf_counter() - began)
            seconds = elapsed()
    finally:
        os.close(fd)
        path.unlink()
    return _raw_result(frames, seconds, latencies)


def _raw_result(
    frames: Sequence[bytes], seconds: float, latencies: list[float]
) -> dict[str, float]:
    return {
        "rate": len(frames) / seconds,
        "event_rate": len(frames) / seconds,
        "seconds": seconds,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "frame_bytes": sum(len(f) for f in frames) / len(frames),
    }


# -- the whole benchmark ------------------------------------------------------------------------
def measure(directory: Path, runs: int, quick: bool) -> dict[str, Any]:
    sizes = {name: counts[1 if quick else 0] for name, counts in SIZES.items()}
    ops = list(operations(max(sizes.values())))
    frames = event_frames(list(events(sizes["sync1"])))
    # The operations list is the harness's, not the store's: keep the
    # collector from walking its few hundred thousand tuples in every case.
    gc.collect()
    gc.freeze()
    work = directory / "write"
    work.mkdir(exist_ok=True)
    per_case: dict[str, list[dict[str, float]]] = {c.key: [] for c in CASES}
    loads = []
    for run in range(runs):
        loads.append(loadavg()[0])
        order = CASES[run % len(CASES) :] + CASES[: run % len(CASES)]
        for case in order:
            gc.collect()
            if case.kind == "raw-append":
                result = _raw_loop(frames, work / "raw.bin", overwrite=False)
            elif case.kind == "raw-overwrite":
                result = _raw_loop(frames, work / "raw.bin", overwrite=True)
            elif case.kind == "raw-thread":
                result = asyncio.run(_raw_thread(frames, work / "raw.bin"))
            else:
                where = work / ("store" if case.kind == "store" else "sqlite.db")
                result = asyncio.run(_adapter_case(case, ops[: sizes[case.size]], where))
            per_case[case.key].append(result)
            print(
                f"  run {run + 1}/{runs} {case.key:18} {fmt_rate(result['rate']):>8}/s", flush=True
            )
    gc.unfreeze()
    shutil.rmtree(work, ignore_errors=True)
    return {"sizes": sizes, "cases": per_case, "loadavg_1min_per_run": loads}


def summarize_results(data: dict[str, Any]) -> dict[str, Any]:
    cases = data["cases"]
    summary: dict[str, Any] = {}
    for key, results in cases.items():
        entry = {"rate": summarize([r["rate"] for r in results])}
        for field in ("event_rate", "p50", "p99"):
            if field in results[0]:
                entry[field] = summarize([r[field] for r in results])
        summary[key] = entry
    ratios: dict[str, Any] = {}
    for a, b in PAIRS:
        ratios[f"{a}/{b}"] = summarize(
            [x["rate"] / y["rate"] for x, y in zip(cases[a], cases[b], strict=True)]
        )
    for raw in ("raw-append", "raw-overwrite", "raw-thread"):
        ratios[f"store-fsync-1/{raw}"] = summarize(
            [
                x["event_rate"] / y["event_rate"]
                for x, y in zip(cases["store-fsync-1"], cases[raw], strict=True)
            ]
        )
    return {"cases": summary, "ratios": ratios}


def targets(data: dict[str, Any]) -> list[Target]:
    summary = summarize_results(data)
    c, r = summary["cases"], summary["ratios"]
    raw_ratio = r["store-fsync-1/raw-append"].median
    full1 = r["store-fsync-1/sqlite-FULL-1"].median
    rate64 = c["store-fsync-64"]["rate"].median
    full64 = r["store-fsync-64/sqlite-FULL-64"].median
    normal1 = r["store-flush-1/sqlite-NORMAL-1"].median
    none1 = c["store-none-1"]["rate"].median
    return [
        Target.check(
            '"fsync", 1 producer: >= 70% of the raw write+fdatasync loop',
            0.7,
            raw_ratio,
            higher=True,
            shown=f"{raw_ratio:.0%}",
        ),
        Target.check(
            '"fsync", 1 producer: >= 1.5x aiosqlite FULL',
            1.5,
            full1,
            higher=True,
            shown=f"{full1:.2f}x",
        ),
        Target.check(
            '"fsync", 64 producers: >= 100,000 durable writes/s',
            100_000,
            rate64,
            higher=True,
            shown=f"{fmt_rate(rate64)}/s",
        ),
        Target.check(
            '"fsync", 64 producers: >= 3x aiosqlite FULL',
            3,
            full64,
            higher=True,
            shown=f"{full64:.2f}x",
        ),
        Target.check(
            '"flush", 1 producer: >= 10x aiosqlite NORMAL',
            10,
            normal1,
            higher=True,
            shown=f"{normal1:.2f}x",
        ),
        Target.check(
            '"none", 1 producer: >= 500,000 writes/s',
            500_000,
            none1,
            higher=True,
            shown=f"{fmt_rate(none1)}/s",
        ),
    ]


def report(data: dict[str, Any]) -> str:
    """The Markdown tables of docs/benchmarks.md for one run of this script."""
    s = summarize_results(data)
    c, r = s["cases"], s["ratios"]
    sizes = data["sizes"]

    def rate(key: str) -> str:
        return str(c[key]["rate"].spread(fmt_rate))

    def lat(key: str) -> str:
        if "p50" not in c[key]:
            return "-"
        return f"{fmt_seconds(c[key]['p50'].median)} / {fmt_seconds(c[key]['p99'].median)}"

    rows = []
    for a, b in PAIRS:
        ca = next(x for x in CASES if x.key == a)
        cb = next(x for x in CASES if x.key == b)
        rows.append(
            [
                f"{ca.producers}",
                f'"{ca.mode}" vs {cb.mode}',
                f"{sizes[ca.size]:,}",
                rate(a),
                rate(b),
                r[f"{a}/{b}"].spread(lambda x: f"{x:.2f}x"),
                lat(a),
                lat(b),
            ]
        )
    for key in ("store-none-1", "store-none-64"):
        case = next(x for x in CASES if x.key == key)
        rows.append(
            [f"{case.producers}", '"none"', f"{sizes['none']:,}", rate(key), "-", "-", "-", "-"]
        )
    writes = md_table(
        [
            "producers",
            "mode",
            "calls",
            "eventstore calls/s",
            "SQLite calls/s",
            "ratio",
            "eventstore p50 / p99",
            "SQLite p50 / p99",
        ],
        rows,
    )
    raw_rows = []
    labels = {
        "raw-append": "os.write + os.fdatasync, appending (the limit)",
        "raw-overwrite": "the same, overwriting a pre-filled file",
        "raw-thread": "the appending loop, each write through a 1-thread executor",
    }
    for key, label in labels.items():
        raw_rows.append(
            [
                label,
                c[key]["rate"].spread(fmt_rate),
                lat(key),
                r[f"store-fsync-1/{key}"].spread(lambda x: f"{x:.0%}"),
            ]
        )
    raw_rows.append(
        [
            '**eventstore "fsync", 1 producer** (events/s)',
            c["store-fsync-1"]["event_rate"].spread(fmt_rate),
            lat("store-fsync-1"),
            "-",
        ]
    )
    frame_bytes = data["cases"]["raw-append"][0]["frame_bytes"]
    harness = c["harness-1"]["rate"]
    raw = md_table(["loop", "frames/s", "p50 / p99", "eventstore fsync-1 as % of it"], raw_rows)
    return (
        f"{writes}\n\n"
        f"The driving loop alone (the same calls on an adapter whose methods do nothing): "
        f"{harness.spread(fmt_rate)} calls/s, {1e6 / harness.median:.2f} us a call, "
        "included in every figure above.\n\n"
        f"Raw disk, {sizes['sync1']:,} one-event frames of {frame_bytes:.0f} bytes on average:\n\n"
        f"{raw}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 7)
    directory = bench_dir(args.dir)
    info = machine_info(directory)
    print(f"bench_write: {runs} runs in {directory}, load {info['loadavg']}", flush=True)
    data = measure(directory, runs, args.quick)
    data["runs"] = runs
    finish(data, info, targets, report, args.json)


if __name__ == "__main__":
    main()
