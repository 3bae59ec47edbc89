"""Read model: the log of user actions (join, leave, PM commands).

Only an index lives in memory: for every action its timestamp, position (its
id) and a 4-byte code.  The rows themselves are read from the log by position.
Three views of the same rows answer the three kinds of query without a scan:
all actions, one user's, one action type's.
"""

from __future__ import annotations

from array import array
from typing import Any

from eventstore.events import UserActionLogged, UserForgotten

from .interning import Interner
from .sorted_index import SortedIndex, from_le, to_le

__all__ = ["UserActionsProjection"]


class UserActionsProjection:
    __slots__ = ("all", "by_type", "by_user", "types", "users")

    def __init__(self) -> None:
        self.users = Interner()
        self.types = Interner()
        self.all = SortedIndex()  # code: action type
        self.by_user: dict[str, SortedIndex] = {}  # code: action type
        self.by_type: dict[int, SortedIndex] = {}  # code: user

    def on_logged(self, pos: int, ev: UserActionLogged) -> None:
        tcode = self.types.code(ev.action_type)
        ucode = self.users.code(ev.username)
        self.all.add(ev.timestamp, pos, tcode)
        idx = self.by_user.get(ev.username)
        if idx is None:
            idx = self.by_user[ev.username] = SortedIndex()
        idx.add(ev.timestamp, pos, tcode)
        tidx = self.by_type.get(tcode)
        if tidx is None:
            tidx = self.by_type[tcode] = SortedIndex()
        tidx.add(ev.timestamp, pos, ucode)

    def on_forgotten(self, pos: int, ev: UserForgotten) -> None:
        idx = self.by_user.pop(ev.username, None)
        if idx is None:
            return
        ucode = self.users.codes[ev.username]
        self.all.drop_positions(set(idx.pos))
        for tidx in self.by_type.values():
            tidx.drop_code(ucode)
        self.users.forget(ev.username)

    def positions(
        self, username: str | None, action_type: str | None, limit: int, offset: int
    ) -> list[int]:
        """Positions of the matching actions, newest first, paginated."""
        tcode = None
        if action_type is not None:
            tcode = self.types.get(action_type)
            if tcode is None:
                return []
        if username is not None:
            idx = self.by_user.get(username)
            return [] if idx is None else idx.newest(offset, limit, tcode)
        if tcode is not None:
            tidx = self.by_type.get(tcode)
            return [] if tidx is None else tidx.newest(offset, limit)
        return self.all.newest(offset, limit)

    def state(self) -> dict[str, Any]:
        return {"actions": [(ts, pos) for ts, pos, _ in self.all.rows()]}

    def dump(self) -> Any:
        # The per-user and per-type views are rebuilt from ``all`` on load:
        # smaller snapshots, and they cannot disagree with it.
        return {
            "users": self.users.names,
            "types": self.types.names,
            "all": self.all.dump(),
            "owners": to_le(self._owners()),
        }

    def _owners(self) -> array[int]:
        """The user code of every row of ``all``, in its order."""
        owner = {}
        for name, idx in self.by_user.items():
            code = self.users.codes[name]
            for pos in idx.pos:
                owner[pos] = code
        return array("i", [owner[p] for p in self.all.pos])

    @classmethod
    def load(cls, data: Any) -> UserActionsProjection:
        proj = cls()
        proj.users = Interner(list(data["users"]))
        proj.types = Interner(list(data["types"]))
        proj.all = SortedIndex.load(data["all"])
        owners = from_le("i", data["owners"])
        names = proj.users.names
        for (ts, pos, tcode), ucode in zip(proj.all.rows(), owners, strict=True):
            name = names[ucode]
            idx = proj.by_user.get(name)
            if idx is None:
                idx = proj.by_user[name] = SortedIndex()
            idx.ts.append(ts)
            idx.pos.append(pos)
            idx.code.append(tcode)
            tidx = proj.by_type.get(tcode)
            if tidx is None:
                tidx = proj.by_type[tcode] = SortedIndex()
            tidx.ts.append(ts)
            tidx.pos.append(pos)
            tidx.code.append(ucode)
        return proj
