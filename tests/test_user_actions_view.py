"""A user's actions are answered from memory; long details still come back exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventstore import EventStore
from eventstore.events import UserActionLogged, UserForgotten
from projections.sorted_index import SortedIndex, find_all, find_any
from projections.user_actions import (
    DETAILS_IN_LOG,
    DETAILS_NONE,
    GONE,
    GONE_SHARE,
    UserActionsProjection,
)


@pytest.mark.parametrize("where", ["memory", "disk"])
async def test_user_actions_with_short_long_and_no_details(tmp_path: Path, where: str) -> None:
    path = ":memory:" if where == "memory" else tmp_path / "s"
    store = EventStore(path, segment_size=4096)
    long = "x" * 65 + "\N{GRINNING FACE}\n\0"
    async with store:
        for i in range(60):
            await store.log_user_action("alice", "pm", details="!stats", timestamp=i)
            await store.log_user_action("alice", "join", details=None, timestamp=i)
            await store.log_user_action("alice", "pm", details=f"{long}{i}", timestamp=i)
            await store.log_user_action("bob", "pm", details="!stats", timestamp=i)
        rows = store.projections.actions.user_rows("alice", None, 10**6, 0)
        codes = {code for _, _, _, code in rows}
        assert DETAILS_NONE in codes and DETAILS_IN_LOG in codes and 0 in codes
        expected = await store.get_user_actions(username="alice", limit=1000)
        # The same rows as the log holds, through the unfiltered (log) path.
        from_log = [r for r in await store.get_user_actions(limit=1000) if r["username"] == "alice"]
        assert expected == from_log
        assert expected[0]["details"] == f"{long}59"
        pms = await store.get_user_actions(username="alice", action_type="pm", limit=3, offset=1)
        assert [r["details"] for r in pms] == ["!stats", f"{long}58", "!stats"]
        if where == "memory":
            return
    async with EventStore(tmp_path / "s", segment_size=4096) as again:  # from the snapshot
        assert await again.get_user_actions(username="alice", limit=1000) == expected


def _action(ts: int, user: str, kind: str = "join", details: str | None = None) -> Any:
    return UserActionLogged(ts, user, kind, details)


def _newest(proj: UserActionsProjection, user: str | None, kind: str | None) -> list[int]:
    return proj.positions(user, kind, 1000, 0)


def test_chains_follow_back_dated_rows_forgotten_users_and_newcomers() -> None:
    proj = UserActionsProjection()
    rows: list[tuple[int, int, str, str]] = []  # (ts, pos, user, kind): the model

    def log(pos: int, ts: int, user: str, kind: str) -> None:
        proj.on_logged(pos, _action(ts, user, kind))
        rows.append((ts, pos, user, kind))

    def expect(user: str | None, kind: str | None) -> list[int]:
        picked = [r for r in rows if user in (None, r[2]) and kind in (None, r[3])]
        return [pos for _, pos, _, _ in sorted(picked, reverse=True)]

    for pos in range(1, 21):
        log(pos, 100 + pos, ["ann", "bo"][pos % 2], ["join", "leave"][pos % 3 == 0])
    log(21, 50, "bo", "pm")  # back-dated: the oldest of all, linked in last
    log(22, 112, "ann", "leave")  # back-dated among ann's own actions
    log(23, 200, "cy", "join")  # a newcomer
    for user in ("ann", "bo", "cy", None):
        for kind in ("join", "leave", "pm", None):
            assert _newest(proj, user, kind) == expect(user, kind), (user, kind)

    proj.on_forgotten(24, UserForgotten("bo", 300))
    rows = [r for r in rows if r[2] != "bo"]
    # bo had half the slots, past GONE_SHARE: purged at once.
    assert len(proj.slot_ts) == len(rows) and proj.gone == 0
    log(25, 301, "bo", "join")  # back again, under a new code
    log(26, 150, "ann", "pm")
    for user in ("ann", "bo", "cy", None):
        for kind in ("join", "leave", "pm", None):
            assert _newest(proj, user, kind) == expect(user, kind), (user, kind)
    assert proj.has_user("bo") and not proj.has_user("nobody")

    again = UserActionsProjection.load(msgspec.msgpack.decode(msgspec.msgpack.encode(proj.dump())))
    for user in ("ann", "bo", "cy"):
        assert again.user_rows(user, None, 5, 1) == proj.user_rows(user, None, 5, 1)
    assert _newest(again, None, "join") == expect(None, "join")


def test_pagination_along_a_chain() -> None:
    proj = UserActionsProjection()
    for pos in range(1, 31):
        proj.on_logged(pos, _action(pos, "ann" if pos % 3 else "bo", "pm" if pos % 2 else "join"))
    anns = [p for p in range(30, 0, -1) if p % 3]
    assert proj.positions("ann", None, 4, 0) == anns[:4]
    assert proj.positions("ann", None, 4, 18) == anns[18:22]
    assert proj.positions("ann", None, 0, 0) == []
    assert proj.positions("ann", "pm", 3, 2) == [p for p in anns if p % 2][2:5]
    assert proj.positions(None, "join", 2, 1) == [28, 26]
    assert proj.positions("nobody", None, 5, 0) == proj.positions("ann", "nope", 5, 0) == []


def test_a_snapshot_with_columns_of_different_lengths_is_refused() -> None:
    proj = UserActionsProjection()
    proj.on_logged(1, _action(1, "ann"))
    data = msgspec.msgpack.decode(msgspec.msgpack.encode(proj.dump()))
    data["slots"][4] = b""
    with pytest.raises(ValueError, match="different lengths"):
        UserActionsProjection.load(data)


def test_a_snapshot_with_more_slots_than_rows_and_tombstones_is_refused() -> None:
    proj = UserActionsProjection()
    for pos in range(1, 9):
        proj.on_logged(pos, _action(pos, "ann" if pos > 1 else "bo"))
    proj.on_forgotten(9, UserForgotten("bo", 0))
    data = msgspec.msgpack.decode(msgspec.msgpack.encode(proj.dump()))
    assert UserActionsProjection.load(data).gone == 1
    # The tombstone's type turned into a live one: one slot too many.
    data["slots"][2] = data["slots"][2].replace(b"\xff\xff\xff\xff", bytes(4))
    with pytest.raises(ValueError, match="different lengths"):
        UserActionsProjection.load(data)


_USERS = ["ann", "bo", "cy", "dee"]
_ops = st.lists(
    st.one_of(
        # (user, timestamp, kind, details): an action, often back-dated.
        st.tuples(
            st.sampled_from(_USERS),
            st.integers(0, 40),
            st.sampled_from(["join", "leave", "pm"]),
            st.sampled_from([None, "!stats", "!top", "x" * 70]),
        ),
        st.sampled_from(_USERS),  # forget this user
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(_ops)
def test_forgetting_leaves_what_folding_only_the_other_actions_makes(ops: list[Any]) -> None:
    """After any actions and forgets, the reads and views are those of a
    projection that folded only the actions of users not forgotten since.
    A forget leaves its user's slots as tombstones, at most GONE_SHARE of
    them, which a dump keeps; once purged, the slots (numbers, chains) are
    the fresh fold's too: the others keep their order.  Details and types
    only forgotten users had are blanked."""
    proj = UserActionsProjection()
    kept: list[tuple[int, Any]] = []
    for pos, op in enumerate(ops, 1):
        if isinstance(op, str):
            proj.on_forgotten(pos, UserForgotten(op, 0))
            kept = [(p, ev) for p, ev in kept if ev.username != op]
        else:
            user, ts, kind, details = op
            ev = UserActionLogged(ts, user, kind, details)
            proj.on_logged(pos, ev)
            kept.append((pos, ev))
    fresh = UserActionsProjection()
    for pos, ev in kept:
        fresh.on_logged(pos, ev)
    assert proj.gone == proj.slot_type.count(GONE) <= len(proj.slot_type) * GONE_SHARE
    assert len(proj.slot_ts) - proj.gone == len(fresh.slot_ts)

    def rows(p: UserActionsProjection, user: str) -> list[Any]:
        # Details codes are the interner's: compare what they stand for.
        return [
            (pos, ts, kind, p.details.names[code] if code >= 0 else code)
            for pos, ts, kind, code in p.user_rows(user, None, 100, 0)
        ]

    def reads_as_fresh(p: UserActionsProjection) -> None:
        for user in _USERS:
            assert rows(p, user) == rows(fresh, user)
            for kind in ("join", "leave", "pm", None):
                assert _newest(p, user, kind) == _newest(fresh, user, kind)
        for kind in ("join", "leave", "pm", None):
            assert _newest(p, None, kind) == _newest(fresh, None, kind)
        assert p.all.same_rows(fresh.all)
        assert set(filter(None, p.types.names)) == set(fresh.types.names)
        assert set(filter(None, p.details.names)) == set(fresh.details.names)
        assert set(filter(None, p.users.names)) >= {ev.username for _, ev in kept}

    reads_as_fresh(proj)  # tombstones and all
    again = UserActionsProjection.load(msgspec.msgpack.decode(msgspec.msgpack.encode(proj.dump())))
    assert again.gone == proj.gone and again.slot_type == proj.slot_type
    reads_as_fresh(again)
    for p in (proj, again):
        p.purge()
        assert p.gone == 0 and GONE not in p.slot_type
        assert p.slot_ts == fresh.slot_ts and p.slot_pos == fresh.slot_pos
        assert p.slot_prev == fresh.slot_prev
        reads_as_fresh(p)


def test_sorted_index_drops_rows_by_timestamp_and_position() -> None:
    idx = SortedIndex()
    rows = [(5, 1, 7), (5, 2, 8), (5, 3, 7), (6, 4, 8), (9, 5, 7), (9, 6, 7)]
    for ts, pos, code in rows:
        idx.add(ts, pos, code)
    # A row not held (wrong timestamp for its position, or unknown) is passed over.
    assert idx.drop_rows([(9, 6), (5, 2), (6, 5), (4, 1), (5, 2)]) == [2, 6]
    assert list(idx.rows()) == [(5, 1, 7), (5, 3, 7), (6, 4, 8), (9, 5, 7)]
    assert idx.drop_code(7) == [1, 3, 5]
    assert list(idx.rows()) == [(6, 4, 8)]
    assert idx.drop_code(7) == [] and idx.drop_rows([]) == []
    assert idx.drop_rows([(6, 4)]) == [4] and len(idx) == 0


def test_sorted_index_drops_rows_among_many_of_one_timestamp() -> None:
    """A mass rejoin or an import puts many rows in one second: each row to
    drop is found by bisection on its position among them."""
    idx = SortedIndex()
    for pos in range(1, 20_001):
        idx.add(1_700_000_000 + (pos > 15_000), pos, pos % 7)
    gone = [(1_700_000_000, p) for p in range(400, 15_001, 400)] + [(1_700_000_001, 20_000)]
    assert idx.drop_rows(gone) == [p for _, p in gone]
    assert len(idx) == 20_000 - len(gone)
    assert not {p for _, p in gone} & set(idx.pos)
    # A position held, but under another timestamp, is not that row.
    assert idx.drop_rows([(1_700_000_001, 1), (1_700_000_000, 15_001)]) == []


def test_a_small_forget_leaves_tombstones_that_no_read_meets() -> None:
    """Forgetting a user with few of the actions renumbers nothing: their
    slots stay, blanked, until they pass GONE_SHARE or a dump purges them."""
    proj = UserActionsProjection()
    for pos in range(1, 101):
        proj.on_logged(
            pos, _action(pos, "ann" if pos % 10 else "bo", "pm", "!top" if pos % 10 else "!bo")
        )
    proj.on_forgotten(101, UserForgotten("bo", 0))
    assert (len(proj.slot_ts), proj.gone) == (100, 10)
    tombstones = range(9, 100, 10)  # nothing of bo left in them
    assert {proj.slot_type[s] for s in tombstones} == {GONE}
    assert {proj.slot_ts[s] for s in tombstones} == {proj.slot_pos[s] for s in tombstones} == {0}
    assert {proj.slot_details[s] for s in tombstones} == {DETAILS_NONE}
    assert {proj.slot_prev[s] for s in tombstones} == {-1}
    assert proj.details.names == ["!top", ""]  # bo's own details went at once
    assert not proj.has_user("bo") and proj.positions("bo", None, 10, 0) == []
    assert proj.positions(None, None, 1000, 0) == [p for p in range(100, 0, -1) if p % 10]
    proj.on_logged(102, _action(50, "ann", "join"))  # back-dated, among the tombstones
    proj.on_logged(103, _action(103, "bo", "pm"))  # back again, under a new code
    assert proj.positions("ann", None, 3, 43) == [52, 51, 102]
    assert proj.positions("bo", None, 10, 0) == [103]
    before = {u: proj.user_rows(u, None, 1000, 0) for u in ("ann", "bo")}
    proj.purge()
    assert (len(proj.slot_ts), proj.gone) == (92, 0)
    assert {u: proj.user_rows(u, None, 1000, 0) for u in ("ann", "bo")} == before
    for pos in range(104, 144):  # cy: over a quarter of the slots
        proj.on_logged(pos, _action(pos, "cy", "pm"))
    proj.on_forgotten(144, UserForgotten("cy", 0))
    assert proj.gone == 0 and len(proj.slot_ts) == 92


@given(
    st.sampled_from("iq"),
    st.lists(st.sampled_from([0, 1, -1, 256, 65_536, 1 << 24, 0x0101, -256]), max_size=40),
    st.sampled_from([0, 1, -1, 256, 65_536, 1 << 24, 0x0101, -256, 7]),
)
def test_find_all_and_find_any_match_whole_items_only(
    typecode: str, items: list[int], value: int
) -> None:
    """The byte search skips matches across two items (1 << 24 then 0 holds
    the bytes of 1 at an offset of 3)."""
    from array import array

    arr = array(typecode, items)
    expected = [i for i, item in enumerate(items) if item == value]
    assert find_all(arr, value) == expected
    assert find_any(arr, value) == bool(expected)
    # No item can hold a value past the type's range: none equals it.
    assert find_all(arr, 1 << 64) == [] and not find_any(arr, -(1 << 64))
