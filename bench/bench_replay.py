"""Benchmark: full replay in events/s, beside msgspec decoding the same bytes alone.

Command (from the repository root; about four minutes, plus 30 s the first
time to build three stores of 1M positions under the bench directory, then
kept)::

    python -m bench.bench_replay             # 1,000,000 events, 7 runs
    python -m bench.bench_replay --quick     # 50,000 events, 2 runs: checks the script

Three stores of the same first N events of the busy-channel workload
(``bench.workload.events``), see ``bench.common.build_store``:

* "batched": appended 10,000 at a time with durability "none", so the log
  holds frames of up to ``FRAME_EVENTS`` (64) events (how the 1M/10M
  stores of the other benchmarks are made);
* "1 event/frame": one awaited append per event, one frame per event, as a
  bot awaiting every write in "fsync" mode leaves its log;
* "compacted": the batched store after ``EventStore.compact()``, which
  drops the statistics updates a later one supersedes (about half of the
  events) and keeps the rest at their positions.  Its kept events are
  rarely neighbours: its frames hold up to 64 positions each, with nil for
  the positions without an event (holes, see docs/format.md).  Its rates
  count the events it holds, not the N positions.

On each, one after the other in every run (the order rotating), all reading
the same segment files, warm in the page cache (they were just read):

* ``read``: the segment files read in 4 MiB chunks, nothing else (the I/O floor);
* ``decode``: msgspec alone -- the segment bytes read, split into frames by
  their length fields, each payload decoded with the same typed decoder as
  the store (``msgspec.msgpack.Decoder(list[Event])``); no checksum, no
  projections.  The reference the target compares with;
* ``decode+crc``: the same plus the crc32 every frame is checked with;
* ``read_groups``: ``SegmentLog.read_groups`` (read-only log), events
  counted but not applied: opening the log (which starts from the
  ``tail.index`` the build's close saved, so it does not walk the last
  segment first), frame walking, checksums, decoding, the async iteration
  (one step per group of runs; before ``read_groups`` existed this row
  was ``read_runs``, one step per run);
* ``read_groups+apply``: the same, each group applied with
  ``Projections.apply_runs`` -- the work of connect();
* ``connect()``: ``EventStore(read_only=True).connect()`` with the
  snapshots moved aside, so it replays from event 1 (read-only: no lock and
  no snapshot written on close; the replay is the same code).

events/s = N / seconds; the median over the runs with its range.  Replay
from a cold page cache is not measured here (see bench_connect).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from bench.common import (
    Target,
    add_common_args,
    bench_dir,
    build_store,
    finish,
    fmt_rate,
    fmt_seconds,
    loadavg,
    machine_info,
    md_table,
    snapshots_aside,
    summarize,
    timer,
)
from eventstore import EventStore
from eventstore.events import Event
from eventstore.segment import (
    FLAG_COMPACTED,
    FLAG_HOLES,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
)
from eventstore.segmentlog import READ_CHUNK, SegmentLog
from projections import Projections

#: The same type the store's decoder is built for (eventstore/codec.py).
DECODER = msgspec.msgpack.Decoder(list[Event])
HOLES_DECODER = msgspec.msgpack.Decoder(list[Event | None])

STORES = {"batched": 10_000, "1 event/frame": 1, "compacted": 10_000}
STEPS = ["read", "decode", "decode+crc", "read_groups", "read_groups+apply", "connect()"]


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def _flags(path: Path) -> int:
    """A segment's header flags."""
    with path.open("rb") as f:
        return int.from_bytes(f.read(12)[10:12], "little")


def read_only(directory: Path) -> int:
    """Read every segment in READ_CHUNK pieces; return the bytes read."""
    total = 0
    for path in _segments(directory):
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while chunk := os.pread(fd, READ_CHUNK, offset):
                offset += len(chunk)
        finally:
            os.close(fd)
        total += offset
    return total


