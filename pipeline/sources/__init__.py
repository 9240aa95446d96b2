"""Input readers. Each streams one rank's slice of the input as column batches with stable row ids.

Memory is bounded by one batch, never by the dataset: Parquet is read a row group slice at a
time, an Arrow-backed `datasets.Dataset` is sliced (memory-mapped), a streaming one iterated.

  base.py      the batch a reader yields, the Source protocol, the rows of each rank
  parquet.py   Parquet files, folders and globs (pyarrow)
  hf.py        Hugging Face datasets: hub ids, local folders, builders, save_to_disk
  limit.py     --limit N: the first N rows of a rank's slice
  listing.py   the input listing: every file's name, size, rows and digest, once per job
  openai_batch.py  OpenAI / Anthropic batch request JSONL, line by line
"""

from __future__ import annotations

import difflib

from pipeline.config import SourceConfig
from pipeline.errors import ConfigError
from pipeline.sources.base import Batch, Source, rank_range
from pipeline.sources.listing import ListingStore

__all__ = ["Batch", "ListingStore", "Source", "open_source", "rank_range", "require_columns"]


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


def open_source(
    cfg: SourceConfig, num_ranks: int = 1, rank: int = 0, store: ListingStore | None = None
) -> Source:
    """The reader for --parquet, --dataset or --openai-batch, positioned on one rank's slice
    (its first --limit rows only, with --limit). With `store`, a file input's listing is the
    job's, kept there (pipeline/sources/listing.py); `source.for_rank(r)` gives another rank's
    slice of the same input without reading it again."""
    source: Source
    if cfg.openai_batch is not None:
        from pipeline.sources.openai_batch import OpenAIBatchSource

        source = OpenAIBatchSource(cfg.openai_batch, num_ranks, rank, store)
    elif cfg.parquet is not None:
        from pipeline.sources.parquet import ParquetSource

        source = ParquetSource(cfg.parquet, num_ranks, rank, store)
    else:
        from pipeline.sources.hf import HFDatasetSource

        source = HFDatasetSource(cfg, num_ranks, rank)
    if cfg.limit is not None:
        from pipeline.sources.limit import LimitedSource

        source = LimitedSource(source, cfg.limit)
    return source
