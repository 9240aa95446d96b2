"""`batchgen model`: the bundled default model."""

from __future__ import annotations

import click

from pipeline.cli.common import click_errors, setup_logging


@click.group()
def model() -> None:
    """The bundled default model (SmolLM2-135M-Instruct)."""


@model.command("prepare")
def model_prepare() -> None:
    """Convert the bundled GGUF model to safetensors once (make install runs this)."""
    setup_logging(0)
    from pipeline.models import ensure_bundled_model

    with click_errors(usage=False):
        path = ensure_bundled_model()
    click.echo(str(path))
