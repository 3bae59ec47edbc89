"""Read model: the log of user actions (join, leave, PM commands).

Only an index lives in memory, one row per action, in parallel arrays sorted
by (timestamp, position): timestamp, position (its id), type code, user code,
details code.  The rows themselves are read from the log by position.

One user's actions, and one type's, are found without a scan through two
chains: for every row, the index of the previous (older) row of the same user
and of the same type, and per user and per type the index of the newest row.
Reading a user's newest N actions walks N links.  Keeping the chains costs a
replay one append to two large arrays per action; the per-user sorted indexes
they replace cost four appends to small arrays scattered over memory, which
made actions the dearest event of a replay (1.2 us each, against 0.2 us for
a chat line).  Rows inserted out of order (back-dated history) or removed
(a forgotten user) move the row indexes the chains hold; they are then
rebuilt in one pass before the next read that needs them.

The details code lets the bot's most frequent history read, a user's recent
actions, be answered without a log read: short details (commands such as
"!stats") repeat, and are interned; longer ones are left in the log
(DETAILS_IN_LOG) and fetched for the rows that have them.
"""

from __future__ import annotations

from array import array
from itertools import compress
from typing import Any

from eventstore.events import UserActionLogged, UserForgotten

from .interning import Interner
from .sorted_index import SortedIndex, from_le, to_le

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


