"""The history read models hold a few bytes a row, not a Python object a row.

The README promises it and the benchmarks measure it at 10M events
(docs/benchmarks.md); this checks the per-row cost of each history model
with tracemalloc, so a change that keeps an object per row (a tuple, a
Struct, a boxed int: 30 to 100 bytes more each) fails here at once.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

import pytest

from eventstore.events import Event, MessageSaved, UserActionLogged, UserCountLogged
from projections import Projections

ROWS = 100_000
NAMES = [f"user{i}" for i in range(50)]

#: Bytes a row, with the arrays' over-allocation: the messages index holds
#: three arrays (timestamp, position, user code: 20 bytes); user counts add
#: two counts (36); an action is a slot (28 bytes) plus its rows in the index
#: of all actions and in its type's index (20 each).  Measured 21, 38 and 71.
LIMITS: dict[str, tuple[int, Callable[[int], Event]]] = {
    "messages": (32, lambda i: MessageSaved(1000 + i, NAMES[i % 50], "hello there")),
    "counts": (48, lambda i: UserCountLogged(1000 + i, i % 100, i % 300)),
    "actions": (
        96,
        lambda i: UserActionLogged(1000 + i, NAMES[i % 50], ("join", "leave")[i % 2], None),
    ),
}


@pytest.mark.parametrize("model", sorted(LIMITS))
def test_a_history_row_costs_a_few_bytes(model: str) -> None:
    limit, make = LIMITS[model]
    proj = Projections()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for position in range(1, ROWS + 1):
            proj.apply(position, make(position))
        gc.collect()
        per_row = (tracemalloc.get_traced_memory()[0] - before) / ROWS
    finally:
        tracemalloc.stop()
    assert len(proj.state()[model if model != "counts" else "user_counts"]) == ROWS
    assert per_row <= limit, f"{model}: {per_row:.1f} bytes a row"
