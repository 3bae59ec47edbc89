"""Assertions on the event stream: what a call recorded, not only what reads return.

Two forms, for two habits of writing tests:

* :func:`assert_events` compares the events recorded after a position with a
  list of expected ones and fails with a line-by-line diff.
* :class:`Scenario` is the given/when/then form: ready-made history, one
  action, the events that action recorded.

An expected item is an event (compared by type and every field), a
:class:`Match` (compared by type and only the fields it names), or a
``(position, event_or_match)`` pair when the position matters too.
"""

from __future__ import annotations

import numbers
import sys
import unicodedata
import warnings
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Sequence,
)
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import msgspec

from ..events import EVENT_TYPES, BaseEvent, Event

if TYPE_CHECKING:
    from ..store import EventStore

__all__ = ["EventSource", "Expected", "Match", "Scenario", "assert_events", "recorded_events"]

T = TypeVar("T")

#: Longest repr of one field value in a failure message; a 1 MiB message
#: would otherwise bury the one line that matters.
_MAX_FIELD_REPR = 80


class EventSource(Protocol):
    """Anything that yields ``(position, event)`` from a position: a store or a log."""

    def read(
        self, from_position: int = 0, to_position: int | None = None
    ) -> AsyncIterator[tuple[int, Event]]: ...


#: Values a Match compares strictly, value and type: what event fields hold,
#: and what could pass for it by ``==`` (True for 1, 1000.0 for 1000, an
#: IntEnum member, a Decimal).  Anything else is a matcher.
_PLAIN = (str, bytes, numbers.Number, type(None))


