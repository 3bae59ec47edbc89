"""Read model: the cache of recent chat.

As for actions, memory holds an index (timestamp, position, user code) and the
text stays in the log.  ``clear_old_messages`` drops the oldest rows of the
index; compaction later drops their bytes from the log.
"""

from __future__ import annotations

from array import array
from typing import Any

from eventstore.events import MessageSaved, MessagesCleared, UserForgotten

from .interning import Interner
from .sorted_index import SortedIndex

__all__ = ["MessagesProjection"]

#: Blank name slots tolerated beyond the live names before renumbering.
_SPARE_BLANKS = 64


class MessagesProjection:
    __slots__ = ("index", "users")

    def __init__(self) -> None:
        self.users = Interner()
        self.index = SortedIndex()  # code: user

    def __len__(self) -> int:
        return len(self.index)

    def on_saved(self, pos: int, ev: MessageSaved) -> None:
        # Once per chat line: SortedIndex.add's common case is inlined.
        code = self.users.codes.get(ev.username)
        if code is None:
            code = self.users.code(ev.username)
        ts = ev.timestamp
        index = self.index
        tss = index.ts
        if tss and ts < tss[-1]:
            index.add(ts, pos, code)
            return
        tss.append(ts)
        index.pos.append(pos)
        index.code.append(code)

    def on_cleared(self, pos: int, ev: MessagesCleared) -> None:
        # The newest ``keep_count`` rows are the last ones of the index.
        excess = len(self.index) - ev.keep_count
        if excess > 0:
            dropped = set(self.index.code[:excess])
            self.index.drop_oldest(excess)
            # A user left without a message keeps no name here: every
            # snapshot would carry it for ever, long after compaction has
            # dropped the cleared messages, and forget_user (which sees no
            # row of theirs) would not erase it.
            names = self.users.names
            for code in dropped.difference(self.index.code):
                self.users.forget(names[code])
            if len(names) > 2 * len(self.users.codes) + _SPARE_BLANKS:
                self._renumber()

    def _renumber(self) -> None:
        """Give the users still holding messages the codes 0..n-1 again.

        A blank slot is never reused (see Interner.forget), and users who
        come back after a clear take new codes: without this, nightly clears
        would grow the name list, in memory and in every snapshot, by the
        users they leave without a message.  Done only once the blanks
        outnumber the names (and a few more), so its cost, a pass over the
        index, is spread over the clears that made them.
        """
        old = self.users
        live = [name for name in old.names if name]
        remap = [-1] * len(old.names)
        for new, name in enumerate(live):
            remap[old.codes[name]] = new
        self.index.code = array("i", [remap[code] for code in self.index.code])
        self.users = Interner(live)

    def on_forgotten(self, pos: int, ev: UserForgotten) -> None:
        ucode = self.users.get(ev.username)
        if ucode is not None:
            self.index.drop_code(ucode)
            self.users.forget(ev.username)

    def positions(self, limit: int, offset: int) -> list[int]:
        return self.index.newest(offset, limit)

    def state(self) -> dict[str, Any]:
        return {"messages": [(ts, pos) for ts, pos, _ in self.index.rows()]}

    def dump(self) -> Any:
        return {"users": self.users.names, "index": self.index.dump()}

    @classmethod
    def load(cls, data: Any) -> MessagesProjection:
        proj = cls()
        proj.users = Interner(list(data["users"]))
        proj.index = SortedIndex.load(data["index"])
        return proj
