"""Read model: the history of user counts (chat users, connected users).

Each sample is two small numbers, so the whole row stays in memory, in arrays
parallel to the sorted index: 32 bytes a sample and no log read to answer.
"""

from __future__ import annotations

from array import array
from typing import Any

from eventstore.events import UserCountLogged, UserCountsTrimmed

from .sorted_index import SortedIndex, from_le, to_le

__all__ = ["UserCountsProjection"]


class UserCountsProjection:
    __slots__ = ("chat", "connected", "index")

    def __init__(self) -> None:
        self.index = SortedIndex()
        self.chat = array("q")
        self.connected = array("q")

    def on_logged(self, pos: int, ev: UserCountLogged) -> None:
        i = self.index.add(ev.timestamp, pos)
        if i == len(self.chat):
            self.chat.append(ev.chat_users)
            self.connected.append(ev.connected_users)
        else:
            self.chat.insert(i, ev.chat_users)
            self.connected.insert(i, ev.connected_users)

    def on_trimmed(self, pos: int, ev: UserCountsTrimmed) -> None:
        k = self.index.drop_before(ev.before)
        del self.chat[:k]
        del self.connected[:k]

    def history(
        self, start: int | None, end: int | None, limit: int | None
    ) -> list[dict[str, Any]]:
        lo, hi = self.index.range(start, end)
        if limit is not None:
            hi = min(hi, lo + limit)
        ts, pos, chat, conn = self.index.ts, self.index.pos, self.chat, self.connected
        return [
            {
                "id": pos[i],
                "timestamp": ts[i],
                "chat_users": chat[i],
                "connected_users": conn[i],
            }
            for i in range(lo, hi)
        ]

    def state(self) -> dict[str, Any]:
        return {"user_counts": self.history(None, None, None)}

    def same_state(self, other: UserCountsProjection) -> bool:
        """``state()`` equal, compared on the arrays (see Projections.same_state)."""
        return (
            self.index.same_rows(other.index)
            and self.chat == other.chat
            and self.connected == other.connected
        )

    def dump(self) -> Any:
        return {
            "index": self.index.dump(),
            "chat": to_le(self.chat),
            "connected": to_le(self.connected),
        }

    @classmethod
    def load(cls, data: Any) -> UserCountsProjection:
        proj = cls()
        proj.index = SortedIndex.load(data["index"])
        proj.chat = from_le("q", data["chat"])
        proj.connected = from_le("q", data["connected"])
        if not len(proj.chat) == len(proj.connected) == len(proj.index):
            raise ValueError("user count arrays of different lengths")
        return proj
