"""Encoding and decoding of event batches, and the upcasting of old events.

A batch of events is encoded as one msgpack array, so that one checksum and
one decode call cover many events.  The encoder and decoder are built once per
process (building a typed decoder costs far more than using one) and rebuilt
only when an upcaster registers an old event type.

Schema evolution.  A field added last with a default needs nothing: msgspec
fills the default into old events, and old code ignores the extra trailing
field of new ones.  A rename, a split of meaning or a changed meaning gets a
new tag; the old class is kept and an upcaster registered for it turns each
old event into a current one while reading, so projections only ever see
current events::

    @upcaster(MessageSavedV0)
    def _(old: MessageSavedV0) -> MessageSaved:
        return MessageSaved(old.timestamp, old.user, old.text)
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgspec

from .errors import IntegrityError
from .events import EVENT_TYPES, BaseEvent, Event, event_tag

__all__ = [
    "decode_batch",
    "decode_frames",
    "encode_batch",
    "encode_batch_into",
    "has_upcasters",
    "known_tags",
    "remove_upcaster",
    "upcaster",
]

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[list[Any]] = msgspec.msgpack.Decoder(list[Event])
# For the frames of segments with holes (segment.FLAG_HOLES): nil is a
# position without an event, and decodes to None.  Elsewhere nil is damage.
_holes_decoder: msgspec.msgpack.Decoder[list[Any]] = msgspec.msgpack.Decoder(list[Event | None])
# For reading one event out of a frame: split the array into raw element
# bytes (no event objects built), then decode only the element wanted.
_raw_decoder = msgspec.msgpack.Decoder(list[msgspec.Raw])
_one_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Event)
# msgpack's array 32 header: 0xdd, then the element count (big-endian).
_ARRAY32 = struct.Struct(">BI")
# Old event type -> function returning the next version (applied until current).
_upcasters: dict[type[BaseEvent], Callable[[Any], BaseEvent]] = {}

_Old = TypeVar("_Old", bound=BaseEvent)


def _rebuild() -> None:
    global _decoder, _holes_decoder, _one_decoder
    types: tuple[Any, ...] = (*EVENT_TYPES, *_upcasters)
    union = types[0]
    for t in types[1:]:
        union = union | t
    _decoder = msgspec.msgpack.Decoder(list[union])  # type: ignore[valid-type]
    _holes_decoder = msgspec.msgpack.Decoder(list[union | None])  # type: ignore[valid-type]
    _one_decoder = msgspec.msgpack.Decoder(union)


def upcaster(
    old: type[_Old],
) -> Callable[[Callable[[_Old], BaseEvent]], Callable[[_Old], BaseEvent]]:
    """Register a function turning events of the old type ``old`` into newer ones."""

    def register(fn: Callable[[_Old], BaseEvent]) -> Callable[[_Old], BaseEvent]:
        if old in EVENT_TYPES:
            raise ValueError(f"{old.__name__} is a current event type; upcasters are for old ones")
        _upcasters[old] = fn
        _rebuild()
        return fn

    return register


def remove_upcaster(old: type[BaseEvent]) -> None:
    """Unregister ``old`` (tests use this to leave the registry as they found it)."""
    if _upcasters.pop(old, None) is not None:
        _rebuild()


def has_upcasters() -> bool:
    """Is any upcaster registered (events of old types may be in the log)?"""
    return bool(_upcasters)


def known_tags() -> set[int]:
    """Every tag this code can read: current events and those with an upcaster."""
    return {event_tag(t) for t in (*EVENT_TYPES, *_upcasters)}


def _upcast(event: Any) -> Event:
    seen = 0
    while type(event) in _upcasters:
        event = _upcasters[type(event)](event)
        seen += 1
        if seen > 100:
            raise IntegrityError(f"upcasters of {type(event).__name__} loop")
    result: Event = event
    return result


def encode_batch(events: Sequence[Event]) -> bytes:
    """Encode ``events`` as one msgpack array."""
    return _encoder.encode(events)


def encode_batch_into(events: Sequence[Event | None], buf: bytearray, offset: int) -> None:
    """Encode ``events`` into ``buf`` starting at ``offset`` (no intermediate copy).

    None encodes as nil: a hole, in frames of compacted segments only.
    """
    _encoder.encode_into(events, buf, offset)


def decode_batch(data: bytes | memoryview, where: str = "", *, holes: bool = False) -> list[Any]:
    """Decode one batch (upcasting old events); bad bytes raise IntegrityError.

    With ``holes`` (a frame of a segment with FLAG_HOLES) the list may hold
    None, for a position without an event, but neither first nor last: a
    frame begins and ends with an event, so that its first and last
    positions hold one.
    """
    try:
        events: list[Any] = (_holes_decoder if holes else _decoder).decode(data)
    except msgspec.DecodeError as err:
        raise IntegrityError(
            f"undecodable event batch{' at ' + where if where else ''}: {err}"
        ) from err
    if holes and events and (events[0] is None or events[-1] is None):
        raise IntegrityError(
            f"event batch{' at ' + where if where else ''} begins or ends with a hole (nil)"
        )
    if _upcasters:
        events = [_upcast(e) if type(e) in _upcasters else e for e in events]
    return events


def decode_frames(
    payloads: Sequence[bytes | memoryview], counts: Sequence[int], *, holes: bool = False
) -> list[Any] | None:
    """Decode the events of several batches in one call, as one flat list.

    A frame holds one batch, and a bot that awaits every write makes one
    frame per event: one decode call per frame then costs more than the
    decoding, and one list per frame keeps the garbage collector busy.  So
    each payload's array header is checked against its frame's event count
    and dropped, and the events of all of them are decoded as one array.
    Returns None if a header does not match or decoding fails: the caller
    then decodes the batches one by one to learn which is bad.
    """
    parts: list[bytes | memoryview] = [_ARRAY32.pack(0xDD, sum(counts))]
    for payload, count in zip(payloads, counts, strict=True):
        if not payload:
            return None
        kind = payload[0]
        if 0x90 <= kind <= 0x9F:  # fixarray
            n, skip = kind & 0x0F, 1
        elif kind == 0xDC:  # array 16
            n, skip = int.from_bytes(payload[1:3], "big"), 3
        elif kind == 0xDD:  # array 32
            n, skip = int.from_bytes(payload[1:5], "big"), 5
        else:
            return None
        if n != count:
            return None
        parts.append(payload[skip:])
    try:
        events: list[Any] = (_holes_decoder if holes else _decoder).decode(b"".join(parts))
    except msgspec.DecodeError:
        return None
    if holes:
        # Each frame's first and last element must be an event (decode_batch).
        i = 0
        for count in counts:
            if events[i] is None or events[i + count - 1] is None:
                return None
            i += count
    if _upcasters:
        events = [_upcast(e) if type(e) in _upcasters else e for e in events]
    return events


def split_batch(data: bytes | memoryview, where: str = "") -> list[msgspec.Raw]:
    """The encoded events of a batch, undecoded (cheap: no event objects)."""
    try:
        return _raw_decoder.decode(data)
    except msgspec.DecodeError as err:
        raise IntegrityError(
            f"undecodable event batch{' at ' + where if where else ''}: {err}"
        ) from err


def decode_event(raw: msgspec.Raw, where: str = "") -> Event:
    """Decode one event from ``split_batch`` (upcast if it is an old one)."""
    try:
        event: Event = _one_decoder.decode(raw)
    except msgspec.DecodeError as err:
        raise IntegrityError(f"undecodable event{' at ' + where if where else ''}: {err}") from err
    return _upcast(event) if type(event) in _upcasters else event


def batch_tags(data: bytes | memoryview) -> set[int]:
    """The tags of a batch's events, without knowing their types."""
    try:
        raw = msgspec.msgpack.decode(data)
    except msgspec.DecodeError:
        return set()
    return {item[0] for item in raw if isinstance(item, list) and item and isinstance(item[0], int)}
