"""--output-format jsonl: each committed Parquet shard also as JSON Lines, beside it.

The Parquet shards stay the run's truth: resume, `status`, `show`, `report`, `export`, `card`
and --reuse read them, so none of them has a second code path. With --output-format jsonl,
each shard's rows are written again as `part-R-S.jsonl` next to `part-R-S.parquet`, in the
same order, one JSON object per row, just after the Parquet rename and before the commit
record, and the same way: a temporary name, fsync, rename.

The promise kept: a JSONL file exists only beside its committed Parquet shard and holds the
same rows, so the JSONL files hold every committed row exactly once. A crash between the two
renames leaves a committed shard without its JSONL; the next run writes it when it opens the
rank (`sync_jsonl`), as it adopts the shard. A JSONL file whose shard is not kept (--overwrite,
a shard deleted by hand) is removed then too. The format is in the run's settings (a resume
cannot switch it and leave some shards without their JSONL).

Values JSON has no word for: `request_key` (bytes) is written as hex, and a non-finite float
(a -inf logprob) as null.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.records import ResultRow
from pipeline.sinks import (
    SHARD_RE,
    ParquetShardWriter,
    ShardInfo,
    fsync_dir,
    rank_dir,
    temp_path,
)

log = logging.getLogger("batchgen")
SUFFIX = ".jsonl"
READ_ROWS = 4096  # rows converted at a time, so a large shard is never held as Python objects


def jsonl_path(shard: Path) -> Path:
    """The JSONL file of the Parquet shard `shard`: part-R-S.jsonl beside part-R-S.parquet."""
    return shard.with_suffix(SUFFIX)


def json_value(value: Any) -> Any:
    """`value` (as pyarrow's to_pylist gives it) in words JSON has: bytes as hex, a
    non-finite float as None, lists and structs item by item."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: json_value(v) for k, v in value.items()}
    return value


def write_jsonl(shard: Path) -> Path:
    """Write the JSONL file of the committed Parquet shard `shard` (temporary name, fsync,
    rename): it appears complete or not at all. Its path."""
    final = jsonl_path(shard)
    tmp = temp_path(final)
    try:
        with pq.ParquetFile(shard) as pf, open(tmp, "w", encoding="utf-8") as f:
            for batch in pf.iter_batches(batch_size=READ_ROWS):
                for row in pa.Table.from_batches([batch]).to_pylist():
                    f.write(json.dumps(json_value(row), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
    return final


def sync_jsonl(out_dir: Path, rank: int, kept: list[str], make: bool) -> list[str]:
    """Bring a rank's JSONL files in line with its kept shards (names), as a run opens it:
    remove those whose shard is not kept, and (with `make`) write those a crash left out.
    What it did, in words, one note each."""
    folder = rank_dir(out_dir, rank)
    wanted = {Path(name).with_suffix(SUFFIX).name for name in kept} if make else set()
    notes = []
    for path in sorted(folder.glob(f"part-{rank:05d}-*{SUFFIX}")):
        if path.name not in wanted:
            path.unlink()
            notes.append(f"removed {path.name}: its shard is not part of this run")
    for name in sorted(kept) if make else []:
        shard = folder / name
        if SHARD_RE.match(name) and not jsonl_path(shard).exists():
            write_jsonl(shard)
            notes.append(f"wrote {jsonl_path(shard).name}, which a crash left out")
    return notes


class JsonlShardWriter(ParquetShardWriter):
    """The Parquet shard writer that also writes each committed shard's JSONL file, after the
    Parquet rename: a JSONL file never exists without its shard."""

    def write(self, rows: list[ResultRow], seq: int) -> ShardInfo:
        info = super().write(rows, seq)
        write_jsonl(rank_dir(self.out_dir, self.rank) / info.file)
        return info


def shard_writer(
    output_format: str,
    out_dir: Path,
    rank: int,
    schema: pa.Schema,
    metadata: dict[str, Any],
    kept: list[str],
) -> ParquetShardWriter:
    """The shard writer for --output-format, once the rank's JSONL files match its `kept`
    shards (names; see `sync_jsonl`)."""
    for note in sync_jsonl(out_dir, rank, kept, output_format == "jsonl"):
        log.warning("%s", note)
    cls = JsonlShardWriter if output_format == "jsonl" else ParquetShardWriter
    return cls(out_dir, rank, schema, metadata)
