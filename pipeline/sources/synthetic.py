"""A synthetic input of many small Parquet files, for scale benches and tests: what a job over
20,000 input files looks like to the listing, the ranks and `batchgen plan`."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_parquet_inputs(folder: Path, files: int, rows_per_file: int) -> Path:
    """`files` Parquet files of `rows_per_file` rows each (a "prompt" column), named
    input-00000.parquet, ... so they sort; returns the folder (give it to --parquet)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        prompts = [f"Say something about item {i}-{j}." for j in range(rows_per_file)]
        pq.write_table(pa.table({"prompt": prompts}), folder / f"input-{i:05d}.parquet")
    return folder
