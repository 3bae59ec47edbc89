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
        _check_projections()
        from .store import EventStore

        globals()["EventStore"] = EventStore  # checked once
        return EventStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_projections() -> None:
    """Refuse, by name, a module of the caller's that shadows the ``projections`` package.

    The read models are the top-level package ``projections``, installed
    beside this one.  A bot project's own ``projections.py`` (a common name)
    found first on sys.path made the store's import fail with "cannot import
    name 'Projections'", which names neither eventstore nor the cure.
    """
    import importlib.util
    import os

    spec = importlib.util.find_spec("projections")
    ours = os.path.join(os.path.dirname(os.path.dirname(__file__)), "projections")
    found = spec.origin if spec is not None else None
    if found is None or os.path.dirname(os.path.realpath(found)) != os.path.realpath(ours):
        raise ImportError(
            f"eventstore needs its package 'projections' ({ours}), but Python finds "
            f"{found or 'none'} first: a module of that name in your project shadows it; "
            "rename that module"
        )
