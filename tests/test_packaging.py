"""The wheel: every module in it, and the test kit usable from an installed copy.

The project's own tests run against an editable install, which reads the
source tree and so cannot notice a package left out of the wheel.  These
tests build the wheel and use the installed files, as a bot's project would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGES = ("eventstore", "projections", "cli")
PIP = (sys.executable, "-m", "pip")
QUIET = ("--quiet", "--disable-pip-version-check", "--no-deps")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: a build in the checkout leaves build/ and egg-info behind.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", *PACKAGES):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [*PIP, "wheel", *QUIET, "--no-build-isolation", "--wheel-dir", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("eventstore-*.whl")
    return built


def test_the_wheel_holds_every_module_and_the_plugin(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        p.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert sources - names == set()
    assert {"eventstore/py.typed", "projections/py.typed"} <= names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "eventstore = eventstore.testing.plugin" in text
    assert "eventstore = cli:run" in text
    assert "eventstore/testing/plugin.py" in names


def test_the_installed_test_kit_loads_without_pytest_asyncio(wheel: Path, tmp_path: Path) -> None:
    """A bot's project with eventstore and pytest, but not pytest-asyncio."""
    target = tmp_path / "site"
    subprocess.run(
        [*PIP, "install", *QUIET, "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    # pytest-asyncio is installed here, so hide it: an import of it fails,
    # and -p no:asyncio keeps pytest from loading it as a plugin.
    hidden = tmp_path / "hide" / "pytest_asyncio"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('pytest-asyncio is not installed')\n")
    project = tmp_path / "bot"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_bot.py").write_text(
        textwrap.dedent(
            f"""
            import eventstore
            from eventstore.testing import FakeClock, Match, assert_events

            def test_installed_copy_is_used():
                assert eventstore.__file__.startswith({str(target)!r})
                from eventstore import EventStore  # its projections found beside it

                assert EventStore.__module__ == "eventstore.store"

            def test_fake_clock_fixture(fake_clock):
                assert isinstance(fake_clock, FakeClock)

            def test_memory_store_fixture(memory_store):
                pass
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(hidden.parent)]))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:asyncio", "-p", "no:cacheprovider", "-rA"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    out = run.stdout + run.stderr
    assert "PASSED test_bot.py::test_installed_copy_is_used" in out, out
    assert "PASSED test_bot.py::test_fake_clock_fixture" in out, out
    # The fixture that needs pytest-asyncio says so, and nothing else breaks.
    assert "the memory_store fixture needs pytest-asyncio" in out, out
    assert "2 passed, 1 error" in out, out
