"""Every public module imports on its own, in a fresh interpreter.

Each runs in a new process: within this test session the packages are
already imported, and an import cycle only shows on a cold start.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FIRST_IMPORTS = [
    "import projections",
    "import projections.user_stats",
    "from projections import Projections",
    "import eventstore",
    "from eventstore import EventStore",
    "import eventstore.testing",
    "import cli.main",
]


@pytest.mark.parametrize("statement", FIRST_IMPORTS)
def test_module_imports_first_in_a_fresh_interpreter(statement: str) -> None:
    code = f"{statement}\nfrom eventstore import EventStore\nprint(EventStore.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "EventStore"


def test_unknown_attribute_of_the_package_is_an_attribute_error() -> None:
    import eventstore

    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        eventstore.NoSuchThing  # noqa: B018


def test_a_project_module_shadowing_projections_is_named(tmp_path: Path) -> None:
    # A bot's own projections.py, first on sys.path (its directory is the
    # working directory), hides the package the store's read models are in.
    (tmp_path / "projections.py").write_text("leaderboard = []\n")
    done = subprocess.run(
        [sys.executable, "-c", "from eventstore import EventStore"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: eventstore needs its package 'projections'"), last
    assert f"finds {tmp_path / 'projections.py'} first" in last
    assert "rename that module" in last
