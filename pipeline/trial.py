"""`batchgen try "prompt"`: one completion printed, for checking a model, its chat template and
the sampling flags before a job. It is a `batchgen run` on a one-row input in a temporary
folder, so the prompt is rendered, checked and generated exactly as a job's rows are."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import BatchgenError, ConfigError

# Flags of `run` that name the input or the output: `try` supplies both itself.
NOT_FOR_TRY = ("--input", "--parquet", "--dataset", "--data-files", "--output", "-o", "--limit")


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
