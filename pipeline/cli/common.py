"""What every command shares: logging set-up, library errors as click errors, stop signals as an
exception (for the commands with nothing to commit), and the options a user gave (for the ranks
--data-parallel starts and the config `tune` writes)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import click

from pipeline.errors import BatchgenError, ConfigError

log = logging.getLogger("batchgen")


def setup_logging(verbose: int) -> None:
    """batchgen's log on stderr; -v: vLLM's too, -vv: debug."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s batchgen: %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    log.propagate = False
    if verbose == 0:
        # vLLM logs every engine detail at INFO; keep a batch job's log about the batch.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def logs_to_stderr() -> None:
    """vLLM logs to stdout by default; a command printing JSON promises stdout holds only it."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


@contextlib.contextmanager
def click_errors(usage: bool = True) -> Iterator[None]:
    """A library error as click's: a ConfigError is bad usage (exit 2, unless `usage` is
    False), any other BatchgenError a failure (exit 1), each printed as its one line."""
    try:
        yield
    except ConfigError as exc:
        if not usage:
            raise click.ClickException(str(exc)) from exc
        raise click.UsageError(str(exc)) from exc
    except BatchgenError as exc:
        raise click.ClickException(str(exc)) from exc


class Stopped(BaseException):
    """A stop signal, raised where a command that keeps no state waits (`tune` for a trial's
    engine or a verify pass, `bench` for a pass). A BaseException, so that no `except Exception`
    on the way takes it for a failure."""

    def __init__(self, signum: int) -> None:
        self.name = signal.Signals(signum).name
        super().__init__(self.name)


@contextlib.contextmanager
def stop_raises() -> Iterator[None]:
    """The first stop signal (SIGTERM, SIGINT, SIGUSR1) raises Stopped; later ones are ignored
    while the command closes its engines and workers. For commands with nothing to resume
    (a run drains and commits instead: pipeline/runner.py)."""
    from pipeline.launch import STOP_SIGNALS  # the launcher owns which signals stop batchgen

    raised = False

    def handler(signum: int, _frame: Any) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def close_engines_after(stop: Stopped) -> None:
    """The in-process engine a stopped command left (warm workers close with their context)."""
    from pipeline.engines import close_engines

    log.warning("%s received: closing the engines", stop.name)
    close_engines()


def given_options(ctx: click.Context, skip: tuple[str, ...] = ()) -> list[tuple[click.Option, Any]]:
    """The options given on the command line or in --config (not left at their defaults),
    with their values, in the command's order."""
    given = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in (*skip, "config"):
            continue
        source = ctx.get_parameter_source(param.name)
        if source in (None, click.core.ParameterSource.DEFAULT):
            continue
        given.append((param, ctx.params[param.name]))
    return given


def file_option(flag: str, help: str) -> Any:
    """An option naming a file (that need not exist yet)."""
    return click.option(flag, metavar="FILE", type=click.Path(dir_okay=False), help=help)


def long_flag(param: click.Option) -> str:
    """The first long name of an option (`--output` of `-o/--output`)."""
    return next(o for o in param.opts if o.startswith("--"))


def output_folder(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """OUTPUT of status/show/report/card/export: a URL is refused in one line, never read as a
    local path (`s3:` would otherwise be a folder name)."""
    from pipeline.storage import require_output_location

    try:
        require_output_location(value, "OUTPUT")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    return value


def output_to_read(value: str) -> Any:
    """The OUTPUT a reader reads: a local Path, or a StorePath once its store has answered the
    preflight (endpoint, credentials, bucket) within seconds, before reads that retry for
    minutes; a store that does not is one line (exit 1)."""
    from pipeline.storage.outpath import is_store, output_location
    from pipeline.storage.preflight import preflight

    try:
        out = output_location(value)
        if is_store(out):
            preflight(out.store.loc, write=False, flag="OUTPUT")
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    return out
