"""Run every benchmark in one go and print the tables of docs/benchmarks.md.

Command (from the repository root; ``./dev bench`` runs the same)::

    python -m bench.run_all                  # the full run: 8-10 minutes, 1 more to build stores
    python -m bench.run_all --quick          # every script at a small size: a minute
    python -m bench.run_all --only bench_reads   # rerun one script ...
    python -m bench.run_all --report         # ... and print the tables of all results

It first waits (up to ``--max-wait`` seconds, 15 minutes by default) for the
1-minute load average to fall below ``--max-load``: the machine is shared and
other test suites slow every figure down.  It runs anyway after that, and the
load is recorded either way.  Then it runs bench_write, bench_replay,
bench_connect and bench_reads, each in its own process with ``--json``,
and finally prints (and writes to ``<dir>/results.md``) the machine, the
result tables and the targets table.  The stores the benchmarks built are
deleted at the end unless ``--keep-stores`` is given.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    DEFAULT_DIR,
    ROOT,
    Target,
    bench_dir,
    loadavg,
    machine_info,
    md_table,
)

SCRIPTS = [
    ("bench_write", "Write throughput"),
    ("bench_replay", "Full replay"),
    ("bench_connect", "connect() and memory"),
    ("bench_reads", "Read latency"),
]


def wait_for_quiet(max_load: float, max_wait: float) -> tuple[float, tuple[float, float, float]]:
    """Sleep until the 1-minute load is below ``max_load`` or ``max_wait`` has passed."""
    began = time.monotonic()
    while True:
        load = loadavg()
        waited = time.monotonic() - began
        if load[0] < max_load or waited >= max_wait:
            return waited, load
        print(f"run_all: load {load[0]:.2f} >= {max_load}, waiting ({waited:.0f} s so far)")
        time.sleep(min(30.0, max_wait - waited))


def render(results: dict[str, dict[str, Any]], info: dict[str, Any], notes: list[str]) -> str:
    out = ["## Machine", ""]
    out.append(
        md_table(
            ["what", "value"],
            [
                ["date (UTC)", info["date"]],
                ["CPU", f"{info['cpu']}, {info['nproc']} cores (nproc)"],
                ["memory", info["memory"]],
                ["bench directory", f"{info['bench_dir']} on {info['filesystem']}"],
                ["kernel", info["kernel"]],
                ["Python", info["python"]],
                [
                    "libraries",
                    f"msgspec {info['msgspec']}, aiosqlite {info['aiosqlite']}, "
                    f"SQLite {info['sqlite']}",
                ],
                ["eventstore commit", info["commit"]],
            ],
        )
    )
    out += ["", *notes, ""]
    every: list[Target] = []
    for name, title in SCRIPTS:
        if name not in results:
            continue
        module = importlib.import_module(f"bench.{name}")
        data = results[name]
        out += [f"## {title} (`python -m bench.{name}`)", "", module.report(data)]
        every += module.targets(data)
    out += ["## Targets", ""]
    out.append(
        md_table(
            ["target", "measured", "verdict"],
            [[t["name"], t["shown"], t.verdict()] for t in every],
        )
    )
    return "\n".join(out) + "\n"


def report_only(results_dir: Path) -> None:
    """Render the JSON results of earlier runs (e.g. some scripts rerun with --only)."""
    results = {
        name: json.loads((results_dir / f"{name}.json").read_text())
        for name, _ in SCRIPTS
        if (results_dir / f"{name}.json").exists()
    }
    if not results:
        raise SystemExit(f"no results in {results_dir}")
    first = next(iter(results.values()))
    notes = []
    for name, data in results.items():
        info = data["machine"]
        load = info["loadavg"]
        after = data.get("loadavg_after", ["?"])[0]
        notes.append(
            f"`{name}`: run at {info['date']} on eventstore {info['commit']}, 1-minute load "
            f"{load[0]:.2f} at its start and {after} at its end."
        )
    text = render(results, first["machine"], notes)
    (results_dir / "results.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every script at a small size")
    parser.add_argument("--dir", type=Path, help=f"scratch directory (default {DEFAULT_DIR})")
    parser.add_argument("--max-load", type=float, default=0.7, help="1-minute load to wait for")
    parser.add_argument("--max-wait", type=float, default=900, help="seconds to wait for it")
    parser.add_argument("--keep-stores", action="store_true", help="keep the generated stores")
    parser.add_argument(
        "--only", action="append", choices=[s for s, _ in SCRIPTS], help="run only these"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="run nothing: print the tables of the results already in <dir>/results",
    )
    args = parser.parse_args()
    directory = bench_dir(args.dir)
    results_dir = directory / ("results-quick" if args.quick else "results")
    results_dir.mkdir(exist_ok=True)
    if args.report:
        report_only(results_dir)
        return
    waited, load = wait_for_quiet(args.max_load, 0 if args.quick else args.max_wait)
    info = machine_info(directory)
    notes = [
        f"Load average (1, 5, 15 min) at the start: {load[0]:.2f}, {load[1]:.2f}, "
        f"{load[2]:.2f}, after waiting {waited:.0f} s for the 1-minute figure to fall "
        f"below {args.max_load}."
    ]
    results: dict[str, dict[str, Any]] = {}
    for name, _title in SCRIPTS:
        if args.only and name not in args.only:
            continue
        out = results_dir / f"{name}.json"
        cmd = [sys.executable, "-m", f"bench.{name}", "--dir", str(directory), "--json", str(out)]
        if args.quick:
            cmd.append("--quick")
        before = loadavg()
        began = time.monotonic()
        print(f"run_all: {' '.join(cmd[1:])} (load {before[0]:.2f})", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        results[name] = json.loads(out.read_text())
        commit = results[name]["machine"]["commit"]
        notes.append(
            f"`{name}`: {time.monotonic() - began:.0f} s, 1-minute load "
            f"{before[0]:.2f} before and {loadavg()[0]:.2f} after"
            + ("." if commit == info["commit"] else f", **eventstore commit {commit}**.")
        )
    text = render(results, info, notes)
    (results_dir / "results.md").write_text(text)
    print(text)
    if not args.keep_stores:
        for store in directory.glob("store-*"):
            if store.is_dir():
                shutil.rmtree(store)
                store.with_name(store.name + ".json").unlink(missing_ok=True)
    print(f"run_all: results in {results_dir}")


if __name__ == "__main__":
    main()
