"""docs/format.md must match the bytes the code writes."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import msgspec

from eventstore import EventStore
from eventstore.events import EVENT_TYPES, SCHEMA_FINGERPRINT, event_tag

DOC = Path(__file__).parent.parent / "docs" / "format.md"


async def test_worked_example_bytes(tmp_path: Path) -> None:
    async with EventStore(tmp_path / "s", snapshot_every=None) as store:
        await store.save_message("a", "hi", timestamp=1)
    data = (tmp_path / "s" / "00000000000000000001.seg").read_bytes()
    assert data[:8] == bytes.fromhex("89 45 53 4c 4f 47 0d 0a")
    assert data[8:20] == bytes.fromhex("01 00 00 00 01 00 00 00 00 00 00 00")
    assert data[20:28] == SCHEMA_FINGERPRINT
    assert data[44:48] == struct.pack("<I", zlib.crc32(data[:44]))
    assert data[48:52] == bytes.fromhex("09 00 00 00")
    assert data[52:56] == struct.pack("<I", zlib.crc32(data[56:]))
    assert data[56:68] == bytes.fromhex("01 00 00 00 00 00 00 00 01 00 00 00")
    assert data[68:] == bytes.fromhex("91 94 08 01 a1 61 a2 68 69")
    # The fixed bytes of the doc's hex dump are these bytes.
    text = DOC.read_text()
    assert "0040  01 00 00 00 91 94 08 01  a1 61 a2 68 69" in text
    assert "0000  89 45 53 4c 4f 47 0d 0a  01 00 00 00 01 00 00 00" in text


def test_holes_example_bytes() -> None:
    """The compacted frame of "Holes in compacted frames", byte for byte."""
    from eventstore.events import MessageSaved
    from eventstore.segment import encode_frames

    text = DOC.read_text()
    section = text[text.index("### Holes in compacted frames") :]
    block = section[section.index("```\n") + 4 : section.index("\n```", section.index("```\n"))]
    dumped = b"".join(bytes.fromhex(line[6:55].replace("  ", " ")) for line in block.splitlines())
    ((first, count, frame),) = encode_frames(
        2, [MessageSaved(1, "a", "hi"), None, MessageSaved(9, "b", "yo")]
    )
    assert (first, count) == (2, 3)
    assert dumped == frame


def test_event_table_matches_the_schema() -> None:
    rows = re.findall(r"^\| (\d+) \| `(\w+)` v(\d+) \| (.+) \|$", DOC.read_text(), re.M)
    documented = {
        int(tag): (name, int(version), [f.split(":")[0].strip() for f in fields.split(", ")])
        for tag, name, version, fields in rows
    }
    actual = {
        event_tag(cls): (
            cls.__name__,
            cls.version,
            [f.name for f in msgspec.structs.fields(cls)],
        )
        for cls in EVENT_TYPES
    }
    assert documented == actual
