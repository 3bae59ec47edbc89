"""Every command is documented: in the README, and by a --help that ends with an
example; the README's test-kit example passes as copied."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cli.main import app

README = Path(__file__).resolve().parent.parent / "README.md"
COMMANDS: dict[str, Any] = dict(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def test_the_expected_commands_exist() -> None:
    assert sorted(COMMANDS) == sorted(
        [
            "info",
            "verify",
            "dump",
            "tail",
            "replay",
            "compact",
            "snapshot",
            "forget-user",
            "repair",
            "import-sqlite",
            "export",
            "demo",
        ]
    )


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_is_in_the_readme(name: str) -> None:
    readme = README.read_text()
    assert re.search(rf"eventstore {re.escape(name)}\b", readme), (
        f"README.md does not mention `eventstore {name}`"
    )


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_ends_with_an_example(name: str) -> None:
    help_text = COMMANDS[name].help
    assert help_text, f"{name} has no docstring"
    last = paragraphs(help_text)[-1]
    assert last.startswith(f"Example: eventstore {name}"), (
        f"the help of {name} must end with 'Example: eventstore {name} ...', got {last!r}"
    )
    assert "\n" not in last, "the example is one line"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_exits_0_and_shows_the_example(name: str) -> None:
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    example = paragraphs(COMMANDS[name].help)[-1]
    assert example in result.stdout


def test_app_help_lists_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.stdout


def test_no_arguments_shows_help() -> None:
    result = CliRunner().invoke(app, [])
    assert "Usage" in result.output
    assert "info" in result.output


def test_version_prints_the_package_version() -> None:
    from eventstore import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"eventstore {__version__}\n"


def test_dev_refuses_an_unknown_task() -> None:
    # A misspelt task in CI (./dev tset) must not exit 0 as if it had run.
    dev = Path(__file__).resolve().parent.parent / "dev"
    wrong = subprocess.run([str(dev), "tset"], capture_output=True, text=True, check=False)
    assert wrong.returncode == 2
    assert "unknown task 'tset'" in wrong.stderr
    helped = subprocess.run([str(dev), "help"], capture_output=True, text=True, check=False)
    assert helped.returncode == 0 and "./dev test" in helped.stdout


def test_the_readme_test_kit_example_passes_as_copied(tmp_path: Path) -> None:
    """Run as a user would: a file of its own, pytest-asyncio's default
    (strict) mode, none of this project's pytest settings."""
    readme = README.read_text()
    start = readme.index("```python\nimport pytest\n")
    code = readme[start + len("```python\n") : readme.index("```", start + 3)]
    (tmp_path / "test_example.py").write_text(code)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
