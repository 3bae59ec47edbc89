"""Benchmark: connect() time and anonymous memory at 1M and 10M events.

Command (from the repository root; about two and a half minutes, plus
about 50 s the first time to build a 1M- and a 10M-event store and a 1M
store of one-event frames under the bench directory, which are kept for
bench_reads, bench_replay and later runs)::

    python -m bench.bench_connect            # 1M and 10M events, 1M one a frame
    python -m bench.bench_connect --quick    # 50,000 events (both kinds), 2 runs: checks the script

The stores hold the first N events of the busy-channel workload, appended
10,000 at a time with durability "none" (``bench.common.build_store``), so
their frames hold up to ``FRAME_EVENTS`` (64) events each, and a snapshot
at the last event.  A third store holds the first 1M events one frame per
event, as a bot that awaits every "fsync" write leaves its log (the store
bench_replay builds): its last segment holds a million frames.  Each store
was closed once, so it holds the tail.index that lets a writer's open walk
only the last few of them; the store of one-event frames is also opened
with it moved aside (every frame walked, as before tail.index existed).

Every measurement runs in a fresh interpreter (``--child``), so that nothing
an earlier measurement allocated counts: it imports the library, reads
RssAnon from /proc/self/status, times ``EventStore(dir, snapshot_every=None)
.connect()`` (read-write, as the bot opens it: lock, recovery scan of the
last segment, snapshot or replay), reads RssAnon and VmHWM (peak resident
set, file-backed pages included) again and exits without close(), which
would write a snapshot.  Cases:

* with the snapshot, and without it (moved aside: a full replay);
* warm: the files are in the page cache (they were just read or written);
* cold: before the child starts, every file of the store is dropped from the
  page cache with posix_fadvise(POSIX_FADV_DONTNEED).  That empties this
  machine's cache; a virtual disk may still be cached by its host;
* the store of one-event frames only: with the snapshot and without
  tail.index (moved aside), warm.

Reported: the median over the runs, with the range (min-max).  RssAnon
after connect is the figure the target names; "of which the store" is the
increase over the interpreter with the library imported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    BUILD_BATCH,
    Target,
    add_common_args,
    bench_dir,
    build_store,
    finish,
    fmt_bytes,
    fmt_rate,
    fmt_seconds,
    loadavg,
    machine_info,
    md_table,
    proc_status_kib,
    run_child,
    snapshots_aside,
    summarize,
)
from eventstore.tailindex import TAIL_INDEX

CASES = [
    ("snapshot", "warm"),
    ("replay", "warm"),
    ("snapshot", "cold"),
    ("replay", "cold"),
]
#: The store of one-event frames also opens without its tail.index (moved
#: aside), as a store closed by code before it, or after a crash in a
#: segment started since the last clean close, opens: the writer walks
#: every frame of the last segment.
ONE_FRAME_CASES = [*CASES, ("no tail.index", "warm")]


# -- the child: one connect() in a fresh process -------------------------------------------
def child(directory: str) -> None:
    import json

    from eventstore import EventStore

    before = proc_status_kib("RssAnon")

    async def connect() -> tuple[float, EventStore]:
        store = EventStore(directory, snapshot_every=None)
        began = time.perf_counter()
        await store.connect()
        took = time.perf_counter() - began
        return took, store

    # The store is held while its memory is read: let go, its read models
    # are freed at once (they hold no reference cycle), and RssAnon would
    # measure an empty process.
    seconds, store = asyncio.run(connect())
    result = {
        "seconds": seconds,
        "position": store.position,
        "rss_anon_before": before * 1024,
        "rss_anon": proc_status_kib("RssAnon") * 1024,
        "vm_hwm": proc_status_kib("VmHWM") * 1024,
    }
    print(json.dumps(result), flush=True)
    # No close(): it would write a snapshot.  The writer lock dies with us.
    os._exit(0)


def drop_page_cache(directory: Path) -> None:
    """Evict the store's files from this machine's page cache (they are clean)."""
    for path in directory.iterdir():
        if not path.is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@contextlib.contextmanager
def tail_index_aside(directory: Path) -> Iterator[None]:
    """Move the store's tail.index out of its directory for a while."""
    path = directory / TAIL_INDEX
    aside = directory.with_name(directory.name + "." + TAIL_INDEX)
    path.rename(aside)
    try:
        yield
    finally:
        aside.rename(path)


def ensure_tail_index(directory: Path) -> None:
    """Give a store built before tail.index existed one (open and close it once)."""
    if (directory / TAIL_INDEX).exists():
        return
    from eventstore import EventStore

    async def open_and_close() -> None:
        async with EventStore(directory, snapshot_every=None):
            pass

    asyncio.run(open_and_close())


def measure_one(directory: Path, source: str, cache: str) -> dict[str, Any]:
    if source == "no tail.index":
        with tail_index_aside(directory):
            return run_child(["bench.bench_connect", "--child", str(directory)])
    if source == "replay":
        with snapshots_aside(directory):
            if cache == "cold":
                drop_page_cache(directory)
            return run_child(["bench.bench_connect", "--child", str(directory)])
    if cache == "cold":
        drop_page_cache(directory)
    return run_child(["bench.bench_connect", "--child", str(directory)])


