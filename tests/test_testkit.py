"""The test kit itself: FakeClock, the plugin's fixtures, assert_events, Match, Scenario.

It ends with the kind of test the kit is for: a small bot handler, tested by
the events it records.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from eventstore import EventStore, ValidationError
from eventstore.events import (
    ChannelPeakRaised,
    MessageSaved,
    UserActionLogged,
    UserCountLogged,
    UserStatsSaved,
    UserStatsSet,
)
from eventstore.testing import (
    DEFAULT_START,
    FakeClock,
    Match,
    Scenario,
    assert_events,
    recorded_events,
    streams,
)

HAS_SEGMENTLOG = importlib.util.find_spec("eventstore.segmentlog") is not None
REPO = Path(__file__).resolve().parent.parent


# -- FakeClock -----------------------------------------------------------------------------
def test_fake_clock_returns_now_and_counts_reads() -> None:
    clock = FakeClock(1000)
    assert (clock(), clock(), clock.calls) == (1000, 1000, 2)
    assert clock.now == 1000
    assert clock.calls == 2  # .now is not a read


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(1000)
    assert clock.advance(15) == 1015
    assert clock() == 1015
    clock.set(0)
    assert clock() == 0
    clock.now = 42
    assert clock() == 42
    assert clock.advance() == 43


def test_fake_clock_tick_moves_after_each_read() -> None:
    clock = FakeClock(10, tick=5)
    assert [clock(), clock(), clock()] == [10, 15, 20]
    assert clock.now == 25
    assert repr(clock) == "FakeClock(now=25, tick=5, calls=3)"


@pytest.mark.parametrize("bad", [-1, 1.5, True, "5", None])
def test_fake_clock_rejects_what_is_not_a_timestamp(bad: object) -> None:
    clock = FakeClock(7)
    with pytest.raises(ValueError, match="int >= 0"):
        clock.set(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="int >= 0"):
        clock.advance(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="int >= 0"):
        FakeClock(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="int >= 0"):
        clock.tick = bad  # type: ignore[assignment]
    assert clock.now == 7
    assert clock.tick == 0


# -- the plugin ----------------------------------------------------------------------------
def test_the_plugin_is_registered_once(request: pytest.FixtureRequest) -> None:
    manager = request.config.pluginmanager
    names = [manager.get_name(p) for p in manager.get_plugins()]
    ours = [n for n in names if n in ("eventstore", "eventstore.testing.plugin")]
    assert len(ours) == 1, names


def test_fake_clock_fixture_starts_at_the_default(fake_clock: FakeClock) -> None:
    assert (fake_clock.now, fake_clock.calls) == (DEFAULT_START, 0)
    fake_clock.advance(10)  # the next test gets a fresh one (checked above)


async def test_memory_store_is_connected_and_reads_fake_clock(
    memory_store: EventStore, fake_clock: FakeClock
) -> None:
    assert memory_store.is_connected
    assert memory_store.path is None
    fake_clock.set(12345)
    await memory_store.save_message("alice", "hi")
    rows = await memory_store.get_recent_messages()
    assert [(r["timestamp"], r["message"]) for r in rows] == [(12345, "hi")]


async def test_memory_store_starts_empty(memory_store: EventStore) -> None:
    assert memory_store.position == 0
    assert await recorded_events(memory_store) == []


@pytest.mark.skipif(not HAS_SEGMENTLOG, reason="eventstore.segmentlog is not written yet")
async def test_disk_store_keeps_its_log_under_tmp_path(
    disk_store: EventStore, fake_clock: FakeClock, tmp_path: Path
) -> None:
    assert disk_store.is_connected
    assert disk_store.path == str(tmp_path / "store")
    await disk_store.save_message("alice", "on disk")
    await disk_store.close()
    assert (tmp_path / "store").is_dir()
    assert any((tmp_path / "store").iterdir())
    fake_clock.advance(100)
    await disk_store.connect()
    await assert_events(disk_store, [(1, MessageSaved(DEFAULT_START, "alice", "on disk"))])


async def test_forget_user_rewrites_the_stream_on_disk_and_not_in_memory(
    memory_store: EventStore, disk_store: EventStore
) -> None:
    """The one difference between the two fixtures the README names."""
    from eventstore.events import UserForgotten

    for store in (memory_store, disk_store):
        await store.save_user_stats("bob", chat_lines=1)
        await store.save_message("alice", "hi")
        await store.save_message("bob", "bye")
        assert await store.forget_user("alice")
    await assert_events(
        memory_store,
        [
            Match(UserStatsSaved, username="bob"),
            Match(MessageSaved, username="alice"),
            Match(MessageSaved, username="bob"),
            Match(UserForgotten, username="alice"),
        ],
    )
    await assert_events(
        disk_store,
        [(1, Match(UserStatsSet, username="bob")), (3, Match(MessageSaved, username="bob"))],
    )
    for store in (memory_store, disk_store):
        assert [m["username"] for m in await store.get_recent_messages()] == ["bob"]


# -- assert_events -------------------------------------------------------------------------
async def test_assert_events_accepts_events_pairs_and_matches(
    memory_store: EventStore, fake_clock: FakeClock
) -> None:
    now = fake_clock.now
    await memory_store.save_message("alice", "hi")
    await memory_store.log_user_count(3, 4)
    recorded = await assert_events(
        memory_store,
        [
            MessageSaved(now, "alice", "hi"),
            (2, Match(UserCountLogged, chat_users=3)),
        ],
    )
    assert recorded == [(1, MessageSaved(now, "alice", "hi")), (2, UserCountLogged(now, 3, 4))]
    await assert_events(memory_store, [(2, UserCountLogged(now, 3, 4))], since=1)
    await assert_events(memory_store, [], since=2)
    # A log is an event source too.
    await assert_events(memory_store.log, [Match(MessageSaved), Match(UserCountLogged)])


async def test_a_failing_assert_events_shows_a_line_by_line_diff(
    memory_store: EventStore,
) -> None:
    await memory_store.save_message("alice", "hi")
    await memory_store.log_user_count(3, 4)
    await memory_store.save_message("bob", "yo")
    with pytest.raises(AssertionError) as failure:
        await assert_events(
            memory_store,
            [
                MessageSaved(DEFAULT_START, "alice", "hi"),
                Match(UserCountLogged, chat_users=5),
                (4, Match(MessageSaved, username="carol")),
                UserCountLogged(1, 2, 3),
            ],
        )
    pad = " " * 27
    assert str(failure.value).splitlines() == [
        "events recorded after position 0 differ from those expected (4 expected, 3 recorded):",
        "  #1   @1      ok          "
        "MessageSaved(timestamp=1700000000, username='alice', message='hi')",
        "  #2   @2      MISMATCH    expected Match(UserCountLogged, chat_users=5)",
        pad + "recorded UserCountLogged(timestamp=1700000000, chat_users=3, connected_users=4)",
        pad + "  - chat_users: expected 5, recorded 3",
        "  #3   @3      MISMATCH    expected Match(MessageSaved, username='carol')",
        pad + "recorded MessageSaved(timestamp=1700000000, username='bob', message='yo')",
        pad + "  - position: expected @4, recorded @3",
        pad + "  - username: expected 'carol', recorded 'bob'",
        "  #4           MISSING     "
        "expected UserCountLogged(timestamp=1, chat_users=2, connected_users=3)",
    ]


async def test_a_failing_assert_events_names_unexpected_events_and_fields(
    memory_store: EventStore,
) -> None:
    await memory_store.save_message("alice", "hi")
    await memory_store.save_message("alice", "again", timestamp=5)
    with pytest.raises(AssertionError) as failure:
        await assert_events(memory_store, [MessageSaved(DEFAULT_START, "alice", "ho")])
    lines = str(failure.value).splitlines()
    assert lines[0].endswith("(1 expected, 2 recorded):")
    assert "MISMATCH" in lines[1]
    assert lines[3].strip() == "- message: expected 'ho', recorded 'hi'"
    assert (
        "UNEXPECTED  recorded MessageSaved(timestamp=5, username='alice', message='again')"
        in (lines[4])
    )


async def test_a_failing_assert_events_shortens_huge_values(memory_store: EventStore) -> None:
    big = "x" * 1_048_576
    await memory_store.save_message("alice", big)
    with pytest.raises(AssertionError) as failure:
        await assert_events(memory_store, [])
    message = str(failure.value)
    assert len(message) < 400
    assert "(1048578 chars)" in message


@pytest.mark.parametrize("use_match", [False, True])
async def test_a_failing_assert_events_shows_where_long_strings_differ(
    memory_store: EventStore, fake_clock: FakeClock, use_match: bool
) -> None:
    text = "x" * 200 + "A" + "y" * 50
    await memory_store.save_message("alice", text)
    wrong = text.replace("A", "B")
    want: Any = (
        Match(MessageSaved, message=wrong)
        if use_match
        else MessageSaved(fake_clock.now, "alice", wrong)
    )
    with pytest.raises(AssertionError) as failure:
        await assert_events(memory_store, [want])
    message = str(failure.value)
    assert (
        "message: differs at character 200 (lengths 251 and 251): "
        "expected …'xxxxxxxxxxxxxxxxxxxxByyyyyyyyyyyyyyyyyyy'…, "
        "recorded …'xxxxxxxxxxxxxxxxxxxxAyyyyyyyyyyyyyyyyyyy'…"
    ) in message, message


async def test_a_failing_assert_events_tells_strings_that_print_alike_apart(
    memory_store: EventStore,
) -> None:
    """The word café with é as one code point, against e and a combining accent."""
    await memory_store.save_message("alice", "caf\u00e9")
    with pytest.raises(AssertionError) as failure:
        await assert_events(memory_store, [Match(MessageSaved, message="cafe\u0301")])
    assert "message: expected 'cafe\\u0301', recorded 'caf\\xe9' (alike once normalised)" in str(
        failure.value
    )


async def test_assert_events_tells_a_type_from_its_fields(memory_store: EventStore) -> None:
    await memory_store.update_channel_stats(max_users=3, timestamp=9)
    with pytest.raises(AssertionError, match="type: expected UserCountLogged, recorded"):
        await assert_events(memory_store, [UserCountLogged(9, 3, 0)])
    await assert_events(memory_store, [ChannelPeakRaised(9, 3, None)])


async def test_assert_events_rejects_what_cannot_be_expected(memory_store: EventStore) -> None:
    await memory_store.save_message("alice", "hi")
    with pytest.raises(TypeError, match="event or a Match"):
        await assert_events(memory_store, ["MessageSaved"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="pair"):
        await assert_events(memory_store, [(1, MessageSaved(1, "a", "b"), 3)])  # type: ignore[list-item]


# -- Match ---------------------------------------------------------------------------------
def test_match_compares_only_the_fields_it_names() -> None:
    event = MessageSaved(5, "alice", "hi")
    assert Match(MessageSaved) == event
    assert Match(MessageSaved, username="alice") == event
    assert Match(MessageSaved, username="alice", timestamp=5, message="hi") == event
    assert Match(MessageSaved, username="bob") != event
    assert Match(UserActionLogged, username="alice") != event
    assert Match(MessageSaved, username="bob").differences(event) == [
        "username: expected 'bob', recorded 'alice'"
    ]
    assert repr(Match(MessageSaved, username="bob")) == "Match(MessageSaved, username='bob')"


def test_match_does_not_take_a_bool_for_an_int() -> None:
    assert Match(UserCountLogged, chat_users=1) != UserCountLogged(0, True, 1)


def test_match_does_not_take_another_number_for_an_int() -> None:
    import enum
    from decimal import Decimal

    class Two(enum.IntEnum):
        TWO = 2

    event = UserCountLogged(1000, 2, 3)
    for near in (1000.0, Decimal(1000)):
        assert Match(UserCountLogged, timestamp=near) != event
    assert Match(UserCountLogged, chat_users=Two.TWO) != event
    assert Match(UserCountLogged, timestamp=1000, chat_users=2) == event


def test_match_asks_a_matcher_with_its_own_eq() -> None:
    from unittest.mock import ANY

    class Between:
        def __init__(self, lo: int, hi: int) -> None:
            self.lo, self.hi = lo, hi

        def __eq__(self, other: object) -> bool:
            return isinstance(other, int) and self.lo <= other <= self.hi

        def __repr__(self) -> str:
            return f"Between({self.lo}, {self.hi})"

    event = UserStatsSaved("alice", 1_700_000_000, chat_lines=1)
    assert Match(UserStatsSaved, username="alice", now=ANY) == event
    assert Match(UserStatsSaved, username="bob", now=ANY) != event
    assert Match(UserStatsSaved, now=Between(1_699_999_999, 1_700_000_001)) == event
    assert Match(UserStatsSaved, now=Between(0, 5)).differences(event) == [
        "now: expected Between(0, 5), recorded 1700000000"
    ]


def test_match_rejects_unknown_fields_and_non_events() -> None:
    with pytest.raises(TypeError, match="MessageSaved has no field user"):
        Match(MessageSaved, user="alice")
    with pytest.raises(TypeError, match="needs an event type"):
        Match(dict)  # type: ignore[arg-type]


# -- Scenario ------------------------------------------------------------------------------
async def test_scenario_then_sees_only_what_when_recorded(
    memory_store: EventStore, fake_clock: FakeClock
) -> None:
    scenario = Scenario(memory_store)
    await scenario.given([UserStatsSet("alice", 10, 20, 3, 0), MessageSaved(15, "alice", "old")])
    await scenario.then([])
    assert memory_store.position == 2
    result = await scenario.when(lambda s: s.save_user_stats("alice", chat_lines=1))
    assert result is None
    await scenario.then([(3, UserStatsSaved("alice", fake_clock.now, chat_lines=1))])
    # The given history counts: alice already had 3 lines.
    stats = await memory_store.get_user_stats("alice")
    assert stats is not None and stats["total_chat_lines"] == 4
    with pytest.raises(AssertionError, match="MISSING"):
        await scenario.then([Match(UserStatsSaved), Match(MessageSaved)])


async def test_scenario_when_raises(memory_store: EventStore) -> None:
    scenario = Scenario(memory_store)
    error = await scenario.when_raises(ValidationError, lambda s: s.save_message("", "hi"))
    assert "username" in str(error)
    await scenario.then([])
    with pytest.raises(AssertionError, match="did not raise"):
        await scenario.when_raises(ValidationError, lambda s: s.save_message("a", "hi"))


async def test_scenario_given_rejects_non_events(memory_store: EventStore) -> None:
    scenario = Scenario(memory_store)
    with pytest.raises(ValidationError, match="not an event"):
        await scenario.given(["hello"])  # type: ignore[list-item]
    assert memory_store.position == 0


# -- the contract runs outside this repo, in strict mode -----------------------------------
def test_a_downstream_project_can_run_the_contract_in_strict_mode(tmp_path: Path) -> None:
    (tmp_path / "test_downstream.py").write_text(
        textwrap.dedent(
            """\
            import pytest

            from eventstore import EventStore
            from eventstore.testing import StorageContract

            class TestDownstream(StorageContract):
                def make_store(self, clock, tmp_path):
                    return EventStore(":memory:", clock=clock)

            @pytest.mark.asyncio
            async def test_fixture(memory_store, fake_clock):
                await memory_store.save_message("a", "b")
                assert (await memory_store.get_recent_messages())[0]["timestamp"] == fake_clock.now
            """
        )
    )
    installed = any(
        e.name == "eventstore" and e.value == "eventstore.testing.plugin"
        for e in entry_points(group="pytest11")
    )
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    args += ["-o", "asyncio_mode=strict", "-o", "asyncio_default_fixture_loop_scope=function"]
    args += ["-k", "fixture or connect or zero or surrogate"]
    if not installed:
        args += ["-p", "eventstore.testing.plugin"]
    # The child loads plugins the ordinary way, whatever this run was told.
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and "failed" not in done.stdout, done.stdout


def _run_downstream(tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """Run pytest in ``tmp_path`` as a project that installed eventstore would."""
    installed = any(
        e.name == "eventstore" and e.value == "eventstore.testing.plugin"
        for e in entry_points(group="pytest11")
    )
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options]
    if not installed:
        args += ["-p", "eventstore.testing.plugin"]
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_store_fixtures_keep_to_the_function_loop(tmp_path: Path) -> None:
    # A project whose own async fixtures share one session loop sets
    # asyncio_default_fixture_loop_scope = "session"; that must not move the
    # kit's stores off the loop its function-scoped tests run on (the first
    # write failed with "attached to a different loop").  A test on a wider
    # loop cannot use disk_store at all, and is told so at setup.
    (tmp_path / "test_loops.py").write_text(
        textwrap.dedent(
            """\
            import pytest

            @pytest.mark.asyncio
            async def test_disk_on_the_function_loop(disk_store):
                await disk_store.save_message("a", "b")

            @pytest.mark.asyncio
            async def test_memory_on_the_function_loop(memory_store):
                await memory_store.save_message("a", "b")

            @pytest.mark.asyncio(loop_scope="module")
            async def test_disk_on_the_module_loop(disk_store):
                await disk_store.save_message("a", "b")

            @pytest.mark.asyncio(loop_scope="module")
            async def test_memory_on_the_module_loop(memory_store):
                await memory_store.save_message("a", "b")
            """
        )
    )
    options = ["-o", "asyncio_mode=strict", "-o", "asyncio_default_fixture_loop_scope=session"]
    done = _run_downstream(tmp_path, "-rE", *options)
    out = done.stdout + done.stderr
    assert "3 passed, 1 error" in out, out
    assert "ERROR test_loops.py::test_disk_on_the_module_loop" in out, out
    assert (
        "the disk_store fixture opens its store on the function-scoped event loop, "
        "but this test runs on the module-scoped one" in out
    ), out


def test_an_assertion_left_unawaited_fails_the_test(tmp_path: Path) -> None:
    # Without the await, assert_events and Scenario.then check nothing, and
    # the test passed with only Python's "coroutine was never awaited" warning.
    (tmp_path / "test_unawaited.py").write_text(
        textwrap.dedent(
            """\
            import pytest
            from eventstore.testing import Scenario, assert_events

            @pytest.mark.asyncio
            async def test_assert_events(memory_store):
                await memory_store.save_message("a", "b")
                assert_events(memory_store, [])

            @pytest.mark.asyncio
            async def test_then(memory_store):
                scenario = Scenario(memory_store)
                await scenario.when(lambda s: s.save_message("a", "b"))
                scenario.then([])

            @pytest.mark.asyncio
            async def test_awaited(memory_store):
                await memory_store.save_message("a", "b")
                await Scenario(memory_store).then([])
            """
        )
    )
    options = ["-o", "asyncio_mode=strict", "-o", "asyncio_default_fixture_loop_scope=function"]
    done = _run_downstream(tmp_path, *options)
    out = done.stdout + done.stderr
    assert "2 failed, 1 passed" in out, out
    assert "FAILED test_unawaited.py::test_awaited" not in out, out
    for what, line in [("assert_events(...)", 7), ("Scenario.then(...)", 13)]:
        assert f"never awaited, so it checked nothing: {what} at " in out, out
        assert f"test_unawaited.py:{line}" in out, out


def test_an_unawaited_assert_events_warns_where_it_was_made(memory_store: EventStore) -> None:
    with pytest.warns(RuntimeWarning, match="never awaited, so it checked nothing") as record:
        assert_events(memory_store, [])  # no await: dropped at once
    assert record[0].filename == __file__
    streams.unawaited.clear()  # this test meant it: the plugin need not fail it


def test_a_failing_assertion_shows_the_test_line_and_not_the_kit(tmp_path: Path) -> None:
    # pytest printed the kit's own frames under the test's line: the whole
    # source of assert_events (or Match.__init__, with a repr that failed),
    # longer than the report that matters.
    (tmp_path / "test_failing.py").write_text(
        textwrap.dedent(
            """\
            import pytest
            from eventstore.events import MessageSaved
            from eventstore.testing import Match, assert_events

            @pytest.mark.asyncio
            async def test_wrong_text(memory_store):
                await memory_store.save_message("a", "b")
                await assert_events(memory_store, [Match(MessageSaved, message="c")])

            @pytest.mark.asyncio
            async def test_typo(memory_store):
                await assert_events(memory_store, [Match(MessageSaved, mesage="c")])
            """
        )
    )
    options = ["-o", "asyncio_mode=strict", "-o", "asyncio_default_fixture_loop_scope=function"]
    done = _run_downstream(tmp_path, *options)
    out = done.stdout + done.stderr
    assert "2 failed" in out, out
    assert "- message: expected 'c', recorded 'b'" in out, out
    assert "MessageSaved has no field mesage" in out, out
    assert "test_failing.py:8: AssertionError" in out, out
    assert "test_failing.py:12: TypeError" in out, out
    assert "streams.py" not in out, out
    assert "raised in repr()" not in out, out


# -- an example: testing a bot handler by the events it records ----------------------------
async def on_chat(store: EventStore, user: str, text: str) -> None:
    """A bot's chat handler: count the line, then keep it (or log it as a command)."""
    now = store.clock()
    await store.save_user_stats(user, last_seen=now, chat_lines=1)
    if text.startswith("!"):
        await store.log_user_action(user, "command", text, timestamp=now)
    else:
        await store.save_message(user, text, timestamp=now)


