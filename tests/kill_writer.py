"""Child process of the kill tests: write through the adapter, report each ack.

Usage: python kill_writer.py DIR DURABILITY SEGMENT_SIZE TASKS [SNAPSHOT_EVERY]

Each of TASKS concurrent tasks saves messages "t<task>-<n>" for n = 0, 1, ...
and prints "<task> <n>" (flushed) after each write's await returns, i.e. once
the store has acknowledged it.  The parent kills this process with SIGKILL at
a random moment and checks that every acknowledged write survived.
"""

from __future__ import annotations

import asyncio
import sys

from eventstore import EventStore


async def main() -> None:
    directory, durability, segment_size, tasks = sys.argv[1:5]
    snapshot_every = int(sys.argv[5]) if len(sys.argv) > 5 else 100_000
    store = EventStore(
        directory,
        durability=durability,  # type: ignore[arg-type]
        segment_size=int(segment_size),
        snapshot_every=snapshot_every,
    )
    await store.connect()
    out = sys.stdout

    async def writer(task: int) -> None:
        n = 0
        while True:
            await store.save_message(f"w{task}", f"t{task}-{n}", timestamp=n)
            if n % 7 == 0:
                await store.save_user_stats(f"w{task}", chat_lines=1, last_seen=n)
            out.write(f"{task} {n}\n")
            out.flush()
            n += 1

    print("ready", flush=True)
    await asyncio.gather(*(writer(t) for t in range(int(tasks))))


if __name__ == "__main__":
    asyncio.run(main())
