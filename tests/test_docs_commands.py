"""Every `batchgen ...` command shown in README.md and docs/*.md parses with the real CLI: its
subcommand exists, its flags exist and its values convert (click's own parsing, callbacks
included, the command not invoked). A docs page added later is picked up by the glob."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from conftest import REPO

from pipeline.cli import main

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Fenced blocks of shell (untagged blocks too: they hold commands and their output).
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SHELL = {"", "sh", "bash", "shell", "console"}
# What stands before batchgen on a line: a prompt, environment settings, a path to it.
PROGRAM = re.compile(
    r"^(?:\$ )?(?:[A-Z_][A-Z0-9_]*=\S* )*(?:\S*/)?(batchgen|python3? -m pipeline)( |$)"
)
ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)=(\S.*)$")
SEPARATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1", "<<"}


def _commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command line with its continuations) of every batchgen command in the
    page's shell blocks, with the block's own variables (`COMMON="..."`) expanded."""
    text = path.read_text()
    found = []
    for fence in FENCE.finditer(text):
        if fence.group(1) not in SHELL:
            continue
        first = text.count("\n", 0, fence.start(2)) + 1
        lines = fence.group(2).splitlines()
        variables: dict[str, str] = {}
        i = 0
        while i < len(lines):
            start, line = i, lines[i].strip()
            # A backslash continues a line, and so does a quote still open at its end.
            while (line.endswith("\\") or not _closed(line)) and i + 1 < len(lines):
                i += 1
                line = line.removesuffix("\\") + " " + lines[i].strip()
            i += 1
            assignment = ASSIGNMENT.match(line)
            if PROGRAM.match(line):
                for name, value in variables.items():
                    line = re.sub(rf"\$\{{?{name}\b\}}?", lambda _, v=value: v, line)
                found.append((first + start, line))
            elif assignment and len(words := shlex.split(assignment[2])) == 1:
                variables[assignment[1]] = words[0]
    return found


def _closed(line: str) -> bool:
    try:
        shlex.split(line, comments=True)
    except ValueError:  # "No closing quotation"
        return False
    return True


def _args(line: str) -> list[str]:
    """The arguments after `batchgen`, up to the first pipe, redirection or comment."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;<>")
    lexer.whitespace_split = True
    words = list(lexer)
    at = next(i for i, w in enumerate(words) if w.endswith("batchgen") or w == "pipeline")
    args = []
    for word in words[at + 1 :]:
        if word in SEPARATORS or set(word) <= set("|&;<>") or word.startswith("#"):
            break
        if word != "...":  # flags the page leaves out on purpose
            args.append(word)
    return args


def _parse(args: list[str]) -> None:
    """Parse `batchgen ARGS` as click would before running it: down the subcommands, then the
    command's own flags and values (callbacks such as --config's included)."""
    command: click.Command = main
    # The group's context settings (-h beside --help) as click gives them: a context without them
    # would make click cache a help option without -h on the shared command objects.
    ctx = click.Context(main, info_name="batchgen", **main.context_settings)
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        sub = command.get_command(ctx, args[0])
        if sub is None:
            raise click.UsageError(f"no such command {args[0]!r}")
        ctx = click.Context(sub, info_name=args[0], parent=ctx, **sub.context_settings)
        command, args = sub, args[1:]
    with command.make_context(ctx.info_name, list(args), parent=ctx.parent) as parsed:
        assert parsed.command is command


CASES = [
    pytest.param(path, line, command, id=f"{path.relative_to(REPO)}:{line}")
    for path in DOCS
    for line, command in _commands(path)
]


def test_the_pages_show_commands():
    pages = {path.name for path in DOCS if _commands(path)}
    assert {"README.md", "ranks.md", "resume.md", "plan-show-report.md", "tune.md"} <= pages


@pytest.mark.parametrize(("path", "line", "command"), CASES)
def test_a_documented_command_parses(path, line, command, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # example configs and schemas are named relative to the repository
    args = _args(command)
    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        flag_value = value if name == "--config" and value else None
        if arg == "--config" and i + 1 < len(args):
            flag_value = args[i + 1]
        if flag_value is not None and not (REPO / flag_value).is_file():
            stand_in = tmp_path / Path(flag_value).name
            stand_in.write_text("")
            args[i if value else i + 1] = f"--config={stand_in}" if value else str(stand_in)
    try:
        _parse(args)
    except click.exceptions.Exit:
        pass  # --help, --version
    except click.ClickException as exc:
        pytest.fail(f"{path.name}:{line}: `{command}`: {exc.format_message()}")