def decode_only(directory: Path, crc: bool) -> int:
    """Split every segment into frames and decode each payload; return the events.

    Frames of a compacted segment hold nil for the positions without an
    event (FLAG_HOLES): decoded with ``HOLES_DECODER``, and not counted.
    """
    unpack = FRAME_HEADER.unpack_from
    events = 0
    for path in _segments(directory):
        data = path.read_bytes()
        holes = bool(_flags(path) & FLAG_HOLES)
        decode = (HOLES_DECODER if holes else DECODER).decode
        view = memoryview(data)
        i, end = HEADER_SIZE, len(data)
        while i < end:
            length = unpack(data, i)[0]
            start = i + FRAME_HEADER_SIZE
            i = start + length
            if crc:
                zlib.crc32(view[start:i], zlib.crc32(view[start - 12 : start]))
            batch = decode(view[start:i])
            events += len(batch) - batch.count(None) if holes else len(batch)
    return events


async def read_groups(directory: Path, apply: bool) -> int:
    # Holes are counted only where there can be some: a count(None) over
    # every run costs about 9 ns an event, 5% of a read_groups step.
    holes = any(_flags(path) & FLAG_HOLES for path in _segments(directory))
    log = SegmentLog(str(directory), read_only=True)
    await log.open()
    proj = Projections()
    events = 0
    try:
        async for group in log.read_groups(1):
            if apply:
                proj.apply_runs(group)  # as EventStore.connect() does
            events += sum(len(run) for _, run in group)
            if holes:
                events -= sum(run.count(None) for _, run in group)
    finally:
        await log.close()
    return events


async def connect(directory: Path) -> int:
    with snapshots_aside(directory):
        store = EventStore(directory, read_only=True)
        await store.connect()
        events = store.position
        await store.close()
    return events


def _step(name: str, directory: Path) -> Callable[[], Any]:
    if name == "read":
        return lambda: read_only(directory)
    if name == "decode":
        return lambda: decode_only(directory, crc=False)
    if name == "decode+crc":
        return lambda: decode_only(directory, crc=True)
    if name == "read_groups":
        return lambda: asyncio.run(read_groups(directory, apply=False))
    if name == "read_groups+apply":
        return lambda: asyncio.run(read_groups(directory, apply=True))
    return lambda: asyncio.run(connect(directory))