async def test_on_chat_counts_and_keeps_a_line(
    memory_store: EventStore, fake_clock: FakeClock
) -> None:
    now = fake_clock.now
    scenario = Scenario(memory_store)
    await scenario.when(lambda s: on_chat(s, "alice", "hello"))
    await scenario.then(
        [
            UserStatsSaved("alice", now, None, now, 1, 0, None),
            MessageSaved(now, "alice", "hello"),
        ]
    )


async def test_on_chat_logs_a_command_instead_of_keeping_it(
    memory_store: EventStore, fake_clock: FakeClock
) -> None:
    scenario = Scenario(memory_store)
    await scenario.given([UserStatsSet("alice", 100, 200, 7, 0)])
    fake_clock.advance(60)
    await scenario.when(lambda s: on_chat(s, "alice", "!stats"))
    await scenario.then(
        [
            Match(UserStatsSaved, username="alice", last_seen=fake_clock.now, chat_lines=1),
            UserActionLogged(fake_clock.now, "alice", "command", "!stats"),
        ]
    )
    stats = await memory_store.get_user_stats("alice")
    assert stats is not None
    assert (stats["total_chat_lines"], stats["last_seen"]) == (8, fake_clock.now)
    assert await memory_store.get_recent_messages() == []


def test_an_assertion_left_unawaited_in_a_fixture_fails_the_test(tmp_path: Path) -> None:
    """Setup and teardown too: a fixture that checks the stream after the test."""
    (tmp_path / "test_fixture_unawaited.py").write_text(
        textwrap.dedent(
            """\
            import pytest
            import pytest_asyncio
            from eventstore.testing import assert_events

            @pytest_asyncio.fixture
            async def checked_after(memory_store):
                yield memory_store
                assert_events(memory_store, [])

            @pytest_asyncio.fixture
            async def checked_before(memory_store):
                assert_events(memory_store, [1])
                yield memory_store

            @pytest.mark.asyncio
            async def test_after(checked_after):
                await checked_after.save_message("a", "b")

            @pytest.mark.asyncio
            async def test_before(checked_before):
                pass
            """
        )
    )
    options = ["-o", "asyncio_mode=strict", "-o", "asyncio_default_fixture_loop_scope=function"]
    done = _run_downstream(tmp_path, "-rE", *options)
    out = done.stdout + done.stderr
    assert "1 passed, 2 warnings, 2 errors" in out, out  # the warnings: Python's own
    assert "never awaited in a fixture's teardown, so it checked nothing" in out, out
    assert "never awaited in a fixture's setup, so it checked nothing" in out, out
    assert "test_fixture_unawaited.py:8" in out and "test_fixture_unawaited.py:12" in out, out


def test_the_plugin_leaves_a_project_s_own_projections_module_alone(tmp_path: Path) -> None:
    """It loads in every pytest run of an environment with eventstore
    installed: importing the store there would import eventstore's top-level
    ``projections`` package, and a project's own module of that name would
    break (or be shadowed) in tests that never use the kit."""
    (tmp_path / "projections.py").write_text("def leaderboard():\n    return []\n")
    (tmp_path / "test_own.py").write_text(
        "import projections\n\n\ndef test_own():\n    assert projections.leaderboard() == []\n"
    )
    done = _run_downstream(tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "1 passed" in out, out
