"""`batchgen status`: what each rank of an output folder has committed, and whether it is done."""

from __future__ import annotations

import json
import sys

import click

from pipeline.cli.common import click_errors, output_folder, output_to_read

STATUS_EPILOG = """\b
Each rank is one of: finished; running (its lock is held by a live process); interrupted
(stopped by a signal); crashed (its process died, e.g. killed or out of memory); failed (an
error it records, e.g. a full disk); not started. All but finished resume by rerunning the
same `batchgen run` command.
\b
Exit codes:
  0  every rank finished
  1  OUTPUT holds no batchgen run, or its state cannot be read
  2  bad usage
  3  incomplete: a rank is running, interrupted, crashed or not started
  4  failed: a rank failed; fix its error, then rerun to resume
"""


@click.command(epilog=STATUS_EPILOG)
@click.argument("output", type=click.Path(file_okay=False), callback=output_folder)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts.")
@click.option(
    "--stalled-after",
    type=click.FloatRange(min=0),
    default=600.0,
    show_default=True,
    metavar="SECONDS",
    help="Call a running rank stalled after this long without a commit.",
)
def status(output: str, as_json: bool, stalled_after: float) -> None:
    """Show what each rank of an --output folder has committed, and whether it is done.

    Up to 16 ranks, a block per rank; beyond, the fleet view: ranks by state, the ranks to act
    on, the slowest running ranks and the projected finish (--json: every rank, and the fleet).
    """
    from pipeline.status import read_status

    with click_errors(usage=False):
        report = read_status(output_to_read(output), stalled_after)
    click.echo(json.dumps(report.to_dict(), sort_keys=True) if as_json else report.render())
    sys.exit(report.exit_code)
