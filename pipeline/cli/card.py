"""`batchgen card`: (re)write an output folder's dataset card."""

from __future__ import annotations

import click

from pipeline.cli.common import click_errors, output_folder, output_to_read


@click.command()
@click.argument("output", type=click.Path(file_okay=False), callback=output_folder)
def card(output: str) -> None:
    """Write OUTPUT/README.md, the dataset card: features, data files, how the data was made.

    `run --card` writes it when a run finishes; this (re)writes it for any committed output, so
    that `datasets.load_dataset(OUTPUT)` and a Hub upload take the folder as it is.
    """
    from pipeline.card import write_card

    with click_errors(usage=False):
        click.echo(write_card(output_to_read(output)))
