"""Settings declared once: a config dataclass field carries its flag, help and default.

`option(...)` is `dataclasses.field(...)` with an `Option` in its metadata. The CLI generates
its flags from these fields (`pipeline.cli.flags`), `--config` TOML keys are the flags' long
names, and the Python API (`pipeline.run`) takes the dataclasses themselves, so the three cannot
disagree and a new setting is one field:

    @dataclass(frozen=True, slots=True)
    class OutputConfig:
        rows_per_shard: int = option(10_000, "Rows per shard; a shard is the unit of commit.")

gives `--rows-per-shard INTEGER` (default shown), the TOML key `rows-per-shard`, and
`OutputConfig(rows_per_shard=...)`. The flag's type comes from the field's annotation
(`int | None` -> INTEGER, `bool` -> an on/off flag); a sampling knob is declared in
`pipeline.sampling.SAMPLING_OPTIONS` instead. No click here: this module is the declaration.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

METADATA_KEY = "batchgen.option"
_UNSET: Any = dataclasses.MISSING


class _FieldDefault:
    """`Option.flag_default` when the flag's default is the field's own."""

    def __repr__(self) -> str:
        return "FIELD_DEFAULT"


FIELD_DEFAULT: Any = _FieldDefault()


@dataclass(frozen=True, slots=True)
class Option:
    """How one config field appears on the command line.

    `flag` is the long flag (default: the field's name with dashes); `aliases` are further
    names that set the same field (`--num-shards` for `--num-ranks`, `-o` for `--output`).
    `group` places the flag among its kin in `--help`; None: with its class's other fields
    (pipeline.cli.flags.SECTIONS names each class's group).
    `parse(value, flag)` turns the flag's value into the field's (ValueError: a usage error
    naming the flag). `flag_default` is the flag's default where it differs from the field's
    (None: "not given", resolved later, as a rank from the launcher is).
    A tuple field's flag is repeatable only with `multiple`; without it `parse` makes the
    tuple (`--replicas-per-gpu 1,2`).
    """

    help: str
    group: str | None = None
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    hidden: bool = False
    choices: tuple[str, ...] | None = None
    multiple: bool = False
    # --x/--no-x; with a field default of None a tri-state (on, off, let it decide)
    negatable: bool = False
    file: bool = False  # the value names a file (that need not exist yet): metavar FILE
    minimum: int | None = None  # an integer flag's least value, checked by click
    parse: Callable[[Any, str], Any] | None = None
    flag_default: Any = FIELD_DEFAULT


def option(default: Any = _UNSET, help: str = "", **how: Any) -> Any:
    """A dataclass field whose flag, help and default are declared here, once."""
    meta = {METADATA_KEY: Option(help=help, **how)}
    if default is _UNSET:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def option_of(f: dataclasses.Field) -> Option | None:
    """The `Option` a field declares, or None for a field with no flag."""
    return f.metadata.get(METADATA_KEY)


def flag_name(f: dataclasses.Field) -> str:
    """The long flag of a declared field: its own `flag`, else `--field-name`."""
    spec = option_of(f)
    assert spec is not None
    return spec.flag or "--" + f.name.replace("_", "-")


def key_values(example: str) -> Callable[[Any, str], tuple[tuple[str, Any], ...]]:
    """A `parse` for repeatable KEY=VALUE flags; values parsed as JSON where they parse
    (`true`, `0.5`, `{...}`), keys with dashes as underscores."""

    def parse(values: Any, flag: str) -> tuple[tuple[str, Any], ...]:
        parsed = []
        for item in values:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ValueError(f"{item!r}: expected KEY=VALUE, e.g. {flag} {example}")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            parsed.append((key.replace("-", "_"), value))
        return tuple(parsed)

    return parse


def key_value_option(help: str, flag: str, example: str) -> Any:
    """A repeatable KEY=VALUE flag (`--engine-arg enable_prefix_caching=true`) as a field of
    (key, JSON value) pairs."""
    return option(
        (), help, flag=flag, metavar="KEY=VALUE", multiple=True, parse=key_values(example)
    )


def comma_list(value: str | None, _flag: str) -> tuple[str, ...]:
    """A `parse` for a comma-separated list (`--keep-columns a,b`)."""
    return tuple(c.strip() for c in (value or "").split(",") if c.strip())
