"""Read model: the log of user actions (join, leave, PM commands).

Only an index lives in memory: for every action its timestamp, position (its
id) and a 4-byte code.  The rows themselves are read from the log by position.
Three views of the same rows answer the three kinds of query without a scan:
all actions, one user's, one action type's.
"""

from __future__ import annotations

from typing import Any

from eventstore.events import UserActionLogged, UserForgotten

from .interning import Interner
from .sorted_index import SortedIndex

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
        # All three views are saved as they are: rebuilding the per-user and
        # per-type ones row by row took most of a snapshot load (0.31 of 0.34 s
        # at 1M events).
        return {
            "users": self.users.names,
            "types": self.types.names,
            "all": self.all.dump(),
            "by_user": {name: idx.dump() for name, idx in self.by_user.items()},
            "by_type": {code: idx.dump() for code, idx in self.by_type.items()},
        }

    @classmethod
    def load(cls, data: Any) -> UserActionsProjection:
        proj = cls()
        proj.users = Interner(list(data["users"]))
        proj.types = Interner(list(data["types"]))
        proj.all = SortedIndex.load(data["all"])
        proj.by_user = {str(name): SortedIndex.load(idx) for name, idx in data["by_user"].items()}
        proj.by_type = {int(code): SortedIndex.load(idx) for code, idx in data["by_type"].items()}
        if sum(map(len, proj.by_user.values())) != len(proj.all) or sum(
            map(len, proj.by_type.values())
        ) != len(proj.all):
            raise ValueError("action views of different sizes")
        return proj
