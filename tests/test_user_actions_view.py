"""A user's actions are answered from memory; long details still come back exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventstore import EventStore
from projections.user_actions import DETAILS_IN_LOG, DETAILS_NONE


@pytest.mark.parametrize("where", ["memory", "disk"])
async def test_user_actions_with_short_long_and_no_details(tmp_path: Path, where: str) -> None:
    path = ":memory:" if where == "memory" else tmp_path / "s"
    store = EventStore(path, segment_size=4096)
    long = "x" * 65 + "\N{GRINNING FACE}\n\0"
    async with store:
        for i in range(60):
            await store.log_user_action("alice", "pm", details="!stats", timestamp=i)
            await store.log_user_action("alice", "join", details=None, timestamp=i)
            await store.log_user_action("alice", "pm", details=f"{long}{i}", timestamp=i)
            await store.log_user_action("bob", "pm", details="!stats", timestamp=i)
        actions = store.projections.actions
        alice = actions.users.get("alice")
        rows = zip(actions.row_user, actions.row_details, strict=True)
        codes = {d for u, d in rows if u == alice}
        assert DETAILS_NONE in codes and DETAILS_IN_LOG in codes and 0 in codes
        expected = await store.get_user_actions(username="alice", limit=1000)
        # The same rows as the log holds, through the unfiltered (log) path.
        from_log = [r for r in await store.get_user_actions(limit=1000) if r["username"] == "alice"]
        assert expected == from_log
        assert expected[0]["details"] == f"{long}59"
        pms = await store.get_user_actions(username="alice", action_type="pm", limit=3, offset=1)
        assert [r["details"] for r in pms] == ["!stats", f"{long}58", "!stats"]
        if where == "memory":
            return
    async with EventStore(tmp_path / "s", segment_size=4096) as again:  # from the snapshot
        assert await again.get_user_actions(username="alice", limit=1000) == expected
