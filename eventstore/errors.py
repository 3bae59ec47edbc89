"""Every error the store raises.

All of them derive from :class:`StorageError`, so a bot can catch one class.
Messages name what was wrong: the argument and its value, or the file and the
byte offset.  Errors translated from lower layers keep their cause
(``raise ... from err``).
"""

from __future__ import annotations

import builtins

__all__ = [
    "ConnectionError",
    "IntegrityError",
    "MigrationError",
    "QueryError",
    "StorageConnectionError",
    "StorageError",
    "ValidationError",
]


class StorageError(Exception):
    """Base class of every error raised by the store."""


class ConnectionError(StorageError, builtins.ConnectionError):
    """The store is not connected, is closed, or could not be opened.

    Also raised when another process holds the writer lock, and for writes on a
    read-only store.  It also derives from the builtin ``ConnectionError`` so
    that generic handlers still catch it.
    """


#: The same class under a name that does not shadow the builtin.
StorageConnectionError = ConnectionError


class QueryError(StorageError):
    """A read could not be answered (for example the log lost a row it indexed)."""


class MigrationError(StorageError):
    """Stored data was written by a format or event version this code cannot read."""


class IntegrityError(StorageError):
    """Stored bytes are damaged: a bad checksum, an undecodable frame or a gap."""


class ValidationError(StorageError, ValueError):
    """An argument was rejected; nothing was written."""