class UserActionsProjection:
    __slots__ = (
        "all",
        "by_type",
        "by_user",
        "chained",
        "details",
        "prev_type",
        "prev_user",
        "row_details",
        "row_user",
        "types",
        "users",
    )

    def __init__(self) -> None:
        self.users = Interner()
        self.types = Interner()
        self.details = Interner()
        self.all = SortedIndex()  # code: action type
        # Parallel to ``all``: the row's user code and details code ...
        self.row_user = array("i")
        self.row_details = array("i")
        # ... and the index of the previous row of the same user / type.
        self.prev_user = array("i")
        self.prev_type = array("i")
        # The index of the newest row, by user code / type code (NONE: none).
        self.by_user = array("i")
        self.by_type = array("i")
        # False once an insert or a removal moved rows: chains to rebuild.
        self.chained = True

    def __len__(self) -> int:
        return len(self.all)

    # -- the fold ---------------------------------------------------------
    def on_logged(self, pos: int, ev: UserActionLogged) -> None:
        # Replay runs this once per action: kept to appends at the end of
        # large arrays and two lookups.
        ts = ev.timestamp
        tcode = self.types.codes.get(ev.action_type)
        if tcode is None:
            tcode = self.types.code(ev.action_type)
            self.by_type.append(NONE)
        ucode = self.users.codes.get(ev.username)
        if ucode is None:
            ucode = self.users.code(ev.username)
            self.by_user.append(NONE)
        details = ev.details
        dcode = DETAILS_NONE if details is None else self._details_code(details)
        alls = self.all
        tss = alls.ts
        if tss and ts < tss[-1]:
            # Older than the newest row: inserted in place, which moves the
            # rows after it, so the chains are rebuilt before the next read.
            i = alls.add(ts, pos, tcode)
            self.row_user.insert(i, ucode)
            self.row_details.insert(i, dcode)
            self.chained = False
            return
        i = len(tss)
        tss.append(ts)
        alls.pos.append(pos)
        alls.code.append(tcode)
        self.row_user.append(ucode)
        self.row_details.append(dcode)
        if self.chained:
            by_user, by_type = self.by_user, self.by_type
            self.prev_user.append(by_user[ucode])
            self.prev_type.append(by_type[tcode])
            by_user[ucode] = i
            by_type[tcode] = i

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
        keep = [u != ucode for u in self.row_user]
        alls = self.all
        alls.ts = array("q", compress(alls.ts, keep))
        alls.pos = array("q", compress(alls.pos, keep))
        alls.code = array("i", compress(alls.code, keep))
        self.row_user = array("i", compress(self.row_user, keep))
        self.row_details = array("i", compress(self.row_details, keep))
        self.users.forget(ev.username)
        self.chained = False

    def _chain(self) -> None:
        """Rebuild the chains after rows moved (one pass over the rows)."""
        if self.chained:
            return
        by_user = array("i", [NONE]) * len(self.users.names)
        by_type = array("i", [NONE]) * len(self.types.names)
        n = len(self.row_user)
        prev_user = array("i", [NONE]) * n
        prev_type = array("i", [NONE]) * n
        for i, (u, t) in enumerate(zip(self.row_user, self.all.code, strict=True)):
            prev_user[i] = by_user[u]
            by_user[u] = i
            prev_type[i] = by_type[t]
            by_type[t] = i
        self.prev_user, self.prev_type = prev_user, prev_type
        self.by_user, self.by_type = by_user, by_type
        self.chained = True

    # -- reads ------------------------------------------------------------
    def has_user(self, username: str) -> bool:
        ucode = self.users.get(username)
        if ucode is None:
            return False
        self._chain()
        return self.by_user[ucode] != NONE

    def _walk(
        self, start: int, links: array[int], limit: int | None, offset: int, tcode: int | None
    ) -> list[int]:
        """Row indexes along a chain from ``start``, newest first, paginated.

        With ``tcode`` only rows of that type count.
        """
        out: list[int] = []
        if limit == 0:
            return out
        codes = self.all.code
        i, skip = start, offset
        while i != NONE:
            if tcode is None or codes[i] == tcode:
                if skip:
                    skip -= 1
                else:
                    out.append(i)
                    if len(out) == limit:
                        break
            i = links[i]
        return out

    def _user_walk(
        self, username: str, action_type: str | None, limit: int | None, offset: int
    ) -> list[int] | None:
        ucode = self.users.get(username)
        tcode = None if action_type is None else self.types.get(action_type)
        if ucode is None or (action_type is not None and tcode is None):
            return None
        self._chain()
        return self._walk(self.by_user[ucode], self.prev_user, limit, offset, tcode)

    def user_rows(
        self, username: str, action_type: str | None, limit: int, offset: int
    ) -> list[tuple[int, int, str, int]]:
        """One user's actions, newest first: (position, timestamp, type, details code).

        Details codes >= 0 name ``self.details.names``; see DETAILS_NONE and
        DETAILS_IN_LOG for the others.
        """
        rows = self._user_walk(username, action_type, limit, offset)
        if not rows:
            return []
        alls, types, dcodes = self.all, self.types.names, self.row_details
        pos, ts, codes = alls.pos, alls.ts, alls.code
        return [(pos[i], ts[i], types[codes[i]], dcodes[i]) for i in rows]

    def positions(
        self, username: str | None, action_type: str | None, limit: int, offset: int
    ) -> list[int]:
        """Positions of the matching actions, newest first, paginated."""
        if username is not None:
            rows = self._user_walk(username, action_type, limit, offset)
        elif action_type is not None:
            tcode = self.types.get(action_type)
            if tcode is None:
                return []
            self._chain()
            rows = self._walk(self.by_type[tcode], self.prev_type, limit, offset, None)
        else:
            return self.all.newest(offset, limit)
        pos = self.all.pos
        return [pos[i] for i in rows or ()]

    def state(self) -> dict[str, Any]:
        return {"actions": [(ts, pos) for ts, pos, _ in self.all.rows()]}

    def dump(self) -> Any:
        # The chains are saved too: rebuilding them row by row would take
        # most of a snapshot load at millions of actions.
        self._chain()
        return {
            "users": self.users.names,
            "types": self.types.names,
            "details": self.details.names,
            "all": self.all.dump(),
            "rows": [
                to_le(a) for a in (self.row_user, self.row_details, self.prev_user, self.prev_type)
            ],
            "by_user": to_le(self.by_user),
            "by_type": to_le(self.by_type),
        }

    @classmethod
    def load(cls, data: Any) -> UserActionsProjection:
        proj = cls()
        proj.users = Interner(list(data["users"]))
        proj.types = Interner(list(data["types"]))
        proj.details = Interner(list(data["details"]))
        proj.all = SortedIndex.load(data["all"])
        proj.row_user, proj.row_details, proj.prev_user, proj.prev_type = (
            from_le("i", raw) for raw in data["rows"]
        )
        proj.by_user = from_le("i", data["by_user"])
        proj.by_type = from_le("i", data["by_type"])
        n = len(proj.all)
        if not (
            len(proj.row_user)
            == len(proj.row_details)
            == len(proj.prev_user)
            == len(proj.prev_type)
            == n
        ):
            raise ValueError("action rows and their columns of different lengths")
        if len(proj.by_user) != len(proj.users.names) or len(proj.by_type) != len(proj.types.names):
            raise ValueError("action chain heads and codes of different lengths")
        return proj
