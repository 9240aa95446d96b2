"""Input readers. Each streams one rank's slice of the input as column batches with stable row ids.

Memory is bounded by one batch, never by the dataset: Parquet is read a row group slice at a
time, an Arrow-backed `datasets.Dataset` is sliced (memory-mapped), a streaming one iterated.

  parquet.py   Parquet files, folders and globs (pyarrow)
  hf.py        Hugging Face datasets: hub ids, local folders, builders, save_to_disk
  limit.py     --limit N: the first N rows of a rank's slice
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any, Protocol

import pyarrow as pa

from pipeline.config import SourceConfig
from pipeline.errors import ConfigError

# One yielded batch: the ids of its rows and the requested columns as Python lists.
Batch = tuple[list[str], dict[str, list[Any]]]


class Source(Protocol):
    """What the runner needs from an input."""

    columns: list[str]
    total_rows: int | None  # rows in this rank's slice, when known up front

    def field(self, name: str) -> pa.Field: ...

    def identity(self) -> dict[str, Any]: ...

    def iter_batches(self, columns: list[str], batch_rows: int) -> Iterator[Batch]: ...


def rank_range(total: int, num_ranks: int, rank: int) -> tuple[int, int]:
    """The contiguous [start, stop) rows of `total` owned by one rank; sizes differ by at most 1."""
    base, extra = divmod(total, num_ranks)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def require_columns(source: Source, wanted: dict[str, str]) -> None:
    """Fail before any engine time if a flag names a column the input lacks."""
    for name, flag in wanted.items():
        if name not in source.columns:
            close = difflib.get_close_matches(name, source.columns, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{flag} {name!r}: no such column{hint}; the input's columns are: "
                f"{', '.join(source.columns)}"
            )


def open_source(cfg: SourceConfig, num_ranks: int = 1, rank: int = 0) -> Source:
    """The reader for --parquet or --dataset, positioned on one rank's slice (its first
    --limit rows only, with --limit)."""
    source: Source
    if cfg.parquet is not None:
        from pipeline.sources.parquet import ParquetSource

        source = ParquetSource(cfg.parquet, num_ranks, rank)
    else:
        from pipeline.sources.hf import HFDatasetSource

        source = HFDatasetSource(cfg, num_ranks, rank)
    if cfg.limit is not None:
        from pipeline.sources.limit import LimitedSource

        source = LimitedSource(source, cfg.limit)
    return source
