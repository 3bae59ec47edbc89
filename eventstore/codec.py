"""Encoding and decoding of event batches.

A batch of events is encoded as one msgpack array, so that one checksum and
one decode call cover many events.  The encoder and decoder are built once per
process: building a typed decoder is far more expensive than using one.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from .errors import IntegrityError
from .events import Event

__all__ = ["decode_batch", "encode_batch", "encode_batch_into"]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Event])


def encode_batch(events: Sequence[Event]) -> bytes:
    """Encode ``events`` as one msgpack array."""
    return _encoder.encode(events)


def encode_batch_into(events: Sequence[Event], buf: bytearray, offset: int) -> None:
    """Encode ``events`` into ``buf`` starting at ``offset`` (no intermediate copy)."""
    _encoder.encode_into(events, buf, offset)


def decode_batch(data: bytes | memoryview, where: str = "") -> list[Event]:
    """Decode one batch; undecodable bytes raise :class:`IntegrityError` naming ``where``."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as err:
        raise IntegrityError(
            f"undecodable event batch{' at ' + where if where else ''}: {err}"
        ) from err
