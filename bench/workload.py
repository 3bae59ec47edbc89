"""A busy channel: a deterministic, seeded workload for the benchmarks.

Per simulated day, on average: 20,000 chat lines, 1,500 joins and as many
leaves, a user count every 5 minutes and about 100 PM commands, from a
population of 5,000 users of whom about 150 are in the channel at a time.
That is about 46,000 events a day.

* :func:`operations` yields the adapter calls ``(method_name, args, kwargs)``
  in time order; :func:`apply` makes them on any adapter.
* :func:`events` yields exactly the events :class:`~eventstore.EventStore`
  appends for those calls when its clock follows the simulation (``apply``
  with ``clock=``), without going through an adapter: that is how the 1M- and
  10M-event stores of the benchmarks are generated.

Both count only writes that produce an event (a ``update_channel_stats`` that
raises no peak does not) and stop exactly at ``n_events``.

Command (prints what was generated and how fast)::

    python -m bench.workload 1000000 --seed 0
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from eventstore.events import (
    ChannelPeakRaised,
    Event,
    MessageSaved,
    SessionEnded,
    UserActionLogged,
    UserCountLogged,
    UserStatsSaved,
)

__all__ = ["START", "Op", "SimClock", "apply", "events", "op_time", "operations"]

#: 2023-11-14 22:13:20 UTC, the default first second of the simulation.
START = 1_700_000_000

DAY = 86_400  # seconds
CHAT_LINES_PER_DAY = 20_000
JOINS_PER_DAY = 1_500  # and as many leaves
PMS_PER_DAY = 100
COUNT_INTERVAL = 300  # seconds between user counts
POPULATION = 5_000  # distinct usernames
TARGET_PRESENT = 150  # users in the channel the joins and leaves revolve around
MESSAGE_POOL = 4_096  # distinct chat lines, drawn at random

#: One adapter call: (method name, positional args, keyword args).
Op = tuple[str, tuple[Any, ...], dict[str, Any]]

# Simulation records, one per happening; the first item says which.
_CHAT, _JOIN, _LEAVE, _COUNT, _PM = range(5)

_SYLLABLES = [c + v for c in "bdfgkmnprstvz" for v in "aeiou"] + ["an", "el", "ix", "or", "ul"]
# Split at import rather than spelled out as a list: a hundred one-word lines.
_VOCABULARY = """
the a an and or but so yes no maybe lol lmao ok okay hi hello hey bye gn gm
what why how when where who this that it is was be are were song video next
skip play vote good bad great nice cool wow omg really true false same here
there now later today tonight tomorrow again never always please thanks ty np
i you we they he she me us them my your our their love hate like want need
know think see watch listen music movie stream chat bot stats queue playlist
🎉 😀 👍 ❤️ café naïve über
"""
_WORDS = _VOCABULARY.split()


def _usernames(rng: random.Random) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < POPULATION:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
        if rng.random() < 0.3:
            name += str(rng.randrange(100))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _messages(rng: random.Random) -> list[str]:
    lines = []
    for _ in range(MESSAGE_POOL):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(1, 16))]
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] if rng.random() < 0.3 else line)
    return lines


def _simulate(seed: int, start: int) -> Iterator[tuple[Any, ...]]:
    """The channel, for ever, as records in time order.

    ``(_CHAT, t, user, text)``, ``(_JOIN, t, user, users, connected,
    raised_users, raised_connected)`` (``raised_*`` None unless a peak
    rises), ``(_LEAVE, t, user, seconds)``, ``(_COUNT, t, chat, connected)``,
    ``(_PM, t, user)``.  The one source of randomness for both
    :func:`operations` and :func:`events`, so the two cannot disagree.
    """
    rng = random.Random(seed)
    names = _usernames(rng)
    texts = _messages(rng)
    present: list[str] = []  # who is in the channel; swap-remove on leave
    where: dict[str, int] = {}  # name -> index in present
    session: dict[str, int] = {}  # name -> join time
    guests = 0  # anonymous connections: counted as connected, not in chat
    peak_users = peak_connected = 0

    chat_w = CHAT_LINES_PER_DAY
    move_w = chat_w + 2 * JOINS_PER_DAY
    total_w = move_w + PMS_PER_DAY
    rate = total_w / DAY  # happenings per second, apart from the counts
    now = 0.0
    next_count = COUNT_INTERVAL
    rand, expo, bits = rng.random, rng.expovariate, rng.getrandbits
    text_bits = MESSAGE_POOL.bit_length() - 1

    while True:
        now += expo(rate)
        while next_count <= now:
            guests = len(present) // 4 + int(rand() * 10)
            yield _COUNT, start + next_count, len(present), len(present) + guests
            next_count += COUNT_INTERVAL
        t = start + int(now)
        u = rand() * total_w
        n = len(present)
        if u < chat_w and n:
            yield _CHAT, t, present[int(rand() * n)], texts[bits(text_bits)]
        elif u < move_w or not n:
            # Joins and leaves revert to TARGET_PRESENT: at n = TARGET half
            # of the moves are joins, with more users in, more are leaves.
            if not n or rand() * (TARGET_PRESENT + n) < TARGET_PRESENT:
                user = names[int(rand() * POPULATION)]
                while user in where:
                    user = names[int(rand() * POPULATION)]
                where[user] = n
                present.append(user)
                session[user] = t
                users, connected = n + 1, n + 1 + guests
                raised_u = users if users > peak_users else None
                raised_c = connected if connected > peak_connected else None
                peak_users = max(peak_users, users)
                peak_connected = max(peak_connected, connected)
                yield _JOIN, t, user, users, connected, raised_u, raised_c
            else:
                i = int(rand() * n)
                user = present[i]
                last = present.pop()
                if last != user:
                    present[i] = last
                    where[last] = i
                del where[user]
                yield _LEAVE, t, user, max(0, t - session.pop(user))
        else:
            who = present[int(rand() * n)] if n else names[int(rand() * POPULATION)]
            yield _PM, t, who


def operations(n_events: int, seed: int = 0, start: int = START) -> Iterator[Op]:
    """The adapter calls of a busy channel, up to the one making event ``n_events``.

    Every call carries its time (``timestamp=`` or, for ``save_user_stats``,
    ``last_seen=``; see :func:`op_time`).
    """
    left = n_events
    if left <= 0:
        return
    for rec in _simulate(seed, start):
        kind, t = rec[0], rec[1]
        ops: list[tuple[Op, bool]]  # (call, makes an event)
        if kind == _CHAT:
            user = rec[2]
            ops = [
                (("save_user_stats", (user,), {"chat_lines": 1, "last_seen": t}), True),
                (("save_message", (user, rec[3]), {"timestamp": t}), True),
            ]
        elif kind == _JOIN:
            user = rec[2]
            ops = [
                (("save_user_stats", (user,), {"last_seen": t, "session_start": t}), True),
                (("log_user_action", (user, "join"), {"timestamp": t}), True),
                (
                    (
                        "update_channel_stats",
                        (),
                        {"max_users": rec[3], "max_connected": rec[4], "timestamp": t},
                    ),
                    rec[5] is not None or rec[6] is not None,
                ),
            ]
        elif kind == _LEAVE:
            user = rec[2]
            ops = [
                (("end_session", (user,), {"timestamp": t}), True),
                (("log_user_action", (user, "leave"), {"timestamp": t}), True),
            ]
        elif kind == _COUNT:
            ops = [(("log_user_count", (rec[2], rec[3]), {"timestamp": t}), True)]
        else:
            ops = [
                (("log_user_action", (rec[2], "pm"), {"details": "!stats", "timestamp": t}), True)
            ]
        for op, makes_event in ops:
            yield op
            if makes_event:
                left -= 1
                if not left:
                    return


def events(n_events: int, seed: int = 0, start: int = START) -> Iterator[Event]:
    """Exactly the ``n_events`` events an EventStore appends for :func:`operations`.

    As if its clock read the simulated time of each call (what
    ``apply(store, operations(...), clock=...)`` arranges): a user's ``now``
    in ``UserStatsSaved`` is the time of the call.
    """
    left = n_events
    if left <= 0:
        return
    for rec in _simulate(seed, start):
        kind, t = rec[0], rec[1]
        batch: tuple[Event, ...]
        if kind == _CHAT:
            user = rec[2]
            batch = (UserStatsSaved(user, t, None, t, 1), MessageSaved(t, user, rec[3]))
        elif kind == _JOIN:
            user = rec[2]
            stats = UserStatsSaved(user, t, None, t, 0, 0, t)
            join = UserActionLogged(t, user, "join")
            if rec[5] is None and rec[6] is None:
                batch = (stats, join)
            else:
                batch = (stats, join, ChannelPeakRaised(t, rec[5], rec[6]))
        elif kind == _LEAVE:
            user = rec[2]
            batch = (SessionEnded(user, t, rec[3]), UserActionLogged(t, user, "leave"))
        elif kind == _COUNT:
            batch = (UserCountLogged(t, rec[2], rec[3]),)
        else:
            batch = (UserActionLogged(t, rec[2], "pm", "!stats"),)
        if len(batch) < left:
            yield from batch
            left -= len(batch)
        else:
            yield from batch[:left]
            return


def op_time(op: Op) -> int:
    """The simulated time of a call from :func:`operations`."""
    kwargs = op[2]
    return int(kwargs["timestamp"] if "timestamp" in kwargs else kwargs["last_seen"])


class Settable(Protocol):
    now: int


class SimClock:
    """A clock that reads whatever time it was last set to (see :func:`apply`)."""

    __slots__ = ("now",)

    def __init__(self, now: int = START) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


async def apply(adapter: Any, ops: Iterable[Op], *, clock: Settable | None = None) -> int:
    """Make the calls ``ops`` on ``adapter``, in order; return how many were made.

    ``end_session`` is skipped on an adapter without it.  With ``clock`` (the
    adapter's clock: a :class:`SimClock` or the test kit's ``FakeClock``)
    its ``now`` is set to each call's time first, so "now" follows the
    simulation.
    """
    methods: dict[str, Any] = {}
    made = 0
    for op in ops:
        name, args, kwargs = op
        method = methods.get(name)
        if method is None:
            method = methods[name] = getattr(adapter, name, None)
        if method is None:
            if name == "end_session":
                continue
            raise AttributeError(f"{type(adapter).__name__} has no method {name}")
        if clock is not None:
            clock.now = op_time(op)
        await method(*args, **kwargs)
        made += 1
    return made


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n_events", type=int, help="events to generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=START, help="first simulated second")
    args = parser.parse_args()
    began = time.perf_counter()
    kinds: Counter[str] = Counter()
    first = last = args.start
    for i, event in enumerate(events(args.n_events, args.seed, args.start)):
        kinds[type(event).__name__] += 1
        ts = getattr(event, "timestamp", None) or getattr(event, "now", None)
        if ts is not None:
            last = ts
            if i == 0:
                first = ts
    took = time.perf_counter() - began
    total = sum(kinds.values())
    print(f"{total} events in {took:.1f} s ({total / took:,.0f}/s)")
    print(f"simulated {(last - first) / DAY:.1f} days")
    for name, n in kinds.most_common():
        print(f"  {name:20} {n}")


if __name__ == "__main__":
    _main()
