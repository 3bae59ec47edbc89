"""Read model: the channel's peaks (most users in chat, most connected)."""

from __future__ import annotations

from typing import Any

from eventstore.events import ChannelPeakRaised, ChannelStatsSet

__all__ = ["ChannelStatsProjection"]


class ChannelStatsProjection:
    __slots__ = (
        "last_updated",
        "max_connected",
        "max_connected_timestamp",
        "max_users",
        "max_users_timestamp",
    )

    def __init__(self) -> None:
        self.max_users = 0
        self.max_users_timestamp: int | None = None
        self.max_connected = 0
        self.max_connected_timestamp: int | None = None
        self.last_updated: int | None = None

    def raised(
        self, max_users: int | None, max_connected: int | None
    ) -> tuple[int | None, int | None]:
        """Which of the given maxima would rise (the others become None)."""
        return (
            max_users if max_users is not None and max_users > self.max_users else None,
            max_connected
            if max_connected is not None and max_connected > self.max_connected
            else None,
        )

    def on_raised(self, pos: int, ev: ChannelPeakRaised) -> None:
        # Compare again rather than trusting the event: with several writers
        # (PostgreSQL) a peak may have been overtaken before this one applied.
        changed = False
        if ev.max_users is not None and ev.max_users > self.max_users:
            self.max_users = ev.max_users
            self.max_users_timestamp = ev.timestamp
            changed = True
        if ev.max_connected is not None and ev.max_connected > self.max_connected:
            self.max_connected = ev.max_connected
            self.max_connected_timestamp = ev.timestamp
            changed = True
        if changed:
            self.last_updated = ev.timestamp

    def on_set(self, pos: int, ev: ChannelStatsSet) -> None:
        self.max_users = ev.max_users
        self.max_users_timestamp = ev.max_users_timestamp
        self.max_connected = ev.max_connected
        self.max_connected_timestamp = ev.max_connected_timestamp
        self.last_updated = ev.last_updated

    def get(self) -> dict[str, Any]:
        return {
            "max_users": self.max_users,
            "max_users_timestamp": self.max_users_timestamp,
            "max_connected": self.max_connected,
            "max_connected_timestamp": self.max_connected_timestamp,
            "last_updated": self.last_updated,
        }

    def state(self) -> dict[str, Any]:
        return self.get()

    def dump(self) -> Any:
        return self.get()

    @classmethod
    def load(cls, data: Any) -> ChannelStatsProjection:
        proj = cls()
        for key, value in data.items():
            setattr(proj, key, value)
        return proj
