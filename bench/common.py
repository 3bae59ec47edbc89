"""Shared helpers of the benchmark scripts: statistics, memory, the machine, stores.

Not a benchmark itself.  The scripts beside it (``bench_write``,
``bench_replay``, ``bench_connect``, ``bench_reads``) and ``run_all`` import
it; ``docs/benchmarks.md`` describes the method they share.

Why medians: a run on a shared two-core machine is slowed now and then by
whatever else runs (another test suite, the host), never sped up, so the
distribution of run times has a long tail on one side.  The median ignores a
slow run or two; the mean moves with each of them.  The spread (min-max over
the runs) is printed beside every median so that a noisy figure shows as one.
Latencies are reported as percentiles (p50, p99) for the same reason.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "ROOT",
    "Stats",
    "Target",
    "add_common_args",
    "bench_dir",
    "build_store",
    "event_frames",
    "fmt_bytes",
    "fmt_rate",
    "fmt_seconds",
    "loadavg",
    "machine_info",
    "md_table",
    "percentile",
    "proc_status_kib",
    "run_child",
    "snapshots_aside",
    "summarize",
    "timer",
    "write_json",
]

#: The repository root (bench/ is directly below it).
ROOT = Path(__file__).resolve().parent.parent

#: Where stores and scratch files go unless --dir or EVENTSTORE_BENCH_DIR says
#: otherwise: beside the repository, so on the same disk, and never committed.
DEFAULT_DIR = ROOT.parent / "bench-tmp"

#: Events per EventStore.append() call when a benchmark store is generated.
BUILD_BATCH = 10_000


# -- statistics --------------------------------------------------------------------------
def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100), interpolating between closest ranks.

    The same definition as numpy's default ("linear"), so that figures can be
    checked with it.
    """
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Stats(dict[str, float]):
    """Median, min, max, quartiles and count of repeated measurements."""

    @property
    def median(self) -> float:
        return self["median"]

    def spread(self, fmt: Callable[[float], str]) -> str:
        """``median (min-max)`` formatted with ``fmt``."""
        if self["n"] == 1:
            return fmt(self["median"])
        return f"{fmt(self['median'])} ({fmt(self['min'])}-{fmt(self['max'])})"


def summarize(values: Sequence[float]) -> Stats:
    return Stats(
        median=percentile(values, 50),
        min=min(values),
        max=max(values),
        q1=percentile(values, 25),
        q3=percentile(values, 75),
        n=len(values),
    )


# -- formatting ---------------------------------------------------------------------------
def fmt_rate(x: float) -> str:
    """Events or operations per second, to three significant figures."""
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.0f}k"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_bytes(n: float) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.0f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.0f} KiB"
    return f"{n:.0f} B"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned."""
    out = ["| " + " | ".join(headers) + " |"]
    out.append("|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(headers))) + "|")
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


class Target(dict[str, Any]):
    """One target of the issue, the measured value and the verdict.

    ``higher`` says whether bigger is better.  ``factor`` is how far the
    measurement is from the target, >= 1 when met: measured/target for a
    floor, target/measured for a ceiling.
    """

    @classmethod
    def check(
        cls, name: str, target: float, measured: float, *, higher: bool, shown: str
    ) -> Target:
        factor = measured / target if higher else target / measured
        return cls(name=name, target=target, measured=measured, shown=shown, factor=factor)

    @property
    def met(self) -> bool:
        return bool(self["factor"] >= 1)

    def verdict(self) -> str:
        f = self["factor"]
        return f"met ({f:.2f}x)" if f >= 1 else f"**missed** (by {1 / f:.2f}x)"


# -- the process and the machine -------------------------------------------------------------
def proc_status_kib(field: str = "RssAnon") -> int:
    """A ``kB`` field of /proc/self/status: RssAnon (anonymous resident), VmHWM (peak RSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/self/status")


def loadavg() -> tuple[float, float, float]:
    with open("/proc/loadavg") as f:
        a, b, c = f.read().split()[:3]
    return float(a), float(b), float(c)


def _first_line(path: str, prefix: str) -> str:
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    return "?"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(directory: Path) -> dict[str, Any]:
    """What docs/benchmarks.md records about where a run was made."""
    df = subprocess.run(
        ["df", "-T", "-h", str(directory)], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    fields = df[-1].split() if len(df) > 1 else ["?"] * 3
    # A tree exported with `git archive` (to measure one commit while the
    # repository moves on) is no repository: its commit comes in this variable.
    commit = os.environ.get("EVENTSTORE_BENCH_COMMIT", "")
    dirty = ""
    if not commit:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": _first_line("/proc/cpuinfo", "model name"),
        "memory": _first_line("/proc/meminfo", "MemTotal"),
        "filesystem": f"{fields[0]} ({fields[1]}, {fields[2]})",
        "bench_dir": str(directory),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "msgspec": _version("msgspec"),
        "aiosqlite": _version("aiosqlite"),
        "sqlite": sqlite3.sqlite_version,
        "commit": commit + ("+local changes" if dirty else ""),
        "loadavg": loadavg(),
    }


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and few runs, to check the script"
    )
    parser.add_argument("--runs", type=int, help="repetitions of each measurement")
    parser.add_argument(
        "--dir",
        type=Path,
        help=f"scratch directory on the disk to measure (default $EVENTSTORE_BENCH_DIR "
        f"or {DEFAULT_DIR})",
    )
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")


def bench_dir(arg: Path | None) -> Path:
    path = arg or Path(os.environ.get("EVENTSTORE_BENCH_DIR", DEFAULT_DIR))
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=1) + "\n")