class Match:
    """A partial expectation: an event of ``event_type`` whose named fields equal these.

    ``Match(MessageSaved, username="alice")`` matches any ``MessageSaved`` by
    alice, whatever its timestamp and text.  Naming a field the event type
    does not have is a TypeError at once, so a typo cannot make a check vacuous.

    A str, a number (bool included) or None must equal the field and be of
    its type (True is not 1, nor 1000.0 1000).  Any other value is a
    matcher, asked with ``==``: ``unittest.mock.ANY``, or an object of the
    test's own with an ``__eq__``.
    """

    __slots__ = ("event_type", "fields")

    def __init__(self, event_type: type[BaseEvent], /, **fields: Any) -> None:
        __tracebackhide__ = True
        if not (isinstance(event_type, type) and issubclass(event_type, EVENT_TYPES)):
            raise TypeError(f"Match needs an event type, got {event_type!r}")
        known = {f.name for f in msgspec.structs.fields(event_type)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(
                f"{event_type.__name__} has no field {', '.join(unknown)}; "
                f"its fields are {', '.join(sorted(known))}"
            )
        self.event_type = event_type
        self.fields = fields

    def differences(self, event: object) -> list[str]:
        """Why ``event`` does not match, one line per reason; empty if it does."""
        if type(event) is not self.event_type:
            return [f"type: expected {self.event_type.__name__}, recorded {type(event).__name__}"]
        out = []
        for name, want in self.fields.items():
            got = getattr(event, name)
            if isinstance(want, _PLAIN):
                same = got == want and type(got) is type(want)
            else:
                same = bool(want == got)  # a matcher's own __eq__ decides
            if not same:
                out.append(_mismatch(name, want, got))
        return out

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Match):
            return self.event_type is other.event_type and self.fields == other.fields
        return not self.differences(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        args = "".join(f", {k}={_short(v)}" for k, v in self.fields.items())
        return f"Match({self.event_type.__name__}{args})"


#: What ``assert_events`` and ``Scenario.then`` accept for one recorded event.
Expected = BaseEvent | Match | tuple[int, BaseEvent | Match]


def _short(value: Any) -> str:
    text = repr(value)
    if len(text) <= _MAX_FIELD_REPR:
        return text
    return f"{text[: _MAX_FIELD_REPR - 20]}... ({len(text)} chars)"


def _mismatch(name: str, want: Any, got: Any) -> str:
    """One line saying how a field differs, showing where two long strings part."""
    if (
        type(want) is str
        and type(got) is str
        and max(len(repr(want)), len(repr(got))) > _MAX_FIELD_REPR
    ):
        # Shortened from the start, two long strings would print the same.
        pairs = enumerate(zip(want, got, strict=False))
        at = next((i for i, (a, b) in pairs if a != b), min(len(want), len(got)))
        start, stop = max(0, at - 20), at + 20

        def part(text: str) -> str:
            before = "…" if start else ""
            after = "…" if stop < len(text) else ""
            return f"{before}{text[start:stop]!r}{after}"

        return (
            f"{name}: differs at character {at} (lengths {len(want)} and {len(got)}): "
            f"expected {part(want)}, recorded {part(got)}"
        )
    if (
        type(want) is str
        and type(got) is str
        and unicodedata.normalize("NFKC", want) == unicodedata.normalize("NFKC", got)
    ):
        # Different strings that print alike ("é" as one code point or as "e"
        # and a combining accent, a full-width letter): show their code points.
        return f"{name}: expected {want!a}, recorded {got!a} (alike once normalised)"
    return f"{name}: expected {_short(want)}, recorded {_short(got)}"


def _show(event: object) -> str:
    """An event as ``Type(field=value, ...)`` with long values shortened."""
    if not isinstance(event, EVENT_TYPES):
        return _short(event)
    fields = ", ".join(
        f"{f.name}={_short(getattr(event, f.name))}" for f in msgspec.structs.fields(event)
    )
    return f"{type(event).__name__}({fields})"


def _differences(want: BaseEvent | Match, got: object) -> list[str]:
    if isinstance(want, Match):
        return want.differences(got)
    if type(want) is not type(got):
        return [f"type: expected {type(want).__name__}, recorded {type(got).__name__}"]
    out = []
    for f in msgspec.structs.fields(want):
        w, g = getattr(want, f.name), getattr(got, f.name)
        # type() as well as ==: 1 == True, yet a bool is not a count.
        if w != g or type(w) is not type(g):
            out.append(_mismatch(f.name, w, g))
    return out


def _split(item: Expected) -> tuple[int | None, BaseEvent | Match]:
    __tracebackhide__ = True
    if isinstance(item, tuple):
        if len(item) != 2 or type(item[0]) is not int:
            raise TypeError(f"expected a (position, event) pair, got {item!r}")
        return item[0], item[1]
    return None, item


async def recorded_events(source: EventSource, since: int = 0) -> list[tuple[int, Event]]:
    """Every ``(position, event)`` recorded after position ``since``, oldest first."""
    return [item async for item in source.read(since + 1)]


def _check_expected(items: list[Expected]) -> None:
    __tracebackhide__ = True
    for item in items:
        _, want = _split(item)
        if not isinstance(want, (Match, *EVENT_TYPES)):
            raise TypeError(f"expected an event or a Match, got {want!r}")


def _diff(
    expected: list[Expected], actual: list[tuple[int, Event]], since: int
) -> tuple[bool, str]:
    """Compare; return (all matched, report)."""
    lines = []
    ok = True
    for i in range(max(len(expected), len(actual))):
        want_pos, want = _split(expected[i]) if i < len(expected) else (None, None)
        got_pos, got = actual[i] if i < len(actual) else (None, None)
        at = f"@{got_pos}" if got_pos is not None else ""
        head = f"  #{i + 1:<3} {at:<7}"
        if want is None:
            ok = False
            lines.append(f"{head} UNEXPECTED  recorded {_show(got)}")
            continue
        if got is None:
            ok = False
            pos = "" if want_pos is None else f" at @{want_pos}"
            lines.append(f"{head} MISSING     expected {_show_expected(want)}{pos}")
            continue
        reasons = _differences(want, got)
        if want_pos is not None and want_pos != got_pos:
            reasons.insert(0, f"position: expected @{want_pos}, recorded @{got_pos}")
        if not reasons:
            lines.append(f"{head} ok          {_show(got)}")
            continue
        ok = False
        pad = " " * len(head)
        lines.append(f"{head} MISMATCH    expected {_show_expected(want)}")
        lines.append(f"{pad}             recorded {_show(got)}")
        lines.extend(f"{pad}               - {reason}" for reason in reasons)
    if not lines:
        lines.append("  (none)")
    title = (
        f"events recorded after position {since} differ from those expected "
        f"({len(expected)} expected, {len(actual)} recorded):"
    )
    return ok, "\n".join([title, *lines])


def _show_expected(want: BaseEvent | Match) -> str:
    return repr(want) if isinstance(want, Match) else _show(want)


#: Where assertions were made and dropped without an ``await`` (so checked
#: nothing): the pytest plugin fails the test that made them.
unawaited: list[str] = []


class _Assertion(Generic[T]):
    """An assertion to await; dropped without an ``await``, it says it checked nothing.

    A forgotten ``await`` before ``assert_events(...)`` would otherwise pass
    the test with only Python's "coroutine was never awaited" warning.
    """

    __slots__ = ("_awaited", "_coro", "_file", "_line", "_what")

    def __init__(self, coro: Coroutine[Any, Any, T], what: str, depth: int) -> None:
        caller = sys._getframe(depth + 1)
        self._coro = coro
        self._file, self._line = caller.f_code.co_filename, caller.f_lineno
        self._what = f"{what} at {self._file}:{self._line}"
        self._awaited = False

    def __await__(self) -> Generator[Any, None, T]:
        self._awaited = True
        return self._coro.__await__()

    def __del__(self) -> None:
        if self._awaited:
            return
        self._coro.close()
        unawaited.append(self._what)
        warnings.warn_explicit(
            f"{self._what} was never awaited, so it checked nothing",
            RuntimeWarning,
            self._file,
            self._line,
        )


def assert_events(
    source: EventSource, expected: Iterable[Expected], *, since: int = 0
) -> Awaitable[list[tuple[int, Event]]]:
    """Assert that exactly ``expected`` was recorded after position ``since``.

    Takes the store (or its log), and must be awaited: the pytest plugin
    fails a test that drops it unawaited.  On failure the AssertionError
    lists every recorded event against its expectation, one line each, with
    the fields that differ.  Returns the recorded ``(position, event)`` pairs.

    Example::

        mark = store.position
        await store.save_message("alice", "hi")
        await assert_events(store, [Match(MessageSaved, username="alice")], since=mark)
    """
    return _Assertion(_assert_events(source, expected, since), "assert_events(...)", 1)


async def _assert_events(
    source: EventSource, expected: Iterable[Expected], since: int
) -> list[tuple[int, Event]]:
    __tracebackhide__ = True
    wanted = list(expected)
    _check_expected(wanted)
    actual = await recorded_events(source, since)
    ok, report = _diff(wanted, actual, since)
    if not ok:
        raise AssertionError(report)
    return actual


class Scenario:
    """Given some history, when the bot does one thing, then these events follow.

    Example::

        scenario = Scenario(store)
        await scenario.given([UserStatsSaved("alice", 100)])
        await scenario.when(lambda s: s.save_user_stats("alice", chat_lines=1))
        await scenario.then([UserStatsSaved("alice", clock.now, chat_lines=1)])

    ``then`` checks only the events recorded by the last ``when`` (or, without
    a ``when``, those after ``given``); ``then([])`` asserts that nothing was.
    """

    def __init__(self, store: EventStore) -> None:
        self.store = store
        #: The position after which ``then`` looks.
        self.mark = store.position
        #: What the last ``when`` returned.
        self.result: Any = None

    async def given(self, events: Sequence[Event]) -> Scenario:
        """Append ready-made events as history (no write rule is applied)."""
        await self.store.append(events)
        self.mark = self.store.position
        return self

    async def when(self, action: Callable[[EventStore], Awaitable[T]]) -> T:
        """Run ``action(store)`` and remember where its events begin."""
        self.mark = self.store.position
        result = await action(self.store)
        self.result = result
        return result

    async def when_raises(
        self,
        error: type[BaseException] | tuple[type[BaseException], ...],
        action: Callable[[EventStore], Awaitable[object]],
    ) -> BaseException:
        """Run ``action(store)``, assert it raises ``error``, and return the error."""
        __tracebackhide__ = True
        self.mark = self.store.position
        try:
            await action(self.store)
        except error as err:
            self.result = err
            return err
        raise AssertionError(f"the action did not raise {error!r}")

    def then(self, expected: Iterable[Expected]) -> Awaitable[list[tuple[int, Event]]]:
        """Assert that the last ``when`` recorded exactly ``expected`` (to be awaited)."""
        coro = _assert_events(self.store, expected, self.mark)
        return _Assertion(coro, "Scenario.then(...)", 1)
