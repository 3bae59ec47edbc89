"""A simulated busy channel, played through the adapter: ``eventstore demo``.

:func:`play` drives a store exactly as the bot does, with simulated time:
viewers join (an action and a session) and leave (an action and
``end_session``), chat (``save_user_stats(chat_lines=1, last_seen=t)`` and
``save_message``), send the bot private commands, and every five simulated
minutes the bot logs how many are in chat and connected and raises the
channel's peaks.  When the simulation ends the bot "shuts down" and closes
every open session.

It is seeded, so a given seed always plays the same channel; it is fast
because every write carries its simulated timestamp and nothing sleeps.
Playing into a store that already holds events continues after its latest
moment, so a second run appends a later stretch of the same channel.  Only
a store the demo filled is continued: one that knows users the demo does
not play is refused, so that a slip of the directory cannot write made-up
chat into the bot's own store.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from projections.user_stats import LAST

from .errors import ValidationError
from .store import EventStore

__all__ = ["MAX_MINUTES", "DemoSummary", "check_demo_store", "play"]

#: The longest demo: a year of simulated minutes (about seven million events,
#: some minutes to write), which also keeps its timestamps after 1970.
MAX_MINUTES = 365 * 24 * 60
#: Seconds between two user-count samples (the bot's five-minute timer).
SAMPLE_EVERY = 5 * 60

VIEWERS = (
    "ada", "basil", "cleo", "dmitri", "esme", "farid", "greta", "hiro", "ines", "jonas",
    "kemal", "lena", "mateo", "nadia", "oskar", "priya", "quentin", "rosa", "sven", "tala",
    "ugo", "vera", "wen", "xavi", "yusuf", "zora", "amara", "bram", "chidi", "dagny",
    "elif", "finn", "gio", "hana", "ivo", "juno", "kai", "lior", "mira", "noor",
)  # fmt: skip

LINES = (
    "hi all", "hello!", "what game is this?", "lol", "nice play", "gg", "brb",
    "back", "that was close", "which map is next?", "first time here, love the stream",
    "can you explain that build?", "haha", "no way", "clip it!", "how long is the stream today?",
    "the music is great", "F", "lets gooo", "poll when?", "good morning from Lisbon",
    "good evening from Osaka", "this chat is fast today", "o7", "is the bot working?",
)  # fmt: skip

COMMANDS = ("!stats", "!seen ada", "!top", "!uptime", "!peak", "!help")


@dataclass
class DemoSummary:
    """What one :func:`play` did."""

    seed: int
    minutes: int
    #: Simulated start and end (Unix seconds).
    start: int
    end: int
    #: The store's position before and after (the first event played is at
    #: ``position_before + 1``).
    position_before: int
    last_position: int
    joins: int = 0
    leaves: int = 0
    chat_lines: int = 0
    pm_commands: int = 0
    samples: int = 0
    peaks_raised: int = 0
    viewers: set[str] = field(default_factory=set)

    @property
    def events(self) -> int:
        return self.last_position - self.position_before


async def play(
    store: EventStore,
    *,
    minutes: int = 120,
    seed: int | None = None,
    start: int | None = None,
) -> DemoSummary:
    """Play ``minutes`` of a busy channel into the connected ``store``.

    ``seed`` picks the channel (by default the store's position, so each run
    into the same store plays a different stretch, and a fresh store always
    the same one).  ``start`` is the simulated start (Unix seconds); by
    default the last ``minutes`` before now, or just after the latest moment
    already in the store if that is later, so that runs append in time order.

    Raises :class:`~eventstore.errors.ValidationError`, writing nothing, if
    the store knows users who are not the demo's viewers: it is not a demo
    store.

    Example::

        async with EventStore("data/demo", durability="flush") as store:
            summary = await play(store, minutes=120, seed=1)
            print(summary.chat_lines, await store.get_channel_stats())
    """
    if type(minutes) is not int or not 1 <= minutes <= MAX_MINUTES:
        raise ValueError(f"minutes must be an int from 1 to {MAX_MINUTES}, got {minutes!r}")
    check_demo_store(store)
    if start is None:
        start = max(int(time.time()) - minutes * 60, _latest(store) + 60)
    if seed is None:
        seed = store.position
    rng = random.Random(seed)
    summary = DemoSummary(seed, minutes, start, start + minutes * 60, store.position, 0)
    online: list[str] = []
    away = list(VIEWERS)
    rng.shuffle(away)
    # Each viewer talks at their own rate: a few chatterboxes, many lurkers.
    chattiness = {name: rng.lognormvariate(0, 0.8) for name in VIEWERS}

    async def join(name: str, t: int) -> None:
        away.remove(name)
        online.append(name)
        await store.log_user_action(name, "join", timestamp=t)
        await store.save_user_stats(name, first_seen=t, last_seen=t, session_start=t)
        summary.joins += 1
        summary.viewers.add(name)

    async def leave(name: str, t: int) -> None:
        online.remove(name)
        away.append(name)
        await store.log_user_action(name, "leave", timestamp=t)
        await store.end_session(name, t)
        summary.leaves += 1

    # The audience grows for the first hour or so, then drifts.  Within a
    # minute: a few leave, those still here chat, newcomers arrive (and
    # first speak the minute after), so every user's times stay in order.
    for minute in range(minutes):
        base = start + minute * 60
        if online and rng.random() < 0.3:
            await leave(rng.choice(online), base + rng.randrange(10))
        if online:
            weights = [chattiness[n] for n in online]
            talkers = rng.choices(online, weights, k=rng.randint(2, 9))
            seconds = sorted(rng.sample(range(10, 60), len(talkers)))
            for second, name in zip(seconds, talkers, strict=True):
                t = base + second
                await store.save_user_stats(name, chat_lines=1, last_seen=t)
                await store.save_message(name, rng.choice(LINES), timestamp=t)
                summary.chat_lines += 1
            if rng.random() < 0.15:
                await store.log_user_action(
                    rng.choice(online),
                    "pm_command",
                    details=rng.choice(COMMANDS),
                    timestamp=base + 30,
                )
                summary.pm_commands += 1
        target = min(len(VIEWERS), 8 + minute // 3 + rng.randint(-2, 2))
        while len(online) < target and away:
            await join(rng.choice(away), base + 10 + rng.randrange(50))
        if minute % (SAMPLE_EVERY // 60) == 0:
            t = base + 59
            chat_users = len(online)
            connected = chat_users + rng.randint(chat_users // 2, chat_users * 2)
            await store.log_user_count(chat_users, connected, timestamp=t)
            before = store.projections.channel.last_updated
            await store.update_channel_stats(
                max_users=chat_users, max_connected=connected, timestamp=t
            )
            if store.projections.channel.last_updated != before:
                summary.peaks_raised += 1
            summary.samples += 1
    end = summary.end
    for name in list(online):
        await leave(name, end)
    summary.last_position = store.position
    return summary


def check_demo_store(store: EventStore) -> None:
    """Raise ValidationError if ``store`` knows users who are not the demo's viewers."""
    proj = store.projections
    known = set(proj.user_stats.users)
    known.update(proj.messages.users.codes)
    known.update(proj.actions.users.codes)
    strangers = sorted(known.difference(VIEWERS))
    if strangers:
        shown = ", ".join(repr(name) for name in strangers[:3])
        raise ValidationError(
            f"the store is not a demo store: it knows users the demo does not play "
            f"({shown}{', ...' if len(strangers) > 3 else ''}); the demo writes only into an "
            "empty store or one it filled; nothing written"
        )


def _latest(store: EventStore) -> int:
    """The latest moment the store's read models know of (0 if none)."""
    proj = store.projections
    latest = [0]
    latest.extend(rec[LAST] for rec in proj.user_stats.users.values())
    for index in (proj.counts.index, proj.messages.index, proj.actions.all):
        if len(index):
            latest.append(index.ts[-1])
    if proj.channel.last_updated is not None:
        latest.append(proj.channel.last_updated)
    return max(latest)
