"""Click flags generated from the config dataclasses' fields (pipeline.options), and the configs
built back from the parsed flags. Nothing here names a setting: a field declares it once.

`group_options("engine")` is the decorator adding the engine group's flags to a command;
`build(EngineConfig, kw)` makes the dataclass from the values click parsed.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable
from functools import cache
from typing import Any

import click

from pipeline import config
from pipeline.config import EngineConfig, RunConfig, ServerConfig
from pipeline.errors import ConfigError
from pipeline.options import FIELD_DEFAULT, Option, flag_name, option_of
from pipeline.replicas import ReplicaConfig
from pipeline.sampling import SAMPLING_OPTIONS, SamplingConfig, SamplingOption

# The group of a field that names none: its class's. (seed and lora_column name "sampling",
# reuse names "output".)
SECTIONS: dict[type, str] = {
    config.SourceConfig: "input",
    config.PromptConfig: "prompt",
    EngineConfig: "engine",
    ServerConfig: "server",
    SamplingConfig: "sampling",
    config.OutputConfig: "output",
    RunConfig: "ranks",
    ReplicaConfig: "ranks",
    config.BenchConfig: "bench",
    config.MemoryBenchConfig: "bench-memory",
    config.ReuseLookupConfig: "bench-reuse",
    config.ScaleBenchConfig: "bench-scale",
    config.TuneConfig: "tune",
}
# Each group's flags in --help order: the fields of these classes in that group, in the order
# the classes declare them (the sampling group starts with SAMPLING_OPTIONS). A group of one
# class needs no entry: a new group is one dataclass and its line in SECTIONS.
GROUPS: dict[str, tuple[type, ...]] = {
    "input": (config.SourceConfig,),
    "prompt": (config.PromptConfig,),
    "engine": (EngineConfig,),
    "server": (ServerConfig,),
    "sampling": (SamplingConfig, RunConfig, EngineConfig),
    "output": (config.OutputConfig, RunConfig),
    "ranks": (RunConfig, ReplicaConfig),
}
_CLICK_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}


def _base_type(cls: type, name: str) -> Any:
    """The field's type without `| None` and without the tuple of a repeatable flag."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        hint = typing.get_args(hint)[0]
    return hint


def _click_option(cls: type, f: dataclasses.Field, spec: Option) -> Callable:
    """The click.option of one declared field."""
    long = flag_name(f)
    default = f.default if spec.flag_default is FIELD_DEFAULT else spec.flag_default
    if default is dataclasses.MISSING:
        default = None
    kind = _base_type(cls, f.name)
    how: dict[str, Any] = {"help": spec.help or None, "hidden": spec.hidden}
    if spec.metavar:
        how["metavar"] = spec.metavar
    if spec.negatable:
        names = [f"{long}/--no-{long[2:]}"]
        how["default"] = default
        how["show_default"] = default is not None
    elif kind is bool:
        # A plain switch can only turn a setting on; one that defaults on is `negatable`.
        assert default is False, f"{cls.__name__}.{f.name}: a switch defaults to False"
        names = [long]
        how["is_flag"] = True
    else:
        names = [long]
        how["multiple"] = spec.multiple
        if spec.choices:
            how["type"] = click.Choice(list(spec.choices))
        elif spec.file:
            how["type"] = click.Path(dir_okay=False)
            how.setdefault("metavar", "FILE")
        elif spec.minimum is not None:
            how["type"] = click.IntRange(min=spec.minimum)
        elif spec.parse is None and kind in _CLICK_TYPES:
            how["type"] = _CLICK_TYPES[kind]
        if not spec.multiple and default is not None:
            how["default"] = default
            how["show_default"] = True
    return click.option(*names, *spec.aliases, f.name, **how)


def _sampling_option(option: SamplingOption) -> Callable:
    """The click flag of one entry of pipeline.sampling.SAMPLING_OPTIONS."""
    if option.switch:
        return click.option(option.flag, is_flag=True, default=None, help=option.help)
    if option.from_file:
        return click.option(
            option.flag, metavar="FILE", type=click.Path(dir_okay=False), help=option.help
        )
    if option.multiple:
        return click.option(
            option.flag, multiple=True, metavar=option.kind.__name__.upper(), help=option.help
        )
    shown = {"show_default": True, "default": option.neutral} if option.name == "n" else {}
    return click.option(option.flag, type=option.kind, help=option.help, **shown)


@cache
def declared(group: str) -> tuple[tuple[type, dataclasses.Field, Option], ...]:
    """The declared fields of one group, in --help order."""
    return tuple(
        (cls, f, spec)
        for cls in GROUPS.get(group) or [c for c, g in SECTIONS.items() if g == group]
        for f in dataclasses.fields(cls)
        if (spec := option_of(f)) is not None and (spec.group or SECTIONS[cls]) == group
    )


def group_options(*groups: str) -> Callable[[Callable], Callable]:
    """A decorator adding the flags of these groups to a command, in this order."""
    decorators: list[Callable] = []
    for group in groups:
        if group == "sampling":
            decorators += [_sampling_option(o) for o in SAMPLING_OPTIONS]
        decorators += [_click_option(cls, f, spec) for cls, f, spec in declared(group)]
    return options(*decorators)


