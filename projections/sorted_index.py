"""A compact, sorted index of history rows: parallel arrays, no object per row.

Rows are ordered by (timestamp, position).  Each row costs 20 bytes (two
int64 and one int32 ``code`` the owning projection gives meaning to: a user
or an action type), instead of the few hundred bytes of a dict or Struct per
row.  The row's content stays in the log and is fetched by position on demand.

Appends are the common case and cost O(1): events arrive in position order
and, almost always, in timestamp order.  A row with an older timestamp than
the newest row (imported or back-dated history) is inserted in place, which
costs a memmove of the tail.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

__all__ = ["SortedIndex", "find_all", "find_any", "without"]


class SortedIndex:
    __slots__ = ("code", "pos", "ts")

    def __init__(self) -> None:
        self.ts = array("q")
        self.pos = array("q")
        self.code = array("i")

    def __len__(self) -> int:
        return len(self.pos)

    def add(self, ts: int, pos: int, code: int = 0) -> int:
        """Add a row and return its index.

        ``pos`` must be greater than every position already held.
        """
        tss = self.ts
        if not tss or ts >= tss[-1]:
            tss.append(ts)
            self.pos.append(pos)
            self.code.append(code)
            return len(tss) - 1
        # Equal timestamps keep position order: every held position is smaller
        # than ``pos``, so the new row goes after all rows with the same ts.
        i = bisect_right(tss, ts)
        tss.insert(i, ts)
        self.pos.insert(i, pos)
        self.code.insert(i, code)
        return i

    def newest(self, offset: int, limit: int | None, code: int | None = None) -> list[int]:
        """Positions newest first (timestamp desc, position desc), paginated.

        With ``code`` only rows carrying that code count.
        """
        if code is None:
            n = len(self.pos)
            hi = n - offset
            lo = 0 if limit is None else max(0, hi - limit)
            if hi <= 0 or limit == 0:
                return []
            out = self.pos[lo:hi].tolist()
            out.reverse()
            return out
        poss = self.pos
        return [poss[i] for i in self.newest_rows(offset, limit, code)]

    def newest_rows(self, offset: int, limit: int | None, code: int | None = None) -> list[int]:
        """Like ``newest``, but the rows' indexes (for views with parallel arrays)."""
        n = len(self.pos)
        if limit == 0:
            return []
        if code is None:
            hi = n - offset
            lo = 0 if limit is None else max(0, hi - limit)
            return list(range(hi - 1, lo - 1, -1))
        out: list[int] = []
        skip = offset
        codes = self.code
        for i in range(n - 1, -1, -1):
            if codes[i] != code:
                continue
            if skip:
                skip -= 1
                continue
            out.append(i)
            if limit is not None and len(out) >= limit:
                break
        return out

    def range(self, start: int | None, end: int | None) -> tuple[int, int]:
        """The slice [lo, hi) of rows with start <= ts <= end (inclusive bounds)."""
        lo = 0 if start is None else bisect_left(self.ts, start)
        hi = len(self.ts) if end is None else bisect_right(self.ts, end)
        return lo, max(lo, hi)

    def drop_oldest(self, count: int) -> None:
        """Remove the ``count`` oldest rows."""
        del self.ts[:count]
        del self.pos[:count]
        del self.code[:count]

    def drop_before(self, ts: int) -> int:
        """Remove rows with timestamp < ``ts``; return how many."""
        k = bisect_left(self.ts, ts)
        self.drop_oldest(k)
        return k

    def drop_code(self, code: int) -> list[int]:
        """Remove rows carrying ``code``; return their positions."""
        return self._drop_at(find_all(self.code, code))

    def drop_rows(self, rows: Iterable[tuple[int, int]]) -> list[int]:
        """Remove the rows (timestamp, position) given; return the positions removed.

        Rows not held are passed over.  Each is found by bisection, so the
        cost is a copy of the arrays (in C), not a pass over the rows.
        """
        tss, poss = self.ts, self.pos
        at = []
        for ts, pos in rows:
            lo, hi = bisect_left(tss, ts), bisect_right(tss, ts)
            # The rows of one timestamp are in position order (see add), and
            # may be many (a mass rejoin, an import): bisect among them.
            i = bisect_left(poss, pos, lo, hi)
            if i < hi and poss[i] == pos:
                at.append(i)
        return self._drop_at(sorted(set(at)))

    def _drop_at(self, at: list[int]) -> list[int]:
        """Remove the rows at the (ascending) indexes ``at``; return their positions.

        Forgetting a user runs this on indexes of a million rows and more
        (every action after a year of a busy channel), on the event loop:
        the rows kept are copied a slice at a time, where a list of kept
        indexes built in Python stalled the loop for about a second.
        """
        if not at:
            return []
        dropped = [self.pos[i] for i in at]
        self.ts = without(self.ts, at)
        self.pos = without(self.pos, at)
        self.code = without(self.code, at)
        return dropped

    def same_rows(self, other: SortedIndex) -> bool:
        """The same (timestamp, position) rows, codes aside (as ``rows()`` compared).

        Arrays of one type compare as buffers, with no object per row.
        """
        return self.ts == other.ts and self.pos == other.pos

    def rows(self) -> Iterator[tuple[int, int, int]]:
        """Every row as (ts, pos, code), oldest first."""
        return zip(self.ts, self.pos, self.code, strict=True)

    def dump(self) -> list[bytes | memoryview]:
        """The arrays as little-endian bytes (snapshots)."""
        return [to_le(self.ts), to_le(self.pos), to_le(self.code)]

    @classmethod
    def load(cls, data: list[bytes]) -> SortedIndex:
        idx = cls()
        idx.ts, idx.pos, idx.code = (
            from_le("q", data[0]),
            from_le("q", data[1]),
            from_le("i", data[2]),
        )
        if not len(idx.ts) == len(idx.pos) == len(idx.code):
            raise ValueError("index arrays of different lengths")
        return idx


