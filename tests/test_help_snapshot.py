"""Every command's --help, held as a snapshot: the flags generated from the config dataclasses
must read as the hand-written ones did, and any change to a flag shows up here as a diff.

To accept a deliberate change: `python tests/test_help_snapshot.py` rewrites the snapshots.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pipeline.cli import main

SNAPSHOTS = Path(__file__).parent / "snapshots" / "help"


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found += _commands(command, (*path, name))
        else:
            found.append((*path, name))
    return found


COMMANDS = _commands(main)


def _help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(main, [*path, "--help"], prog_name="batchgen", terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def _params(path: tuple[str, ...]) -> str:
    """Every parameter of the command as parsed, hidden ones too (--engine fake is one):
    what a flag sets, its names, type, default, and whether it repeats, counts or is hidden."""
    command: click.Command = main
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    lines = []
    for p in command.params:
        default = p.default if not callable(p.default) else "<callable>"
        lines.append(
            f"{' '.join(p.opts)}"
            + (f" / {' '.join(p.secondary_opts)}" if p.secondary_opts else "")
            + f" type={p.type.name} default={default!r} multiple={p.multiple}"
            + f" hidden={getattr(p, 'hidden', False)} flag={getattr(p, 'is_flag', False)}"
            + f" count={getattr(p, 'count', False)} required={p.required} name={p.name}"
        )
    return "\n".join(sorted(lines)) + "\n"


def _snapshot(path: tuple[str, ...], kind: str = "txt") -> Path:
    return SNAPSHOTS / (("-".join(path) or "batchgen") + "." + kind)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "batchgen")
def test_help_is_unchanged(path: tuple[str, ...]) -> None:
    assert _help(path) == _snapshot(path).read_text()


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "batchgen")
def test_params_are_unchanged(path: tuple[str, ...]) -> None:
    assert _params(path) == _snapshot(path, "params").read_text()


def test_every_snapshot_is_a_command() -> None:
    assert sorted(SNAPSHOTS.glob("*.txt")) == sorted(_snapshot(p) for p in COMMANDS)


if __name__ == "__main__":
    SNAPSHOTS.mkdir(parents=True, exist_ok=True)
    for path in COMMANDS:
        _snapshot(path).write_text(_help(path))
        _snapshot(path, "params").write_text(_params(path))
        print(_snapshot(path), file=sys.stderr)
