"""Checks of the arguments of every public write and read.

Each check raises :class:`ValidationError` naming the argument and showing
the value, before anything is written.
"""

from __future__ import annotations

import types
from typing import Any

import msgspec

from .errors import ValidationError
from .events import EVENT_TYPES

__all__ = [
    "MAX_INT",
    "MAX_TEXT_BYTES",
    "check_event",
    "check_int",
    "check_name",
    "check_opt_int",
    "check_text",
]

#: Longest message, details, username or action type, in UTF-8 bytes.
MAX_TEXT_BYTES = 1024 * 1024
#: Largest integer the event encoding stores (a signed 64-bit value).
MAX_INT = 2**63 - 1


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_int(name: str, value: Any) -> int:
    # type() rather than isinstance(): bool is an int subclass, and True is
    # not a count.
    if type(value) is not int:
        raise ValidationError(f"{name} must be an int, got {type(value).__name__} {_show(value)}")
    if value < 0:
        raise ValidationError(f"{name} must be >= 0, got {value}")
    if value > MAX_INT:
        raise ValidationError(f"{name} must be <= {MAX_INT}, got {value}")
    return value


def check_opt_int(name: str, value: Any) -> int | None:
    return None if value is None else check_int(name, value)


def _utf8_len(name: str, value: str) -> int:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise ValidationError(
            f"{name} cannot be encoded as UTF-8 (position {err.start}: {err.reason}): "
            f"{_show(value)}"
        ) from err


def check_text(name: str, value: Any, *, optional: bool = False) -> str | None:
    """A str of at most 1 MiB of UTF-8 (empty allowed)."""
    if value is None and optional:
        return None
    if type(value) is not str:
        raise ValidationError(f"{name} must be a str, got {type(value).__name__} {_show(value)}")
    # Cheap bound first: a str of n code points is at most 4n UTF-8 bytes.
    if len(value) * 4 > MAX_TEXT_BYTES or not value.isascii():
        size = _utf8_len(name, value)
        if size > MAX_TEXT_BYTES:
            raise ValidationError(f"{name} is {size} bytes of UTF-8; the limit is {MAX_TEXT_BYTES}")
    return value


def check_name(name: str, value: Any) -> str:
    """A non-empty str of at most 1 MiB of UTF-8 (usernames, action types)."""
    if type(value) is not str:
        raise ValidationError(f"{name} must be a str, got {type(value).__name__} {_show(value)}")
    if not value:
        raise ValidationError(f"{name} must not be empty")
    # check_text's bound, inline: a name is checked on nearly every write.
    if len(value) * 4 > MAX_TEXT_BYTES or not value.isascii():
        check_text(name, value)
    return value


#: Event fields checked as names (non-empty), as the write methods check them:
#: an empty username could never be forgotten (forget_user refuses it).
_NAME_FIELDS = {"username", "action_type"}


def _field_checks(cls: type) -> list[tuple[str, Any, bool]]:
    """(name, check, None allowed) for each field of an event class."""
    checks = []
    for f in msgspec.structs.fields(cls):
        kinds = set(f.type.__args__) if isinstance(f.type, types.UnionType) else {f.type}
        optional = type(None) in kinds
        kinds.discard(type(None))
        assert kinds in ({int}, {str}), f"{cls.__name__}.{f.name}: {f.type}"
        check = (
            check_int if kinds == {int} else check_name if f.name in _NAME_FIELDS else check_text
        )
        checks.append((f.name, check, optional))
    return checks


_EVENT_FIELDS = {cls: _field_checks(cls) for cls in EVENT_TYPES}


def check_event(event: Any) -> None:
    """Check an event given whole (``EventStore.append``) as the write methods
    check their arguments: an event is a Struct, which checks nothing when it
    is made, and a value the log encodes but a projection cannot hold (an int
    past 64 bits) would be durable before its fold failed, and fail every
    replay after."""
    checks = _EVENT_FIELDS.get(type(event))
    if checks is None:
        raise ValidationError(f"not an event: {_show(event)}")
    kind = type(event).__name__
    for name, check, optional in checks:
        value = getattr(event, name)
        if value is None:
            if not optional:
                raise ValidationError(f"{kind}.{name} must not be None")
        else:
            check(f"{kind}.{name}", value)
