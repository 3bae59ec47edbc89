"""Read model: the log of user actions (join, leave, PM commands).

Only an index lives in memory; the rows themselves are read from the log by
position.  Three views of the same rows answer the three kinds of query
without a scan:

* all actions: a sorted index of (timestamp, position, type code);
* one type's: a sorted index per type of (timestamp, position, user code);
* one user's: a chain.  Every action gets a *slot* when it is folded, and a
  slot never moves: arrays indexed by slot hold its timestamp, position,
  type code and details code, and the slot of the same user's previous
  (older) action.  Per user, the slot of the newest action.  A user's newest
  N actions are N steps along the chain.

A sorted index per user would answer the same, but a replay would append
each action to small arrays of its user's, scattered over memory: that made
an action the dearest event to fold (1.2 us, against 0.2 us for a chat
line).  The slot arrays are appended to in order instead.  An action older
than its user's newest (back-dated, or from another process's clock on a
shared log) is linked in after the newer ones, found by walking from the
newest: a few steps for a row a little out of order.

The details code lets the bot's most frequent history read, a user's recent
actions, be answered without a log read: short details (commands such as
"!stats") repeat, and are interned; longer ones are left in the log
(DETAILS_IN_LOG) and fetched for the rows that have them.
"""

from __future__ import annotations

from array import array
from itertools import accumulate
from typing import Any

from eventstore.events import UserActionLogged, UserForgotten

from .interning import Interner
from .sorted_index import SortedIndex, find_all, find_any, from_le, to_le, without

__all__ = ["DETAILS_IN_LOG", "DETAILS_NONE", "UserActionsProjection"]

#: Details codes: no details, or details kept only in the log.
DETAILS_NONE = -1
DETAILS_IN_LOG = -2
#: Details at most this long (in characters) are interned ...
DETAILS_INTERN_CHARS = 64
#: ... while fewer than this many distinct ones are; then the log keeps them.
DETAILS_INTERN_MAX = 65_536
#: The end of a chain.
NONE = -1
#: The type code of a tombstone: the slot of a forgotten user's action.
GONE = -1
#: Tombstones are purged once they are more than this share of the slots.
GONE_SHARE = 0.25


