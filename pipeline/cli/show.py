"""`batchgen show`: committed rows of an output folder, for a person to read."""

from __future__ import annotations

import shutil
import sys

import click

from pipeline.cli.common import click_errors, output_folder, output_to_read

SHOW_EPILOG = """\b
Examples:
  batchgen show out/sample --limit 5
  batchgen show out/sample --where finish_reason=length --sample 3 --seed 1
  batchgen show out/sample --errors
  batchgen show out/sample --id sample-007 --id sample-012
\b
--where compares a column with a value (COL=VALUE, or COL!=VALUE); repeat it to require
several. Rows are printed in output order, wrapped to the terminal, through a pager on a
terminal and as plain text when piped. Only committed shards are read, so it is safe to run
while the job runs.
"""


@click.command(epilog=SHOW_EPILOG)
@click.argument("output", type=click.Path(file_okay=False), callback=output_folder)
@click.option(
    "--where",
    multiple=True,
    metavar="COL=VALUE",
    help="Only rows whose column COL equals VALUE (COL!=VALUE: differs); repeatable.",
)
@click.option("--errors", is_flag=True, help="Only error rows.")
@click.option(
    "--id", "ids", multiple=True, metavar="ID", help="Only the row with this id; repeatable."
)
@click.option(
    "--sample", type=click.IntRange(min=1), metavar="N", help="A random N of the matching rows."
)
@click.option("--seed", type=int, help="Seed of --sample [default: 0].")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Show at most N rows.")
def show(
    output: str,
    where: tuple[str, ...],
    errors: bool,
    ids: tuple[str, ...],
    sample: int | None,
    seed: int | None,
    limit: int | None,
) -> None:
    """Print committed rows of an --output folder for a person to read."""
    from pipeline.show import render, select

    if seed is not None and sample is None:
        raise click.UsageError("--seed goes with --sample N")
    out = output_to_read(output)
    with click_errors():
        sel = select(out, where, errors, ids, sample, seed or 0, limit)
    text = render(sel, out, shutil.get_terminal_size((100, 24)).columns)
    if sys.stdout.isatty():
        click.echo_via_pager(text)
    else:
        click.echo(text)
