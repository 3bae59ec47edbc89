"""Read model: per-user statistics (first/last seen, chat lines, time connected)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from eventstore.errors import ValidationError
from eventstore.events import (
    Event,
    SessionEnded,
    UserForgotten,
    UserStatsSaved,
    UserStatsSet,
)
from eventstore.validation import MAX_INT

__all__ = ["UserStats", "UserStatsProjection"]


def _check_totals(user: str, lines: int, add_lines: int, time: int, add_time: int) -> None:
    """Refuse a positive increment that takes a total past MAX_INT.

    Only a positive one: a total already past it (recorded before this
    check existed) must not block the user's other updates.
    """
    for which, total, add in (("chat_lines", lines, add_lines), ("time_connected", time, add_time)):
        if add > 0 and total + add > MAX_INT:
            raise ValidationError(
                f"{which}: {user!r} has {total}, and adding {add} would pass the largest "
                f"total stored ({MAX_INT})"
            )


# A user's record is a list, indexed by these constants: the fold runs once per
# chat line, and a list is the cheapest mutable record Python has.
FIRST, LAST, LINES, TIME, SESSION = range(5)
UserStats = list  # [first_seen, last_seen, total_chat_lines, total_time_connected, session]


class UserStatsProjection:
    __slots__ = ("_sorted", "users")

    def __init__(self) -> None:
        self.users: dict[str, list[Any]] = {}
        # get_all_user_stats order, rebuilt lazily after a change.
        self._sorted: list[str] | None = None

    # -- the fold ---------------------------------------------------------
    def on_saved(self, pos: int, ev: UserStatsSaved) -> None:
        rec = self.users.get(ev.username)
        if rec is None:
            first = ev.first_seen if ev.first_seen is not None else ev.now
            last = ev.last_seen if ev.last_seen is not None else ev.now
            self.users[ev.username] = [
                first,
                last,
                ev.chat_lines,
                ev.time_connected,
                ev.session_start,
            ]
        else:
            if ev.first_seen is not None and ev.first_seen < rec[FIRST]:
                rec[FIRST] = ev.first_seen
            if ev.last_seen is not None and ev.last_seen > rec[LAST]:
                rec[LAST] = ev.last_seen
            rec[LINES] += ev.chat_lines
            rec[TIME] += ev.time_connected
            if ev.session_start is not None:
                rec[SESSION] = ev.session_start
        self._sorted = None

    def on_set(self, pos: int, ev: UserStatsSet) -> None:
        self.users[ev.username] = [
            ev.first_seen,
            ev.last_seen,
            ev.total_chat_lines,
            ev.total_time_connected,
            ev.current_session_start,
        ]
        self._sorted = None

    def on_session_ended(self, pos: int, ev: SessionEnded) -> None:
        rec = self.users.get(ev.username)
        if rec is None or rec[SESSION] is None:
            return
        rec[TIME] += ev.seconds
        if ev.timestamp > rec[LAST]:
            rec[LAST] = ev.timestamp
        rec[SESSION] = None
        self._sorted = None

    def on_forgotten(self, pos: int, ev: UserForgotten) -> None:
        if self.users.pop(ev.username, None) is not None:
            self._sorted = None

    # -- what would a write change ----------------------------------------
    def would_change(self, ev: UserStatsSaved) -> bool:
        """False if applying ``ev`` would leave the stored record as it is.

        Raises ValidationError if a total would pass MAX_INT: the event
        encoding, snapshots and the SQLite export hold 64-bit integers, so
        such a total would be recorded but could not be saved again.
        """
        rec = self.users.get(ev.username)
        if rec is None:
            return True
        if rec[LINES] + ev.chat_lines > MAX_INT or rec[TIME] + ev.time_connected > MAX_INT:
            _check_totals(ev.username, rec[LINES], ev.chat_lines, rec[TIME], ev.time_connected)
        return (
            (ev.first_seen is not None and ev.first_seen < rec[FIRST])
            or (ev.last_seen is not None and ev.last_seen > rec[LAST])
            or ev.chat_lines != 0
            or ev.time_connected != 0
            or (ev.session_start is not None and ev.session_start != rec[SESSION])
        )

    def check_session_end(self, username: str, seconds: int) -> None:
        """Raise ValidationError if ending a session would take the time past MAX_INT."""
        rec = self.users.get(username)
        if rec is not None:
            _check_totals(username, rec[LINES], 0, rec[TIME], seconds)

    def check_batch(self, events: Iterable[Event]) -> None:
        """Raise ValidationError if applying ``events`` in order would take a total past MAX_INT.

        For ``append()``, whose events are facts that no write rule checked.
        The batch is folded onto a copy of the records it touches, by the
        folds themselves, so the check counts exactly what they would.
        """
        events = list(events)
        scratch = UserStatsProjection()
        fold: dict[type, Callable[[int, Any], None]] = {
            UserStatsSaved: scratch.on_saved,
            UserStatsSet: scratch.on_set,
            SessionEnded: scratch.on_session_ended,
            UserForgotten: scratch.on_forgotten,
        }
        names = {ev.username for ev in events if type(ev) in fold}  # type: ignore[union-attr]
        scratch.users = {n: list(self.users[n]) for n in names if n in self.users}
        for ev in events:
            apply = fold.get(type(ev))
            if apply is None:
                continue
            name = ev.username  # type: ignore[union-attr]
            rec = scratch.users.get(name)
            lines, time = (0, 0) if rec is None else (rec[LINES], rec[TIME])
            apply(0, ev)
            rec = scratch.users.get(name)
            if rec is not None:
                _check_totals(name, lines, rec[LINES] - lines, time, rec[TIME] - time)

    # -- reads ------------------------------------------------------------
    @staticmethod
    def row(username: str, rec: list[Any]) -> dict[str, Any]:
        return {
            "username": username,
            "first_seen": rec[FIRST],
            "last_seen": rec[LAST],
            "total_chat_lines": rec[LINES],
            "total_time_connected": rec[TIME],
            "current_session_start": rec[SESSION],
        }

    def get(self, username: str) -> dict[str, Any] | None:
        rec = self.users.get(username)
        return None if rec is None else self.row(username, rec)

    def all(self, limit: int | None, offset: int) -> list[dict[str, Any]]:
        order = self._sorted
        if order is None:
            users = self.users
            # last_seen descending, ties by username ascending.
            order = sorted(users, key=lambda u: (-users[u][LAST], u))
            self._sorted = order
        end = None if limit is None else offset + limit
        return [self.row(u, self.users[u]) for u in order[offset:end]]

    def state(self) -> dict[str, Any]:
        return {u: list(r) for u, r in sorted(self.users.items())}

    def same_state(self, other: UserStatsProjection) -> bool:
        """``state()`` equal: the same users with equal records (dict order aside)."""
        return self.users == other.users

    def dump(self) -> Any:
        return self.users

    @classmethod
    def load(cls, data: Any) -> UserStatsProjection:
        proj = cls()
        proj.users = {str(u): list(r) for u, r in data.items()}
        return proj
