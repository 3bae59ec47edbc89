"""eventstore: event-sourced storage for a chat bot.

``from eventstore import EventStore`` is all a bot needs: the adapter keeps
every write as a typed event in an append-only log and answers reads from
in-memory projections.
"""

from .adapter import StorageAdapter
from .errors import (
    ConnectionError,
    IntegrityError,
    MigrationError,
    QueryError,
    StorageConnectionError,
    StorageError,
    ValidationError,
)
from .log import EventLog
from .memlog import MemoryLog
from .store import EventStore

__all__ = [
    "ConnectionError",
    "EventLog",
    "EventStore",
    "IntegrityError",
    "MemoryLog",
    "MigrationError",
    "QueryError",
    "StorageAdapter",
    "StorageConnectionError",
    "StorageError",
    "ValidationError",
]
__version__ = "0.1.0"