def measure(directory: Path, sizes: list[tuple[int, int, int]]) -> dict[str, Any]:
    out: dict[str, Any] = {"sizes": {}, "loadavg_1min_per_run": []}
    for n, batch, runs in sizes:
        where = directory / f"store-{n}-b{batch}"
        print(f"  store of {n:,} events, appended {batch:,} at a time: {where}", flush=True)
        stamp = build_store(where, n, batch=batch)
        ensure_tail_index(where)
        cases = ONE_FRAME_CASES if batch == 1 else CASES
        results: dict[str, list[dict[str, Any]]] = {f"{s}/{c}": [] for s, c in cases}
        for run in range(runs):
            out["loadavg_1min_per_run"].append(loadavg()[0])
            for source, cache in cases[run % len(cases) :] + cases[: run % len(cases)]:
                result = measure_one(where, source, cache)
                if result["position"] != n:
                    raise RuntimeError(f"connected at {result['position']}, expected {n}")
                results[f"{source}/{cache}"].append(result)
                print(
                    f"  {n:,} run {run + 1}/{runs} {source:8} {cache}: "
                    f"{fmt_seconds(result['seconds'])}, RssAnon {fmt_bytes(result['rss_anon'])}",
                    flush=True,
                )
        out["sizes"][_key(n, batch)] = {
            "events": n,
            "batch": batch,
            "stamp": stamp,
            "runs": runs,
            "results": results,
        }
    return out


def _key(n: int, batch: int) -> str:
    return str(n) if batch != 1 else f"{n}-frame-per-event"


def _stat(results: list[dict[str, Any]], field: str) -> Any:
    return summarize([r[field] for r in results])


def targets(data: dict[str, Any]) -> list[Target]:
    batched = [e for e in data["sizes"].values() if e["batch"] != 1]
    entry = max(batched, key=lambda e: e["events"])
    res = entry["results"]
    n = entry["events"]
    label = f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n:,}"
    connect = _stat(res["snapshot/warm"], "seconds").median
    out = [
        Target.check(
            f"connect() at {label} events with a snapshot (warm cache): < 0.5 s",
            0.5,
            connect,
            higher=False,
            shown=fmt_seconds(connect),
        )
    ]
    for source in ("snapshot", "replay"):
        rss = max(_stat(res[f"{source}/{cache}"], "rss_anon").median for cache in ("warm", "cold"))
        out.append(
            Target.check(
                f"RssAnon after connect at {label} events ({source}): < 300 MB",
                300e6,
                rss,
                higher=False,
                shown=f"{rss / 1e6:.0f} MB",
            )
        )
    return out


def report(data: dict[str, Any]) -> str:
    rows = []
    labels = {
        "snapshot": "snapshot",
        "replay": "none (full replay)",
        "no tail.index": "snapshot, no tail.index",
    }
    for entry in data["sizes"].values():
        n = entry["events"]
        for source, cache in ONE_FRAME_CASES if entry["batch"] == 1 else CASES:
            res = entry["results"][f"{source}/{cache}"]
            secs = _stat(res, "seconds")
            rss = _stat(res, "rss_anon")
            base = _stat(res, "rss_anon_before").median
            hwm = _stat(res, "vm_hwm")
            rows.append(
                [
                    f"{n:,}",
                    "64" if entry["batch"] != 1 else "1",
                    labels[source],
                    cache,
                    secs.spread(fmt_seconds),
                    fmt_rate(n / secs.median) + "/s" if source == "replay" else "-",
                    f"{rss.median / 1e6:.0f} MB ({rss['min'] / 1e6:.0f}-{rss['max'] / 1e6:.0f})",
                    f"{(rss.median - base) / 1e6:.0f} MB",
                    f"{hwm.median / 1e6:.0f} MB",
                ]
            )
    table = md_table(
        [
            "events",
            "events a frame (up to)",
            "snapshot",
            "page cache",
            "connect()",
            "replay rate",
            "RssAnon after",
            "of which the store",
            "VmHWM (peak RSS)",
        ],
        rows,
    )
    sizes = "; ".join(
        f"{e['events']:,} events{' one a frame' if e['batch'] == 1 else ''}: log "
        f"{fmt_bytes(e['stamp']['log_bytes'])} in "
        f"{e['stamp']['segments']} segments, snapshot {fmt_bytes(e['stamp']['snapshot_bytes'])}, "
        f"{e['runs']} runs"
        for e in data["sizes"].values()
    )
    return f"{table}\n\nStores: {sizes}.  MB = 10^6 bytes.\n"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    args = parser.parse_args()
    batched = BUILD_BATCH
    if args.quick:
        sizes = [(50_000, batched, args.runs or 2), (50_000, 1, args.runs or 2)]
    else:
        sizes = [
            (1_000_000, batched, args.runs or 5),
            (10_000_000, batched, args.runs or 3),
            (1_000_000, 1, args.runs or 5),
        ]
    directory = bench_dir(args.dir)
    info = machine_info(directory)
    print(f"bench_connect: {sizes} in {directory}, load {info['loadavg']}", flush=True)
    data = measure(directory, sizes)
    finish(data, info, targets, report, args.json)


if __name__ == "__main__":
    main()
