"""The storage contract every backend of the bot implements.

``StorageAdapter`` is the bot's only view of its data.  The semantics stated
in these docstrings hold for every implementation; the contract suite in
``eventstore.testing`` checks them.

Common rules:

* Timestamps are Unix seconds, ``int >= 0``.  ``None`` means "now", read once
  when the write is accepted; ``0`` is a valid timestamp, not "now".
* Ids are positive ints, unique per kind, increasing in append order, and stable
  across reconnects, snapshots and compaction.
* Bad input raises :class:`~eventstore.errors.ValidationError` and writes
  nothing: empty or non-str usernames and action types, negative or non-int
  (bool included) counts, timestamps, limits, offsets or ``keep_count``, text
  that cannot be encoded as UTF-8, and messages or details over 1 MiB.
* Counts and totals are at most ``2**63 - 1``: a ``save_user_stats`` or
  ``end_session`` that would take a user's total past it raises
  ValidationError naming the field, and writes nothing.
* Before ``connect()`` and after ``close()`` every data method raises
  :class:`~eventstore.errors.ConnectionError`.
* A write that changes nothing writes nothing.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Any, Dict, List, Optional, TypeVar  # noqa: UP035 - the contract's spelling

__all__ = ["StorageAdapter"]

_Adapter = TypeVar("_Adapter", bound="StorageAdapter")


class StorageAdapter(ABC):
    """Abstract storage of the bot's statistics, action log, peaks, counts and chat."""

    def __init__(self, logger: Optional[logging.Logger] = None) -> None:  # noqa: UP045
        """Create an unconnected adapter; ``logger`` defaults to ``eventstore``."""
        self.logger = logger or logging.getLogger("eventstore")

    # -- lifecycle ----------------------------------------------------------
    @abstractmethod
    async def connect(self) -> None:
        """Open the store and make every read answerable.

        Calling it on a connected adapter does nothing; after ``close()`` it
        opens the store again.
        """

    @abstractmethod
    async def close(self) -> None:
        """Make every accepted write durable, then release the store.

        Calling it twice, or before ``connect()``, is harmless.
        """

    @property
    @abstractmethod
    def is_connected(self) -> bool:
        """True between a successful ``connect()`` and ``close()``."""

    async def __aenter__(self: _Adapter) -> _Adapter:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- user statistics ------------------------------------------------------
    @abstractmethod
    async def save_user_stats(
        self,
        username: str,
        first_seen: Optional[int] = None,  # noqa: UP045
        last_seen: Optional[int] = None,  # noqa: UP045
        chat_lines: Optional[int] = None,  # noqa: UP045
        time_connected: Optional[int] = None,  # noqa: UP045
        session_start: Optional[int] = None,  # noqa: UP045
    ) -> None:
        """Create or update a user's statistics.

        For a new user ``first_seen`` and ``last_seen`` default to now,
        ``chat_lines`` and ``time_connected`` to 0 and ``session_start`` to
        None.  For an existing user ``None`` leaves a field unchanged;
        ``first_seen`` keeps the earlier of stored and given, ``last_seen`` the
        later; ``chat_lines`` and ``time_connected`` are increments added to the
        totals; ``session_start`` sets the open session's start.
        """

    @abstractmethod
    async def get_user_stats(self, username: str) -> Optional[Dict[str, Any]]:  # noqa: UP006, UP045
        """Return ``{username, first_seen, last_seen, total_chat_lines,
        total_time_connected, current_session_start}``, or None for an unknown user.
        """

    @abstractmethod
    async def get_all_user_stats(
        self,
        limit: Optional[int] = None,  # noqa: UP045
        offset: int = 0,
    ) -> List[Dict[str, Any]]:  # noqa: UP006
        """Every user's statistics, by ``last_seen`` descending, ties by username
        ascending; ``limit=None`` means all, ``offset`` skips that many first.
        """

    # -- user actions -----------------------------------------------------------
    @abstractmethod
    async def log_user_action(
        self,
        username: str,
        action_type: str,
        details: Optional[str] = None,  # noqa: UP045
        timestamp: Optional[int] = None,  # noqa: UP045
    ) -> None:
        """Record an action (``join``, ``leave``, a PM command...) with optional details."""

    @abstractmethod
    async def get_user_actions(
        self,
        username: Optional[str] = None,  # noqa: UP045
        action_type: Optional[str] = None,  # noqa: UP045
        limit: int = 100,
        offset: int = 0,
    ) -> List[Dict[str, Any]]:  # noqa: UP006
        """Rows ``{id, timestamp, username, action_type, details}``, newest first by
        (timestamp desc, id desc); each given filter must match exactly.
        """

    # -- channel peaks -------------------------------------------------------------
    @abstractmethod
    async def update_channel_stats(
        self,
        max_users: Optional[int] = None,  # noqa: UP045
        max_connected: Optional[int] = None,  # noqa: UP045
        timestamp: Optional[int] = None,  # noqa: UP045
    ) -> None:
        """Raise the channel's peaks.

        Each given maximum replaces the stored one only if strictly greater,
        and then its ``*_timestamp`` is set to ``timestamp``; ``last_updated``
        is set only when something changed.
        """

    @abstractmethod
    async def get_channel_stats(self) -> Dict[str, Any]:  # noqa: UP006
        """``{max_users, max_users_timestamp, max_connected, max_connected_timestamp,
        last_updated}``; defaults ``0, None, 0, None, None``.
        """

    # -- user counts ---------------------------------------------------------------
    @abstractmethod
    async def log_user_count(
        self,
        chat_users: int,
        connected_users: int,
        timestamp: Optional[int] = None,  # noqa: UP045
    ) -> None:
        """Record a sample of how many users are in chat and connected."""

    @abstractmethod
    async def get_user_count_history(
        self,
        start_time: Optional[int] = None,  # noqa: UP045
        end_time: Optional[int] = None,  # noqa: UP045
        limit: Optional[int] = None,  # noqa: UP045
    ) -> List[Dict[str, Any]]:  # noqa: UP006
        """Rows ``{id, timestamp, chat_users, connected_users}`` with
        ``start_time <= timestamp <= end_time`` (either bound optional), oldest
        first by (timestamp asc, id asc); ``limit`` takes the first N of that order.
        """

    # -- recent chat -----------------------------------------------------------------
    @abstractmethod
    async def save_message(
        self,
        username: str,
        message: str,
        timestamp: Optional[int] = None,  # noqa: UP045
    ) -> None:
        """Store a chat line exactly as given."""

    @abstractmethod
    async def get_recent_messages(self, limit: int = 100, offset: int = 0) -> List[Dict[str, Any]]:  # noqa: UP006
        """Rows ``{id, timestamp, username, message}``, newest first by
        (timestamp desc, id desc).
        """

    @abstractmethod
    async def clear_old_messages(self, keep_count: int = 1000) -> int:
        """Keep exactly the newest ``keep_count`` messages (in the order of
        ``get_recent_messages``), delete the rest and return how many were deleted.
        """
