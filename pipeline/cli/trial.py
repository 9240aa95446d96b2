"""`batchgen try "prompt"`: one completion printed, for checking a model, its chat template and
the sampling flags before a job. It is a `batchgen run` on a one-row input in a temporary
folder, so the prompt is rendered, checked and generated exactly as a job's rows are. Stdout
holds the completion alone: vLLM's log records go to the engine log (as `run`'s do) or stderr."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cli.common import logs_to_stderr
from pipeline.errors import BatchgenError, ConfigError

# Flags of `run` that name the input or the output: `try` supplies both itself.
NOT_FOR_TRY = (
    "--input",
    "--parquet",
    "--dataset",
    "--data-files",
    "--output",
    "-o",
    "--output-format",
    "--limit",
)


def check_flags(args: list[str]) -> None:
    """Refuse the flags of `run` that `try` sets itself (ConfigError)."""
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in NOT_FOR_TRY:
            raise ConfigError(
                f"{flag}: batchgen try takes its one prompt as an argument and prints the "
                "completion; drop it, or use batchgen run for an input and an --output"
            )


@contextmanager
def one_prompt_run(prompt: str) -> Iterator[tuple[Path, Path]]:
    """A one-row input holding `prompt` and an output folder for it, in a temporary folder
    that is removed afterwards (kept when the run fails: its engine log is there)."""
    folder = Path(tempfile.mkdtemp(prefix="batchgen-try-"))
    source = folder / "prompt.parquet"
    pq.write_table(pa.table({"prompt": [prompt]}), source)
    yield source, folder / "out"
    shutil.rmtree(folder, ignore_errors=True)


def completions(out: Path) -> list[str]:
    """The texts of the one-row run in `out`, in sample order; its error if it became one."""
    table = pq.read_table(out, columns=["sample_index", "text", "error"]).sort_by("sample_index")
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    if errors:
        raise BatchgenError(f"the prompt became an error row: {errors[0]}")
    return [t or "" for t in table.column("text").to_pylist()]


TRY_EXAMPLES = """\b
Examples:
  batchgen try "What is the capital of France?" --chat --max-tokens 32
  batchgen try "Write a haiku about rain." --chat --system-prompt "You are a poet." \\
      --temperature 0.7 --seed 1 --model ./my-model
"""


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Everything written to stdout in this block (by this process or the engine processes it
    starts, which inherit the descriptor) goes to stderr, so stdout holds only the completion."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@click.command(
    "try",
    epilog=TRY_EXAMPLES,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("prompt")
@click.pass_context
def try_prompt(ctx: click.Context, prompt: str) -> None:
    """Generate a completion of PROMPT and print it: check a model, its chat template and the
    sampling flags before a job. Takes the prompt, engine and sampling flags of `run`
    (--chat, --system-prompt, --model, --max-tokens, --temperature, ...)."""
    from pipeline.cli.run import run

    try:
        check_flags(ctx.args)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    logs_to_stderr()
    with one_prompt_run(prompt) as (source, out):
        args = ["--parquet", str(source), "--prompt-column", "prompt", "--output", str(out)]
        with stdout_to_stderr():
            run.main([*args, *ctx.args], prog_name="batchgen try", standalone_mode=False)
        try:
            texts = completions(out)
        except BatchgenError as exc:
            raise click.ClickException(str(exc)) from exc
    for text in texts:
        click.echo(text)