def options(*decorators: Callable) -> Callable[[Callable], Callable]:
    """Several click decorators as one, applied so the flags list in the order given."""

    def wrap(f: Callable) -> Callable:
        for d in reversed(decorators):
            f = d(f)
        return f

    return wrap


def field_values(cls: type, kw: dict[str, Any]) -> dict[str, Any]:
    """The values of `cls`'s declared fields among the parsed flags `kw`, converted to the
    fields' types; a field whose flag the command lacks is left to its default."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        spec = option_of(f)
        if spec is None or f.name not in kw:
            continue
        value = kw[f.name]
        if spec.parse is not None:
            try:
                value = spec.parse(value, flag_name(f))
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=flag_name(f)) from exc
        elif spec.multiple:
            value = tuple(value)
        values[f.name] = value
    return values


def build(cls: type, kw: dict[str, Any], **extra: Any) -> Any:
    """`cls` from the parsed flags (and `extra` fields); a ConfigError is a usage error."""
    try:
        return cls(**{**field_values(cls, kw), **extra})
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


def server_config(kw: dict[str, Any]) -> ServerConfig | None:
    """ServerConfig from the --server flags; None without --server, where the others are refused."""
    values = field_values(ServerConfig, kw)
    if values.pop("url") is None:
        defaults = ServerConfig("http://localhost/v1")
        given = [
            flag_name(f)
            for _, f, _ in declared("server")
            if f.name in values and values[f.name] != getattr(defaults, f.name)
        ]
        if given:
            raise click.UsageError(f"{', '.join(given)}: only with --server URL")
        return None
    return build(ServerConfig, kw)


def engine_config(kw: dict[str, Any], **extra: Any) -> EngineConfig:
    """EngineConfig from the engine flags shared by `run`, `plan`, `tune` and `bench`."""
    if "url" in kw and "server" not in extra:
        extra["server"] = server_config(kw)
    return build(EngineConfig, kw, **extra)


def run_config(kw: dict[str, Any]) -> RunConfig:
    """The RunConfig of the parsed flags of `run` (also `plan` and `tune`); the sections are
    checked in the order of --help, so the first bad flag is the one reported."""
    source = build(config.SourceConfig, kw)
    prompt_extra: dict[str, Any] = {}
    if source.openai_batch is not None:
        # Each line's body is the row's prompt and its own settings, through the
        # --sampling-column machinery; the line's custom_id and url are kept as columns.
        from pipeline.sources import openai_batch

        if kw.get("sampling_column"):
            raise click.UsageError(
                "--sampling-column: with --openai-batch each line's body gives its settings; "
                "drop it"
            )
        prompt_extra["request_column"] = openai_batch.REQUEST_COLUMN
        kw = {
            **kw,
            "sampling_column": openai_batch.SAMPLING_COLUMN,
            "keep_columns": ",".join(
                (*openai_batch.KEEP_COLUMNS, *_keep_columns(kw.get("keep_columns")))
            ),
        }
    prompt, engine = build(config.PromptConfig, kw, **prompt_extra), engine_config(kw)
    try:
        sampling = SamplingConfig.of(
            **field_values(SamplingConfig, kw), **{o.name: kw[o.name] for o in SAMPLING_OPTIONS}
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    return build(
        RunConfig,
        kw,
        source=source,
        prompt=prompt,
        engine=engine,
        sampling=sampling,
        output=build(config.OutputConfig, kw),
        engine_log=kw.get("engine_log", True),
    )


def _keep_columns(value: Any) -> tuple[str, ...]:
    """The --keep-columns a user gave, as click parsed them (a comma list, or a TOML list)."""
    if not value:
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(c.strip() for item in items for c in str(item).split(",") if c.strip())


def load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """--config FILE: a TOML file whose keys are long flag names; flags on the command line win."""
    if value is None:
        return None
    try:
        with open(value, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {value}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{value} is not valid TOML: {exc}") from exc
    # Keyed by long flag name, not parameter name: `--engine` is stored as `backend`.
    flags: dict[str, click.Option] = {
        opt[2:]: p
        for p in ctx.command.params
        if isinstance(p, click.Option) and p.name != "config"
        for opt in p.opts
        if opt.startswith("--")
    }
    defaults: dict[str, Any] = {}
    for key, item in data.items():
        param = flags.get(key.replace("_", "-"))
        if param is None:
            valid = ", ".join(sorted(flags))
            raise click.BadParameter(f"{value}: unknown key {key!r}; valid keys are: {valid}")
        if param.multiple and not isinstance(item, list):
            item = [item]
        defaults[param.name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def config_option(help: str = "TOML job config; keys are long flag names (flags override it)."):
    """--config FILE, read before every other flag so they override it."""
    return click.option(
        "--config",
        metavar="FILE",
        callback=load_config_file,
        is_eager=True,
        expose_value=False,
        help=help,
    )