def finish(
    data: dict[str, Any],
    info: dict[str, Any],
    targets: Callable[[dict[str, Any]], list[Target]],
    report: Callable[[dict[str, Any]], str],
    json_path: Path | None,
) -> None:
    """The end of every script: targets, machine, load after; print; save the JSON."""
    data["targets"] = targets(data)
    data["machine"] = info
    data["loadavg_after"] = loadavg()
    print(report(data))
    for t in data["targets"]:
        print(f"{t['name']}: {t['shown']} -> {t.verdict()}")
    write_json(json_path, data)


def run_child(argv: Sequence[str], timeout: float = 1800) -> dict[str, Any]:
    """Run ``python -m <argv>`` in a fresh interpreter; return the JSON of its last line.

    A fresh process per measurement: memory that earlier measurements
    allocated (and CPython keeps in its arenas) must not count.
    """
    proc = subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# -- benchmark stores ------------------------------------------------------------------------
def event_frames(events: Sequence[Any]) -> list[bytes]:
    """Each event as the frame the log writes when a round holds only that event.

    That is what a bot that awaits every write in "fsync" mode puts on disk:
    a 20-byte header and a one-element msgpack array.
    """
    from eventstore.codec import encode_batch_into
    from eventstore.segment import FRAME_HEADER_SIZE, pack_frame_header

    frames = []
    for position, event in enumerate(events, 1):
        buf = bytearray(FRAME_HEADER_SIZE)
        encode_batch_into([event], buf, FRAME_HEADER_SIZE)
        pack_frame_header(buf, 0, position, 1)
        frames.append(bytes(buf))
    return frames


def _store_stamp(n: int, batch: int) -> dict[str, Any]:
    from eventstore.events import SCHEMA_FINGERPRINT
    from eventstore.segment import FRAME_EVENTS
    from projections import PROJECTION_VERSION

    return {
        "events": n,
        "seed": 0,
        "batch": batch,
        "frame_events": FRAME_EVENTS,
        "schema": SCHEMA_FINGERPRINT.hex(),
        "projection_version": PROJECTION_VERSION,
    }


def build_store(directory: Path, n: int, *, batch: int = BUILD_BATCH) -> dict[str, Any]:
    """Make (or reuse) a store of the first ``n`` events of the busy-channel workload.

    The events of ``bench.workload.events(n)`` are appended ``batch`` at a
    time with durability "none", so the log's frames hold up to
    ``segmentlog.FRAME_EVENTS`` events each -- not what a bot writing one event per
    round with "fsync" leaves (one frame per event).  ``batch=1`` makes that
    store: one awaited append per event with durability "flush" writes one
    frame per event (without "fsync"'s 200 us a write, and the same bytes).
    A snapshot at the last event is written.  A stamp file beside the directory records how it was
    made; a store with the same stamp is reused, anything else is rebuilt.
    Returns the stamp (with the build time and the sizes on disk).
    """
    import asyncio

    stamp_path = directory.with_name(directory.name + ".json")
    want = _store_stamp(n, batch)
    if directory.is_dir() and stamp_path.exists():
        have = json.loads(stamp_path.read_text())
        if {k: have.get(k) for k in want} == want:
            return dict(have)
    shutil.rmtree(directory, ignore_errors=True)
    stamp_path.unlink(missing_ok=True)

    async def fill() -> float:
        from bench.workload import events
        from eventstore import EventStore

        store = EventStore(
            directory, durability="flush" if batch == 1 else "none", snapshot_every=None
        )
        await store.connect()
        began = time.perf_counter()
        chunk: list[Any] = []
        for event in events(n):
            chunk.append(event)
            if len(chunk) == batch:
                await store.append(chunk)
                chunk = []
                # Let the log's writer task run between batches, as a bot's
                # event loop would.  (Before 13b9cca this was needed: "none"
                # mode stalled segment rolls for a caller that never yields.)
                await asyncio.sleep(0)
        if chunk:
            await store.append(chunk)
        await store.write_snapshot()
        await store.close()
        return time.perf_counter() - began

    took = asyncio.run(fill())
    segments = sorted(directory.glob("*.seg"))
    snaps = sorted(directory.glob("*.snap"))
    have = {
        **want,
        "build_seconds": round(took, 1),
        "segments": len(segments),
        "log_bytes": sum(p.stat().st_size for p in segments),
        "snapshot_bytes": sum(p.stat().st_size for p in snaps),
    }
    stamp_path.write_text(json.dumps(have, indent=1) + "\n")
    return have


@contextlib.contextmanager
def snapshots_aside(directory: Path) -> Iterator[None]:
    """Move a store's snapshots out of its directory for a while (full replays).

    They go to a sibling directory, not a subdirectory: the store must not
    see them at all.  Put back even if the block raises.
    """
    aside = directory.with_name(directory.name + ".snapshots-aside")
    aside.mkdir(exist_ok=True)
    moved = []
    try:
        for snap in directory.glob("*.snap"):
            target = aside / snap.name
            snap.rename(target)
            moved.append((target, snap))
        yield
    finally:
        for target, snap in moved:
            target.rename(snap)
        for stray in directory.glob("*.snap"):
            # One written meanwhile (nothing here should, but a full replay of
            # a read-write store would after snapshot_every events).
            if all(stray != s for _, s in moved):
                stray.unlink()
        aside.rmdir()


def timer() -> Callable[[], float]:
    """``elapsed = timer(); ...; elapsed()`` in seconds (perf_counter)."""
    began = time.perf_counter()
    return lambda: time.perf_counter() - began
