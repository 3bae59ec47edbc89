"""EventStore on a directory against the SQLite baseline, call for call.

Long random sequences of adapter calls go to three stores: an EventStore in
a directory, an EventStore in memory and ``bench.sqlite_adapter.SqliteAdapter``.
After every step every read method must agree (ids compared through a
mapping that must never change: the two id schemes differ, their order may
not).  In between, at random, whatever rebuilds state: reconnects, reopens
with other options and with the snapshots deleted, compaction (with
retention), forget_user, read-only followers (stale and refreshed), an
export to a legacy file that the baseline then reads, imports of that file
and of the baseline's own file, replay to a position or a moment, and
bursts of concurrent writes with a compaction and follower refreshes among
them.  After a compaction no name that every read has forgotten may be left
in any file.

tests/test_property.py checks EventStore against a model; this checks it
against another implementation, with edge values (None, 0 and 2**63 - 1
timestamps and counts, names differing by case or normalisation, NUL,
empty and 1 MiB strings, many users, many equal timestamps) and the
rebuild paths the model does not have.  Deterministic: fixed seeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiosqlite")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sqlite_adapter import SqliteAdapter
from eventstore import EventStore, ValidationError
from eventstore.events import MessageSaved, UserActionLogged
from eventstore.legacy import export_sqlite, import_sqlite
from eventstore.replay import ReplayResult, replay
from eventstore.testing import FakeClock

MAX = 2**63 - 1
NAMES = [
    "alice", "Alice", "ALICE", "\u00e9", "e\u0301", "\u00c5", "A\u030a", "\u212b",
    "stra\u00dfe", "STRASSE", "\U0001f600", "a\x00b", " ", "x\ny", "\u0130", "i\u0307",
]  # fmt: skip
KINDS = ["join", "leave", "pm", "Join", "x" * 80]
TEXTS = ["", "hi", "h\u00e9llo", "\U0001f600" * 3, "a\x00b", "line\nline", "y" * 100]
Reads = dict[str, Any]


class Mismatch(AssertionError):
    pass


def _strip(rows: Any) -> Any:
    if isinstance(rows, list):
        return [{k: v for k, v in r.items() if k != "id"} for r in rows]
    return rows


async def _full(store: Any) -> Reads:
    return {
        "users": await store.get_all_user_stats(),
        "channel": await store.get_channel_stats(),
        "actions": await store.get_user_actions(limit=MAX),
        "counts": await store.get_user_count_history(),
        "messages": await store.get_recent_messages(limit=MAX),
    }


async def _replayed(past: ReplayResult) -> Reads:
    proj = past.projections
    actions = proj.actions.positions(None, None, MAX, 0)
    messages = proj.messages.positions(MAX, 0)
    return {
        "users": proj.user_stats.all(None, 0),
        "channel": proj.channel.get(),
        "actions": [
            {"timestamp": e.timestamp, "username": e.username}
            | {"action_type": e.action_type, "details": e.details}
            for e in await past.log.fetch(actions)
            if isinstance(e, UserActionLogged)
        ],
        "counts": proj.counts.history(None, None, None),
        "messages": [
            {"timestamp": e.timestamp, "username": e.username, "message": e.message}
            for e in await past.log.fetch(messages)
            if isinstance(e, MessageSaved)
        ],
    }


class Run:
    def __init__(self, seed: int, tmp: Path, *, monotone: bool) -> None:
        self.rng = random.Random(seed)
        self.tmp = tmp
        self.dir = tmp / "store"
        self.mono = monotone  # event times never go back: replay --at is exact
        self.clock = FakeClock(1_000)
        self.secrets = [f"secret{i:03d}x" for i in range(4)]
        self.names = NAMES + self.secrets + [f"user{i}" for i in range(self.rng.randint(0, 150))]
        self.ids: dict[str, dict[int, int]] = {"a": {}, "c": {}, "m": {}}
        self.at_position: dict[int, Reads] = {}
        self.at_time: dict[int, Reads] = {}
        self.follower: EventStore | None = None
        self.follower_reads: Reads = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] | None = None
        self.durability: Any = self.rng.choice(["flush", "fsync"])
        self.options: dict[str, Any] = {}
        self.imports = 0

    def new_store(self) -> EventStore:
        self.options = {
            "snapshot_every": self.rng.choice([None, 1, 3, 50]),
            "segment_size": self.rng.choice([1024, 4096, 65536]),
        }
        return EventStore(self.dir, clock=self.clock, durability=self.durability, **self.options)

    # -- values ---------------------------------------------------------------
    def ts(self, event: bool = True) -> int | None:
        r = self.rng.random()
        if (event and self.mono) or r < 0.3:
            return None
        if r < 0.4:
            return 0
        if r < 0.5:
            return MAX - self.rng.randint(0, 3)
        return 1_000 if r < 0.6 else self.rng.randint(0, 2_000)

    def count(self) -> int | None:
        r = self.rng.random()
        if r < 0.35:
            return None
        if r < 0.45:
            return 0
        if r < 0.5:
            return MAX - self.rng.randint(0, 2)
        return MAX // 2 if r < 0.55 else self.rng.randint(0, 100)

    def session(self) -> int | None:
        if self.rng.random() < 0.5:
            return None
        if self.mono:  # a session that started by now
            return self.rng.randint(max(0, self.clock.now - 50), self.clock.now)
        return self.ts(event=False)

    def limit(self, optional: bool) -> int | None:
        r = self.rng.random()
        if optional and r < 0.3:
            return None
        return 0 if r < 0.4 else MAX if r < 0.5 else self.rng.randint(0, 12)

    def offset(self) -> int:
        r = self.rng.random()
        return 0 if r < 0.5 else MAX if r < 0.6 else self.rng.randint(0, 15)

    def text(self) -> str:
        if self.rng.random() < 0.01:
            return "\U0001f600" * 2**18  # 1 MiB of UTF-8, the most allowed
        return self.rng.choice(TEXTS)

    # -- calls to every store ---------------------------------------------------
    async def both(self, op: str, *args: Any) -> Any:
        if self.calls is not None:
            self.calls.append((op, args))
            return None
        got = []
        for store in (self.es, self.mem, self.sq):
            try:
                got.append(("ok", await getattr(store, op)(*args)))
            except ValidationError as err:
                got.append(("ValidationError", str(err).split(":")[0]))
        if not got[0] == got[1] == got[2]:
            raise Mismatch(f"{op}{args}: disk {got[0]}, memory {got[1]}, sqlite {got[2]}")
        return got[0][1]

    async def compare(self, a: Any, b: Any, what: str, ids: str = "map") -> None:
        """Every read of ``a`` against ``b``; ids: "map", "equal" or "ignore"."""
        rng = self.rng
        checks: list[tuple[str, str | None, tuple[Any, ...]]] = [
            ("get_user_stats", None, (n,)) for n in [*rng.sample(self.names, 5), "nobody"]
        ]
        checks += [
            ("get_all_user_stats", None, ()),
            ("get_all_user_stats", None, (self.limit(True), self.offset())),
            ("get_channel_stats", None, ()),
            ("get_user_actions", "a", (None, None, MAX)),
            ("get_user_count_history", "c", ()),
            ("get_user_count_history", "c", (self.ts(False), self.ts(False), self.limit(True))),
            ("get_recent_messages", "m", (MAX,)),
            ("get_recent_messages", "m", (self.limit(False), self.offset())),
        ]
        for _ in range(3):
            user = rng.choice(self.names) if rng.random() < 0.5 else None
            kind = rng.choice(KINDS) if rng.random() < 0.4 else None
            checks.append(("get_user_actions", "a", (user, kind, self.limit(False), self.offset())))
        for op, kind, args in checks:
            got, want = await getattr(a, op)(*args), await getattr(b, op)(*args)
            if (got if kind is None or ids == "equal" else _strip(got)) != (
                want if kind is None or ids == "equal" else _strip(want)
            ):
                raise Mismatch(f"{what}: {op}{args}:\n  {got}\n  {want}")
            if kind is not None and ids == "map":
                seen = self.ids[kind]
                for row, other in zip(got, want, strict=True):
                    if seen.setdefault(row["id"], other["id"]) != other["id"]:
                        raise Mismatch(f"{what}: id {row['id']} was {seen[row['id']]} in sqlite")

    # -- steps ------------------------------------------------------------------
    async def write(self) -> None:
        rng = self.rng
        name = rng.choice(self.names)
        op = rng.choices(
            ["stats", "end", "action", "peak", "count", "msg", "clear", "forget", "tick", "bad"],
            [25, 6, 12, 6, 8, 15, 3, 2, 8, 2],
        )[0]
        if op == "stats":
            await self.both(
                "save_user_stats",
                name,
                self.ts(False),
                self.ts(),
                self.count(),
                self.count(),
                self.session(),
            )
        elif op == "end":
            await self.both("end_session", name, self.ts())
        elif op == "action":
            details = None if rng.random() < 0.3 else self.text()
            await self.both("log_user_action", name, rng.choice(KINDS), details, self.ts())
        elif op == "peak":
            await self.both("update_channel_stats", self.count(), self.count(), self.ts())
        elif op == "count":
            await self.both("log_user_count", rng.randint(0, 50), self.count() or 0, self.ts())
        elif op == "msg":
            await self.both("save_message", name, self.text(), self.ts())
        elif op == "clear":
            await self.both("clear_old_messages", rng.choice([0, 1, 2, 5, 20, MAX]))
        elif op == "forget":
            if await self.both("forget_user", name, self.ts()) and name in self.secrets:
                await self.no_name_left([name])  # (no other name holds a secret's)
            self.compacted()
        elif op == "tick":
            if self.mono:
                self.clock.set(min(MAX, self.clock.now + rng.choice([0, 1, 1, 2, 100])))
            else:
                self.clock.set(rng.choice([rng.randint(0, 3_000), MAX - rng.randint(0, 5), 1_000]))
        else:
            await self.both(
                *rng.choice(
                    [
                        ("save_user_stats", ""),
                        ("save_user_stats", "alice", None, None, -1),
                        ("log_user_action", "alice", ""),
                        ("save_message", "alice", "\ud800"),
                        ("log_user_count", 1, 1, 2**63),
                        ("clear_old_messages", -1),
                        ("get_recent_messages", -1),
                        ("end_session", "alice", 1.0),
                    ]
                )
            )

    def compacted(self) -> None:
        # Replay before a compaction shows only what it kept: compare after it.
        self.at_position.clear()
        self.at_time.clear()

    async def no_name_left(self, names: list[str]) -> None:
        await self.es.log.flush()
        files = {}
        for path in self.dir.rglob("*"):
            # (A periodic snapshot's temporary file may go meanwhile.)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                files[path.name] = path.read_bytes()
        for name in names:
            for file, data in files.items():
                if name.encode() in data:
                    raise Mismatch(f"{name!r} is gone from every read but {file} holds it")

    async def compact(self) -> None:
        if self.rng.random() < 0.3:
            days = self.rng.choice([0, 1, 10**6])
            before = self.es.position
            await self.es.compact(keep_history_days=days)
            # The retention decision, by hand elsewhere.
            await self.mem.append([ev async for _, ev in self.es.read(before + 1)])
            db = self.sq._conn()
            cut = max(0, self.clock.now - days * 86_400)
            await db.execute("DELETE FROM user_count_history WHERE timestamp < ?", (cut,))
            await db.commit()
        else:
            await self.es.compact()
        self.compacted()
        await self.no_name_left([n for n in self.secrets if not self.es.knows_user(n)])

    async def rebuild(self) -> None:
        rng = self.rng
        op = rng.choice(["reconnect", "reopen", "compact", "follower", "export", "replay", "base"])
        if op == "reconnect":
            await self.es.close()
            await self.es.connect()
        elif op == "reopen":
            await self.es.close()
            if rng.random() < 0.3:
                for snap in self.dir.glob("*.snap"):
                    snap.unlink()
            self.es = self.new_store()
            await self.es.connect()
        elif op == "compact":
            await self.compact()
        elif op == "follower":
            if self.follower is None or rng.random() < 0.3:
                if self.follower is not None:
                    await self.follower.close()
                self.follower = EventStore(self.dir, read_only=True)
                await self.follower.connect()
            else:
                await self.follower.refresh()
            await self.check_follower("follower")
        elif op == "export":
            self.imports += 1
            out = self.tmp / f"export{self.imports}.db"
            await export_sqlite(self.es, out)
            exported = SqliteAdapter(out, synchronous="NORMAL", clock=self.clock)
            async with exported:
                await self.compare(self.es, exported, "the exported file", ids="equal")
            await self.check_import(out)
        elif op == "base":
            await self.check_import(self.tmp / "base.db")
        else:
            await self.check_replay()

    async def check_follower(self, what: str) -> None:
        assert self.follower is not None
        self.follower_reads = await _full(self.follower)
        if self.follower.position != self.es.position:
            raise Mismatch(f"{what} at {self.follower.position}, writer at {self.es.position}")
        await self.compare(self.follower, self.es, what, ids="equal")

    async def check_import(self, legacy: Path) -> None:
        self.imports += 1
        fresh = EventStore(self.tmp / f"import{self.imports}", durability="none")
        async with fresh:
            await import_sqlite(fresh, legacy)
            await self.compare(fresh, self.sq, f"an import of {legacy.name}", ids="ignore")
            await fresh.close()
            await fresh.connect()
            await self.compare(
                fresh, self.sq, f"an import of {legacy.name}, reopened", ids="ignore"
            )

    async def check_replay(self) -> None:
        if self.at_position:
            pos = self.rng.choice(list(self.at_position))
            async with await replay(self.dir, until=pos) as past:
                got = await _replayed(past)
            self.same_history(got, self.at_position[pos], f"replay until={pos}")
        past_times = [t for t in self.at_time if t < self.clock.now]
        if past_times:
            t = self.rng.choice(past_times)
            async with await replay(self.dir, at=t) as past:
                got = await _replayed(past)
            self.same_history(got, self.at_time[t], f"replay at={t}")

    def same_history(self, got: Reads, want: Reads, what: str) -> None:
        for key, rows in want.items():
            if _strip(got[key]) != _strip(rows):
                raise Mismatch(f"{what}: {key}:\n  {got[key]}\n  {rows}")

    async def burst(self) -> None:
        """Writes from many tasks at once, maybe a compaction and follower refreshes
        among them: applied in call order, as the baseline does one by one."""
        self.calls = []
        try:
            for _ in range(self.rng.randint(2, 12)):
                await self.write()
        finally:
            calls, self.calls = self.calls, None
        compact = [self.es.compact()] if self.rng.random() < 0.3 else []
        refresh = [self.follower.refresh() for _ in range(2)] if self.follower else []
        got = await asyncio.gather(
            *(getattr(self.es, op)(*args) for op, args in calls),
            *compact,
            *refresh,
            return_exceptions=True,
        )
        for result in got[len(calls) :]:
            if isinstance(result, BaseException):
                raise result
        for (op, args), result in zip(calls, got, strict=False):
            want: Any
            with contextlib.suppress(ValidationError):
                await getattr(self.mem, op)(*args)
            try:
                want = await getattr(self.sq, op)(*args)
            except ValidationError as err:
                want = err
            if isinstance(result, ValidationError) and isinstance(want, ValidationError):
                continue
            if result != want:
                raise Mismatch(f"burst {calls}: {op}{args}: {result!r}, sqlite {want!r}")
        self.compacted()
        if self.follower is not None:
            await self.follower.refresh()
            await self.check_follower("follower after a burst")

    async def run(self, steps: int) -> None:
        self.es = self.new_store()
        self.mem = EventStore(":memory:", clock=self.clock)
        self.sq = SqliteAdapter(self.tmp / "base.db", synchronous="NORMAL", clock=self.clock)
        for store in (self.es, self.mem, self.sq):
            await store.connect()
        try:
            for step in range(steps):
                r = self.rng.random()
                await (self.burst() if r < 0.04 else self.rebuild() if r < 0.15 else self.write())
                await self.compare(self.es, self.sq, f"step {step}")
                await self.compare(self.mem, self.es, f"step {step}: memory", ids="equal")
                stale = self.follower is not None and self.rng.random() < 0.2
                if stale and await _full(self.follower) != self.follower_reads:
                    raise Mismatch(f"step {step}: a follower's reads changed without refresh")
                if self.rng.random() < 0.3:
                    self.at_position[self.es.position] = await _full(self.sq)
                if self.mono:
                    self.at_time[self.clock.now] = await _full(self.sq)
        finally:
            for store in (self.follower, self.es, self.mem, self.sq):
                if store is not None:
                    await store.close()


@pytest.mark.parametrize(
    ("seed", "monotone"), [(1, False), (2, False), (3, True), (4, True)], ids=str
)
async def test_eventstore_reads_as_the_sqlite_baseline(
    tmp_path: Path, seed: int, monotone: bool
) -> None:
    await Run(seed, tmp_path, monotone=monotone).run(250)
