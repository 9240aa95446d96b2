"""`batchgen report`: one self-contained HTML page about an output folder."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import click_errors, output_folder, output_to_read


@click.command()
@click.argument("output", type=click.Path(file_okay=False), callback=output_folder)
@click.option(
    "--html",
    "html",
    required=True,
    metavar="FILE",
    help="Write the report here: one self-contained HTML page.",
)
def report(output: str, html: str) -> None:
    """Write an HTML report of an --output folder: settings, progress, tokens, errors, samples.

    Built from what is committed, so it can be made while the job runs; the page needs no
    network to view (example: batchgen report out/sample --html out/sample-report.html).
    """
    from pipeline.htmlreport import write_report

    with click_errors(usage=False):
        click.echo(write_report(output_to_read(output), Path(html)))
