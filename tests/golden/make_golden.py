"""Write a golden store of the current format and events, with its expected reads.

Run once per format or event change, from the repository root:

    python tests/golden/make_golden.py v1

It writes tests/golden/<name>/store/ (segments, one of them compacted, and a
snapshot) and tests/golden/<name>/expected.json (what every read returns).
Since v4 the store is copied while its writer is still open (after a
snapshot), as a crash would leave it: the last segment then ends in the
zeros an "fsync" writer fills ahead of its writes.  Since v9 it also holds
the tail.index that the writer's close saved.  Since v10 the frames of its
compacted segments hold their events with holes (nil) between them
(segment flag bit 1).  Since v11 its snapshot is of format 2 (the checksum
covers the header too).  Since v12 it is of projection version 8, and holds
the tombstones of the forgotten user's action slots.
Committed golden stores are never rewritten: tests/test_golden.py opens each
of them with the current code and compares.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from eventstore import EventStore
from eventstore.tailindex import TAIL_INDEX

HERE = Path(__file__).parent


async def reads(store: EventStore) -> dict[str, Any]:
    return {
        "position": store.position,
        "users": await store.get_all_user_stats(),
        "user": await store.get_user_stats("alice"),
        "channel": await store.get_channel_stats(),
        "actions": await store.get_user_actions(limit=10_000),
        "actions_by_bob": await store.get_user_actions(username="bob", limit=10_000),
        "joins": await store.get_user_actions(action_type="join", limit=10_000),
        "counts": await store.get_user_count_history(),
        "messages": await store.get_recent_messages(limit=10_000),
    }


async def write(directory: Path, copy_to: Path) -> dict[str, Any]:
    t = 1_750_000_000
    clock = {"now": t}
    store = EventStore(
        directory, segment_size=2048, snapshot_every=None, clock=lambda: clock["now"]
    )
    await store.connect()
    users = ["alice", "bob", "carol", "dave", "eve"]
    for day in range(3):
        for i, user in enumerate(users):
            t += 60
            clock["now"] = t
            await store.save_user_stats(user, last_seen=t, session_start=t)
            await store.log_user_action(user, "join", timestamp=t)
            await store.update_channel_stats(
                max_users=day * 5 + i + 1, max_connected=i + 2, timestamp=t
            )
        for n in range(30):
            user = users[(n * 3 + day) % len(users)]
            t += 7
            clock["now"] = t
            await store.save_user_stats(user, chat_lines=1, last_seen=t)
            await store.save_message(
                user, f"day {day} line {n}: héllo \N{GRINNING FACE}\n", timestamp=t
            )
            if n % 10 == 0:
                await store.log_user_count(n, n + 2, timestamp=t)
        await store.log_user_action("bob", "pm", details="!stats", timestamp=t)
        for user in users[:3]:
            t += 30
            clock["now"] = t
            await store.end_session(user, timestamp=t)
            await store.log_user_action(user, "leave", timestamp=t)
        await store.clear_old_messages(40)
        if day == 1:
            # Since v7: details only eve used go with her (projection version 6).
            await store.log_user_action("eve", "pm", details="eve's own words", timestamp=t)
            await store.forget_user("eve", timestamp=t)
            await store.compact()
    await store.save_message("zero", "a message at time 0", timestamp=0)
    # Since v9: a clean close saves tail.index, and a second session writes
    # one-event frames after it, in a segment now allowed to grow past the
    # index's stride, so that the saved index has several entries.
    await store.close()
    store = EventStore(
        directory, segment_size=64 * 1024, snapshot_every=None, clock=lambda: clock["now"]
    )
    await store.connect()
    for n in range(150):
        t += 3
        await store.save_message(users[n % 4], f"after the close {n}", timestamp=t)
    expected = await reads(store)
    await store.write_snapshot()
    shutil.copytree(directory, copy_to)  # every acknowledged write is on disk
    await store.close()
    # The index this close saved names frames the copy holds: the copy is
    # what a crash of a later session would leave before it wrote anything.
    shutil.copy(directory / TAIL_INDEX, copy_to / TAIL_INDEX)
    return expected


def main() -> None:
    name = sys.argv[1]
    target = HERE / name
    if target.exists():
        sys.exit(f"{target} exists: golden stores are never rewritten")
    with tempfile.TemporaryDirectory() as tmp:
        expected = asyncio.run(write(Path(tmp) / "store", target / "store"))
    lock = target / "store" / "LOCK"
    if lock.exists():
        lock.unlink()
    (target / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
