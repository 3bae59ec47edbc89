"""eventstore: event-sourced storage for a chat bot.

``from eventstore import EventStore`` is all a bot needs: the adapter keeps
every write as a typed event in an append-only log and answers reads from
in-memory projections.
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    # EventStore is imported on first use, not with the package: the store
    # needs the projections package, whose folds need eventstore.events, and
    # importing that runs this file first.  Imported eagerly here, a program
    # that imports ``projections`` before ``eventstore`` would fail on the
    # circle.
    if name == "EventStore":
        from .store import EventStore

        return EventStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
