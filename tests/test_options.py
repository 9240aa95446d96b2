"""A config field declared with `option()` becomes a flag (name, type, default, help), a TOML key
and a dataclass argument at once: the mechanism behind every generated flag."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pipeline.cli import flags
from pipeline.options import comma_list, key_value_option, option


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """A stand-in config section with one field of each kind."""

    size: int = option(3, "How many.")
    ratio: float | None = option(None, "A share.", aliases=("--share",))
    name: str = option("x", "A name.", choices=("x", "y"))
    strict: bool = option(False, "Be strict.")
    eager: bool | None = option(None, "Eager or not.", negatable=True)
    columns: tuple[str, ...] = option((), "Columns.", parse=comma_list, flag_default=None)
    pairs: tuple[tuple[str, object], ...] = key_value_option("Pairs.", "--pair", "a=1")
    internal: int = 0  # no option(): no flag


@pytest.fixture
def demo(monkeypatch: pytest.MonkeyPatch) -> click.Command:
    monkeypatch.setitem(flags.SECTIONS, DemoConfig, "demo")
    monkeypatch.setitem(flags.GROUPS, "demo", (DemoConfig,))
    flags.declared.cache_clear()
    built: list[DemoConfig] = []

    @click.command()
    @flags.config_option()
    @flags.group_options("demo")
    def command(**kw: object) -> None:
        built.append(flags.build(DemoConfig, kw))

    command.built = built  # type: ignore[attr-defined]
    yield command
    flags.declared.cache_clear()


def test_each_field_is_one_flag_with_its_type_default_and_help(demo: click.Command) -> None:
    shown = {p.name: p for p in demo.params if p.name != "config"}
    assert list(shown) == ["size", "ratio", "name", "strict", "eager", "columns", "pairs"]
    assert (shown["size"].opts, shown["size"].type, shown["size"].default) == (
        ["--size"],
        click.INT,
        3,
    )
    assert shown["ratio"].opts == ["--ratio", "--share"]
    assert shown["name"].type.choices == ("x", "y")
    assert shown["strict"].is_flag and shown["eager"].secondary_opts == ["--no-eager"]
    assert shown["pairs"].multiple and shown["pairs"].opts == ["--pair"]
    text = CliRunner().invoke(demo, ["--help"], terminal_width=100).output
    assert "--size INTEGER" in text and "How many.  [default: 3]" in text


def test_flags_toml_and_defaults_build_the_dataclass(demo: click.Command, tmp_path: Path) -> None:
    toml = tmp_path / "job.toml"
    toml.write_text('share = 0.5\ncolumns = "a, b"\npair = ["k=true"]\n')
    result = CliRunner().invoke(
        demo, ["--config", str(toml), "--size", "7", "--no-eager", "--strict"]
    )
    assert result.exit_code == 0, result.output
    (cfg,) = demo.built  # type: ignore[attr-defined]
    assert cfg == DemoConfig(
        size=7, ratio=0.5, strict=True, eager=False, columns=("a", "b"), pairs=(("k", True),)
    )
    assert [f.name for f in dataclasses.fields(cfg)][-1] == "internal"


def test_a_bad_value_is_a_usage_error_naming_the_flag(demo: click.Command) -> None:
    result = CliRunner().invoke(demo, ["--pair", "novalue"])
    assert result.exit_code == 2
    assert result.output.endswith(
        "Error: Invalid value for --pair: 'novalue': expected KEY=VALUE, e.g. --pair a=1\n"
    )


@dataclass(frozen=True, slots=True)
class ModeConfig:
    """A stand-in kind of bench: a group of one class, named in SECTIONS only."""

    chat: bool = option(True, "On unless --no-chat.", negatable=True)
    schema: str | None = option(None, "A file.", file=True)
    rounds: int = option(0, "Rounds, 0 or more.", minimum=0)


def test_a_group_of_one_class_needs_only_its_section(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new group is one dataclass and its SECTIONS line; a negatable switch may default on
    (shown), `file` gives FILE, `minimum` a range click checks."""
    monkeypatch.setitem(flags.SECTIONS, ModeConfig, "mode")
    flags.declared.cache_clear()
    built: list[ModeConfig] = []

    @click.command()
    @flags.group_options("mode")
    def command(**kw: object) -> None:
        built.append(flags.build(ModeConfig, kw))

    flags.declared.cache_clear()
    text = CliRunner().invoke(command, ["--help"], terminal_width=100).output
    assert text.splitlines()[3:6] == [
        "  --chat / --no-chat      On unless --no-chat.  [default: chat]",
        "  --schema FILE           A file.",
        "  --rounds INTEGER RANGE  Rounds, 0 or more.  [default: 0; x>=0]",
    ]
    result = CliRunner().invoke(command, ["--no-chat", "--schema", "s.json", "--rounds", "2"])
    assert result.exit_code == 0, result.output
    assert built == [ModeConfig(chat=False, schema="s.json", rounds=2)]
    CliRunner().invoke(command, [])
    assert built[-1] == ModeConfig()
    result = CliRunner().invoke(command, ["--rounds", "-1"])
    assert result.exit_code == 2 and "-1 is not in the range x>=0" in result.output
