"""Child process of the PostgreSQL tests: append through EventStore, report each ack.

Usage: python pg_writer.py DSN WRITER TASKS COUNT MAX_BATCH [INSERT_ROWS]

Each of TASKS concurrent tasks appends batches of MessageSaved events with
``store.append``: in round n, ``1 + n % MAX_BATCH`` events whose texts are
``"w<writer>-t<task>-<n>-<i>/<size>"``.  After each append returns it prints
``ack <writer> <task> <n> <first> <size>`` (flushed): the batch is
acknowledged.  Every third round it also writes through the adapter's
methods (user stats, an action, a channel peak, a user count), so the
folds that re-check decisions run on interleaved histories.

After each ack the task checks that the store reads its own write: the store
has applied through the batch, and reads the batch's first message at
``first``.  A failed check prints ``error ...`` and exits with status 1.

A round of appends holding at most INSERT_ROWS events (default: the log's,
10,000) commits as one statement; a larger one as a transaction of several
statements, one INSERT per INSERT_ROWS events.  A small INSERT_ROWS makes
the second kind common, so that a kill can land inside a transaction.

The process connects, prints ``ready`` and starts writing when it reads a
line on stdin, so that the parent can start all writers at once.

With COUNT > 0 each task stops after COUNT rounds; the process then prints
``done``, waits for a line on stdin, refreshes, prints ``state <base64
pickle of store.projections.state()>`` and exits.  With COUNT = 0 the tasks
run until the process is killed.
"""

from __future__ import annotations

import asyncio
import base64
import pickle
import sys

from eventstore import EventStore
from eventstore.events import MessageSaved
from eventstore.pglog import INSERT_ROWS, PostgresLog


async def main() -> None:
    dsn, writer_s, tasks_s, count_s, max_batch_s = sys.argv[1:6]
    writer, tasks, count, max_batch = int(writer_s), int(tasks_s), int(count_s), int(max_batch_s)
    insert_rows = int(sys.argv[6]) if len(sys.argv) > 6 else INSERT_ROWS
    store = EventStore(PostgresLog(dsn, insert_rows=insert_rows))
    await store.connect()
    out = sys.stdout

    def fail(message: str) -> None:
        out.write(f"error {message}\n")
        out.flush()
        sys.exit(1)

    async def run(task: int) -> None:
        n = 0
        while count == 0 or n < count:
            size = 1 + n % max_batch
            texts = [f"w{writer}-t{task}-{n}-{i}/{size}" for i in range(size)]
            first = await store.append([MessageSaved(n, f"w{writer}", t) for t in texts])
            out.write(f"ack {writer} {task} {n} {first} {size}\n")
            out.flush()
            if store.position < first + size - 1:
                fail(f"applied through {store.position}, acked {first}+{size}")
            [event] = await store.log.fetch([first])
            if not isinstance(event, MessageSaved) or event.message != texts[0]:
                fail(f"position {first} holds {event!r}, not {texts[0]!r}")
            if n % 3 == 0:
                user = f"w{writer}t{task}"
                await store.save_user_stats(user, chat_lines=size, last_seen=n)
                await store.log_user_action(user, "append", str(first), timestamp=n)
                await store.update_channel_stats(max_users=n * 10 + writer, max_connected=n)
                await store.log_user_count(writer, task, timestamp=n)
            n += 1

    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go"
    await asyncio.gather(*(run(t) for t in range(tasks)))
    print("done", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await store.refresh()
    state = base64.b64encode(pickle.dumps(store.projections.state())).decode()
    print(f"state {store.position} {state}", flush=True)
    await store.close()


if __name__ == "__main__":
    asyncio.run(main())