def build_compacted(source: Path, where: Path, source_stamp: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``source`` compacted (or the one kept from an earlier run of the same stamp)."""
    stamp_path = where.with_name(where.name + ".json")
    # What this code's compaction writes (segment flags): a store compacted
    # by code that wrote other frames is compacted again.
    flags = FLAG_COMPACTED | FLAG_HOLES
    if where.is_dir() and stamp_path.exists():
        have = json.loads(stamp_path.read_text())
        if have.get("source") == source_stamp and have.get("segment_flags") == flags:
            return dict(have)
    shutil.rmtree(where, ignore_errors=True)
    shutil.copytree(source, where)

    async def compact() -> Any:
        store = EventStore(where, durability="none", snapshot_every=None)
        await store.connect()
        report = await store.compact()
        await store.write_snapshot()
        await store.close()
        return report

    report = asyncio.run(compact())
    segments = sorted(where.glob("*.seg"))
    have = {
        **source_stamp,
        "source": source_stamp,
        "events_held": report.events_after,
        "segment_flags": flags,
        "segments": len(segments),
        "log_bytes": sum(p.stat().st_size for p in segments),
    }
    stamp_path.write_text(json.dumps(have, indent=1) + "\n")
    return have


def measure(directory: Path, n: int, runs: int) -> dict[str, Any]:
    stores: dict[str, dict[str, Any]] = {}
    for label, batch in STORES.items():
        if label == "compacted":
            source = stores["batched"]
            where = directory / f"store-{n}-b{batch}-compacted"
            stamp = build_compacted(source["dir"], where, source["stamp"])
        else:
            where = directory / f"store-{n}-b{batch}"
            stamp = build_store(where, n, batch=batch)
        print(f"  store {label}: {where}", flush=True)
        stores[label] = {"dir": where, "stamp": stamp, "events": stamp.get("events_held", n)}
    seconds: dict[str, dict[str, list[float]]] = {lab: {s: [] for s in STEPS} for lab in stores}
    loads = []
    for store in stores.values():
        _step("read", store["dir"])()  # into the page cache
    for run in range(runs):
        loads.append(loadavg()[0])
        for label, store in stores.items():
            order = STEPS[run % len(STEPS) :] + STEPS[: run % len(STEPS)]
            for name in order:
                fn = _step(name, store["dir"])
                gc.collect()
                elapsed = timer()
                out = fn()
                took = elapsed()
                # connect() counts positions, the others the events read.
                want = n if name == "connect()" else store["events"]
                if name != "read" and out != want:
                    raise RuntimeError(f"{name} on {label} saw {out}, expected {want}")
                seconds[label][name].append(took)
                print(
                    f"  run {run + 1}/{runs} {label:14} {name:16} "
                    f"{fmt_rate(store['events'] / took):>7} ev/s",
                    flush=True,
                )
    return {
        "events": n,
        "events_held": {lab: s["events"] for lab, s in stores.items()},
        "stores": {lab: s["stamp"] for lab, s in stores.items()},
        "seconds": seconds,
        "loadavg_1min_per_run": loads,
    }


def _rates(data: dict[str, Any], label: str, step: str) -> list[float]:
    held = data.get("events_held", {}).get(label, data["events"])
    return [held / s for s in data["seconds"][label][step]]


def targets(data: dict[str, Any]) -> list[Target]:
    replay = summarize(_rates(data, "batched", "connect()")).median
    ratio = summarize(
        [
            d / c
            for c, d in zip(
                data["seconds"]["batched"]["connect()"],
                data["seconds"]["batched"]["decode"],
                strict=True,
            )
        ]
    ).median
    return [
        Target.check(
            "Full replay (connect(), no snapshot, batched frames): >= 1.5M events/s",
            1_500_000,
            replay,
            higher=True,
            shown=f"{fmt_rate(replay)}/s",
        ),
        Target.check(
            "Full replay: >= half of msgspec's own decode rate on the same bytes",
            0.5,
            ratio,
            higher=True,
            shown=f"{ratio:.0%} of it",
        ),
    ]


def report(data: dict[str, Any]) -> str:
    n = data["events"]
    headers = ["step"]
    for label, stamp in data["stores"].items():
        held = data.get("events_held", {}).get(label, n)
        what = "" if held == n else f", {fmt_rate(held)} events"
        headers += [
            f"{label} ({fmt_rate(stamp['log_bytes'] / held)} B/event{what}) events/s",
            "vs decode",
        ]
    rows = []
    for step in STEPS:
        row = [step]
        for label in data["stores"]:
            rate = summarize(_rates(data, label, step))
            ratio = summarize(
                [
                    d / s
                    for s, d in zip(
                        data["seconds"][label][step], data["seconds"][label]["decode"], strict=True
                    )
                ]
            )
            row += [rate.spread(fmt_rate), "-" if step == "read" else f"{ratio.median:.0%}"]
        rows.append(row)
    times = ", ".join(
        f"{label}: {fmt_seconds(summarize(data['seconds'][label]['connect()']).median)}"
        for label in data["stores"]
    )
    table = md_table(headers, rows)
    return f"{table}\n\nconnect() of {n:,} positions without a snapshot: {times}.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--events", type=int, help="events in the stores (default 1,000,000)")
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 7)
    n = args.events or (50_000 if args.quick else 1_000_000)
    directory = bench_dir(args.dir)
    info = machine_info(directory)
    print(f"bench_replay: {n:,} events, {runs} runs in {directory}, load {info['loadavg']}")
    data = measure(directory, n, runs)
    data["runs"] = runs
    finish(data, info, targets, report, args.json)


if __name__ == "__main__":
    main()
