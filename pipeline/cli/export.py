"""`batchgen export`: a run's committed results in another format (OpenAI batch output lines)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import click_errors, output_folder, output_to_read

EXPORT_EXAMPLES = """
\b
Examples:
  batchgen export out/batch --openai-batch results.jsonl
  batchgen export out/batch --openai-batch results.jsonl --errors errors.jsonl
"""


@click.command(epilog=EXPORT_EXAMPLES)
@click.argument("output", type=click.Path(file_okay=False), callback=output_folder)
@click.option(
    "--openai-batch",
    "results",
    required=True,
    type=click.Path(dir_okay=False),
    help="Write OpenAI batch output lines (a run made with run --openai-batch), in input order.",
)
@click.option(
    "--errors",
    type=click.Path(dir_okay=False),
    help="Write the failed requests here instead of among the results (as OpenAI does).",
)
def export(output: str, results: str, errors: str | None) -> None:
    """Write a run's committed results in another format."""
    from pipeline.export import export_openai_batch

    with click_errors(usage=False):
        counts = export_openai_batch(
            output_to_read(output), Path(results), Path(errors) if errors else None
        )
    where = f" ({counts.failed:,} in {errors})" if errors else ""
    click.echo(
        f"{counts.requests:,} requests written to {results}: {counts.succeeded:,} succeeded, "
        f"{counts.failed:,} failed{where}"
    )
    if counts.missing:
        click.echo(
            f"{counts.missing:,} requests of the input are not committed yet (an unfinished "
            f"run): rerun the same `batchgen run` to complete them, then export again",
            err=True,
        )