class UserActionsProjection:
    __slots__ = (
        "all",
        "by_type",
        "by_user",
        "details",
        "gone",
        "slot_details",
        "slot_pos",
        "slot_prev",
        "slot_ts",
        "slot_type",
        "types",
        "users",
    )

    def __init__(self) -> None:
        self.users = Interner()
        self.types = Interner()
        self.details = Interner()
        self.all = SortedIndex()  # code: action type
        self.by_type: dict[int, SortedIndex] = {}  # code: user
        # By slot (one per action, in the order folded).
        self.slot_ts = array("q")
        self.slot_pos = array("q")
        self.slot_type = array("i")
        self.slot_details = array("i")
        self.slot_prev = array("i")  # the same user's previous action
        # By user code: the slot of the newest action (NONE: none).
        self.by_user = array("i")
        # How many slots are tombstones (see _bury).
        self.gone = 0

    # -- the fold ---------------------------------------------------------
    def on_logged(self, pos: int, ev: UserActionLogged) -> None:
        # Replay runs this once per action: appends at the end of large
        # arrays, and the common case of each view spelled out inline.
        ts = ev.timestamp
        tcode = self.types.codes.get(ev.action_type)
        if tcode is None:
            tcode = self.types.code(ev.action_type)
        ucode = self.users.codes.get(ev.username)
        if ucode is None:
            ucode = self.users.code(ev.username)
            self.by_user.append(NONE)
        details = ev.details
        dcode = DETAILS_NONE if details is None else self._details_code(details)
        slot = len(self.slot_ts)
        self.slot_ts.append(ts)
        self.slot_pos.append(pos)
        self.slot_type.append(tcode)
        self.slot_details.append(dcode)
        by_user = self.by_user
        newest = by_user[ucode]
        if newest == NONE or ts >= self.slot_ts[newest]:
            self.slot_prev.append(newest)
            by_user[ucode] = slot
        else:
            self._link_older(ucode, slot, ts)
        tidx = self.by_type.get(tcode)
        if tidx is None:
            tidx = self.by_type[tcode] = SortedIndex()
        alls = self.all
        if alls.ts and ts < alls.ts[-1]:
            # Older than the newest row: inserted in place (a memmove).
            alls.add(ts, pos, tcode)
            tidx.add(ts, pos, ucode)
            return
        # Not older than any row of ``all``, so not older than any row of
        # the type's view either (it holds some of the same rows): append.
        alls.ts.append(ts)
        alls.pos.append(pos)
        alls.code.append(tcode)
        tidx.ts.append(ts)
        tidx.pos.append(pos)
        tidx.code.append(ucode)

    def _link_older(self, ucode: int, slot: int, ts: int) -> None:
        """Link ``slot`` into its user's chain behind every newer action.

        Its position is the largest yet, so it goes after (is newer than)
        every action with the same timestamp.
        """
        prev, slot_ts = self.slot_prev, self.slot_ts
        newer = self.by_user[ucode]
        at = prev[newer]
        while at != NONE and slot_ts[at] > ts:
            newer, at = at, prev[at]
        prev.append(at)
        prev[newer] = slot

    def _details_code(self, details: str) -> int:
        code = self.details.get(details)
        if code is not None:
            return code
        if len(details) > DETAILS_INTERN_CHARS or len(self.details.names) >= DETAILS_INTERN_MAX:
            return DETAILS_IN_LOG
        return self.details.code(details)

    def on_forgotten(self, pos: int, ev: UserForgotten) -> None:
        ucode = self.users.get(ev.username)
        if ucode is None:
            return
        slots = self._chain(self.by_user[ucode])
        self.by_user[ucode] = NONE
        self.users.forget(ev.username)
        slot_ts, slot_pos, slot_type = self.slot_ts, self.slot_pos, self.slot_type
        self.all.drop_rows([(slot_ts[s], slot_pos[s]) for s in slots])
        rows_by_type: dict[int, list[tuple[int, int]]] = {}
        for s in slots:
            rows_by_type.setdefault(slot_type[s], []).append((slot_ts[s], slot_pos[s]))
        for tcode, rows in rows_by_type.items():
            self.by_type[tcode].drop_rows(rows)
        self._bury(slots)

    def _bury(self, slots: list[int]) -> None:
        """Blank ``slots`` (a forgotten user's) where they are, as tombstones.

        Removing them would renumber every slot after the first: a pass over
        every action (a million after a year of a busy channel), about 0.2 s
        on the event loop for each forget, and again in the compaction that
        follows it.  No chain leads to a tombstone (their user's head is
        NONE), so reads never meet one, and one holds nothing of its user:
        zeros, type GONE.  ``purge()`` removes them once they are more than
        GONE_SHARE of the slots.  Until then snapshots keep them as they are
        (see docs/format.md): how many actions a forgotten user had, and
        between which other actions they came, but not their name, types,
        details, timestamps or positions.
        """
        if not slots:
            return
        slot_ts, slot_pos, slot_type = self.slot_ts, self.slot_pos, self.slot_type
        slot_details, slot_prev = self.slot_details, self.slot_prev
        old_details = {slot_details[s] for s in slots}
        for s in slots:
            slot_ts[s] = slot_pos[s] = 0
            slot_type[s] = GONE
            slot_details[s] = DETAILS_NONE
            slot_prev[s] = NONE
        self.gone += len(slots)
        # Details and action types that only the forgotten user's actions
        # had are theirs too: blank them, so no snapshot keeps them.
        for tcode in [t for t, tidx in self.by_type.items() if not tidx.ts]:
            del self.by_type[tcode]
            self.types.forget(self.types.names[tcode])
        old_details.difference_update((DETAILS_NONE, DETAILS_IN_LOG))
        for code in _unused(slot_details, old_details):
            self.details.forget(self.details.names[code])
        if self.gone > len(slot_ts) * GONE_SHARE:
            self.purge()

    def purge(self) -> None:
        """Remove the tombstones ``_bury`` left, and renumber the slots kept.

        The slots kept keep their order, so a slot's new number is the count
        of slots kept before it, and the arrays are those a fold of only the
        actions kept makes.  Every pass over the slots is in C: a loop in
        Python took about two seconds at a million actions.
        """
        if not self.gone:
            return
        gone = find_all(self.slot_type, GONE)
        if not gone:
            self.gone = 0
            return
        keep = bytearray(b"\x01") * len(self.slot_type)
        for slot in gone:
            keep[slot] = 0
        # renumber[old] is the new number of a kept slot ``old``; the last
        # item is NONE, so that renumber[NONE], a chain's end, is NONE too.
        counts = accumulate(keep, initial=NONE)
        next(counts)
        renumber = list(counts)
        renumber.append(NONE)
        new_number = renumber.__getitem__
        # Every array built before any is replaced: a MemoryError halfway
        # leaves the old ones, tombstones and all, whole.
        prev = array("i", map(new_number, without(self.slot_prev, gone)))
        by_user = array("i", map(new_number, self.by_user))
        ts, pos = without(self.slot_ts, gone), without(self.slot_pos, gone)
        types, details = without(self.slot_type, gone), without(self.slot_details, gone)
        self.slot_prev, self.by_user, self.slot_ts, self.slot_pos = prev, by_user, ts, pos
        self.slot_type, self.slot_details, self.gone = types, details, 0

    # -- reads ------------------------------------------------------------
    def _chain(self, slot: int) -> list[int]:
        """Every slot of a chain, newest first."""
        out = []
        prev = self.slot_prev
        while slot != NONE:
            out.append(slot)
            slot = prev[slot]
        return out

    def has_user(self, username: str) -> bool:
        ucode = self.users.get(username)
        return ucode is not None and self.by_user[ucode] != NONE

    def _user_slots(
        self, username: str, action_type: str | None, limit: int | None, offset: int
    ) -> list[int]:
        """One user's slots, newest first, paginated (of one type if given)."""
        out: list[int] = []
        ucode = self.users.get(username)
        tcode = None if action_type is None else self.types.get(action_type)
        if ucode is None or (action_type is not None and tcode is None) or limit == 0:
            return out
        prev, types = self.slot_prev, self.slot_type
        slot, skip = self.by_user[ucode], offset
        while slot != NONE:
            if tcode is None or types[slot] == tcode:
                if skip:
                    skip -= 1
                else:
                    out.append(slot)
                    if len(out) == limit:
                        break
            slot = prev[slot]
        return out

    def user_rows(
        self, username: str, action_type: str | None, limit: int, offset: int
    ) -> list[tuple[int, int, str, int]]:
        """One user's actions, newest first: (position, timestamp, type, details code).

        Details codes >= 0 name ``self.details.names``; see DETAILS_NONE and
        DETAILS_IN_LOG for the others.
        """
        pos, ts, codes, dcodes = self.slot_pos, self.slot_ts, self.slot_type, self.slot_details
        types = self.types.names
        return [
            (pos[s], ts[s], types[codes[s]], dcodes[s])
            for s in self._user_slots(username, action_type, limit, offset)
        ]

    def positions(
        self, username: str | None, action_type: str | None, limit: int, offset: int
    ) -> list[int]:
        """Positions of the matching actions, newest first, paginated."""
        if username is not None:
            pos = self.slot_pos
            return [pos[s] for s in self._user_slots(username, action_type, limit, offset)]
        if action_type is not None:
            tcode = self.types.get(action_type)
            tidx = None if tcode is None else self.by_type.get(tcode)
            return [] if tidx is None else tidx.newest(offset, limit)
        return self.all.newest(offset, limit)

    def state(self) -> dict[str, Any]:
        return {"actions": [(ts, pos) for ts, pos, _ in self.all.rows()]}

    def dump(self) -> Any:
        # Every view is saved as it is: rebuilding them row by row would take
        # most of a snapshot load at millions of actions.  Tombstones too:
        # purging them here would cost the forget's snapshot what _bury saved.
        return {
            "users": self.users.names,
            "types": self.types.names,
            "details": self.details.names,
            "all": self.all.dump(),
            "by_type": {code: idx.dump() for code, idx in self.by_type.items()},
            "slots": [
                to_le(a)
                for a in (
                    self.slot_ts,
                    self.slot_pos,
                    self.slot_type,
                    self.slot_details,
                    self.slot_prev,
                )
            ],
            "by_user": to_le(self.by_user),
        }

    @classmethod
    def load(cls, data: Any) -> UserActionsProjection:
        proj = cls()
        proj.users = Interner(list(data["users"]))
        proj.types = Interner(list(data["types"]))
        proj.details = Interner(list(data["details"]))
        proj.all = SortedIndex.load(data["all"])
        proj.by_type = {int(code): SortedIndex.load(idx) for code, idx in data["by_type"].items()}
        ts, pos, types, details, prev = data["slots"]
        proj.slot_ts, proj.slot_pos = from_le("q", ts), from_le("q", pos)
        proj.slot_type, proj.slot_details = from_le("i", types), from_le("i", details)
        proj.slot_prev = from_le("i", prev)
        proj.by_user = from_le("i", data["by_user"])
        n = len(proj.slot_ts)
        proj.gone = proj.slot_type.count(GONE)
        if not (
            len(proj.slot_pos)
            == len(proj.slot_type)
            == len(proj.slot_details)
            == len(proj.slot_prev)
            == n
            == len(proj.all) + proj.gone
        ):
            raise ValueError("action slot arrays of different lengths")
        if len(proj.by_user) != len(proj.users.names):
            raise ValueError("action chain heads and user codes of different counts")
        for links in (proj.slot_prev, proj.by_user):
            if links and not NONE <= min(links) <= max(links) < n:
                raise ValueError("action chain link out of range")
        if sum(map(len, proj.by_type.values())) != len(proj.all):
            raise ValueError("action views of different sizes")
        return proj


def _unused(arr: array[int], codes: set[int]) -> set[int]:
    """Those of ``codes`` that no item of the int array ``arr`` equals.

    A forget asks this of the details codes of the user's actions.  A set
    of every item (a million after a year) takes about 20 ms, a search of
    the array's bytes about 3 ms a code: for a few codes, the search.
    """
    if len(codes) > 4:
        return codes - set(arr)
    return {code for code in codes if not find_any(arr, code)}