def to_le(arr: array[int]) -> bytes | memoryview:
    """An int array's bytes in little-endian order, whatever this machine's.

    On a little-endian machine a view of the array itself, not a copy: a
    snapshot of years of history holds some hundred megabytes of arrays,
    and copying them all before encoding doubled what a snapshot took in
    memory.  So encode the view before the array changes (an array cannot
    grow while a view of it exists: BufferError).
    """
    if sys.byteorder == "little":
        return memoryview(arr)
    swapped = array(arr.typecode, arr)
    swapped.byteswap()
    return swapped.tobytes()


def from_le(typecode: str, data: bytes) -> array[int]:
    arr = array(typecode)
    arr.frombytes(data)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr


def find_all(arr: array[int], value: int) -> list[int]:
    """The indexes of the items of the int array ``arr`` equal to ``value``, ascending.

    A search in C of the array's bytes for the value's, from one match to
    the next: cheap when the matches are few.  A Python call per item
    (``map(value.__eq__, arr)``) took about 0.3 s at millions of rows.
    """
    return list(_matches(arr, value))


def find_any(arr: array[int], value: int) -> bool:
    """Whether an item of the int array ``arr`` equals ``value`` (as ``find_all``)."""
    return next(_matches(arr, value), None) is not None


def _matches(arr: array[int], value: int) -> Iterator[int]:
    try:
        pattern = array(arr.typecode, [value]).tobytes()
    except OverflowError:  # past the type's range: no item equals it
        return
    data = arr.tobytes()
    size = arr.itemsize
    i = data.find(pattern)
    while i >= 0:
        if i % size:  # the bytes of two neighbouring items: look on
            i = data.find(pattern, i + 1)
            continue
        yield i // size
        i = data.find(pattern, i + size)


def without(arr: array[int], at: list[int]) -> array[int]:
    """A copy of ``arr`` without the items at the (ascending, distinct) indexes ``at``."""
    out = arr[: at[0]]
    for i, j in zip(at, [*at[1:], len(arr)], strict=True):
        out += arr[i + 1 : j]
    return out
