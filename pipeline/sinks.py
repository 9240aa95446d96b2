"""Parquet shard output: file naming, the explicit Arrow schema and the atomic commit.

A shard is written under a hidden temporary name, flushed to disk, then renamed; readers
(pyarrow, pandas, DuckDB, `datasets`) see a shard complete or not at all, because they skip
names starting with '.' and a rename is atomic.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.records import ResultRow

RESERVED_COLUMNS = (
    "id",
    "sample_index",
    "text",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "error",
    "prompt",
)
METADATA_KEY = b"batchgen"
SHARD_RE = re.compile(r"^part-(\d{5})-(\d{6})\.parquet$")
TMP_PREFIX = ".tmp-"
# Test-only fault injection for tests/test_kill_harness.py: "in_write:3" or "after_rename:3"
# announces the third shard of this process on stderr at that point and then hangs, so the
# test can SIGKILL it exactly inside the commit window it names. Unset in normal use.
TEST_PAUSE_ENV = "BATCHGEN_TEST_PAUSE"
_kill_test_pauses: dict[str, int] = {}


def shard_name(rank: int, seq: int) -> str:
    return f"part-{rank:05d}-{seq:06d}.parquet"


def output_schema(keep_prompt: bool, keep_fields: list[pa.Field]) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("error", pa.string()),
    ]
    if keep_prompt:
        fields.append(pa.field("prompt", pa.string()))
    return pa.schema(fields + [f.with_nullable(True) for f in keep_fields])


@dataclass(slots=True)
class ShardInfo:
    """What the manifest records about one committed shard."""

    file: str
    rows: int
    prompts: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    finish_reasons: dict[str, int]

    @classmethod
    def of(cls, file: str, rows: list[ResultRow]) -> ShardInfo:
        reasons: dict[str, int] = {}
        for r in rows:
            key = r.finish_reason if r.error is None else "error"
            reasons[key] = reasons.get(key, 0) + 1
        first_samples = [r for r in rows if r.sample_index == 0]
        return cls(
            file=file,
            rows=len(rows),
            prompts=len(first_samples),
            errors=sum(1 for r in rows if r.error is not None),
            prompt_tokens=sum(r.prompt_tokens or 0 for r in first_samples if r.error is None),
            completion_tokens=sum(r.completion_tokens or 0 for r in rows),
            finish_reasons=reasons,
        )


class ParquetShardWriter:
    """Writes one rank's shards into the output folder, each committed atomically."""

    def __init__(
        self,
        out_dir: Path,
        rank: int,
        schema: pa.Schema,
        metadata: dict[str, Any],
        fsync: bool = True,
    ) -> None:
        self.out_dir = out_dir
        self.rank = rank
        self.schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        self.fsync = fsync

    def table(self, rows: list[ResultRow]) -> pa.Table:
        columns: dict[str, list[Any]] = {
            "id": [r.id for r in rows],
            "sample_index": [r.sample_index for r in rows],
            "text": [r.text for r in rows],
            "finish_reason": [r.finish_reason for r in rows],
            "prompt_tokens": [r.prompt_tokens for r in rows],
            "completion_tokens": [r.completion_tokens for r in rows],
            "error": [r.error for r in rows],
        }
        for f in self.schema:
            if f.name == "prompt":
                columns["prompt"] = [r.prompt for r in rows]
            elif f.name not in columns:
                columns[f.name] = [r.passthrough.get(f.name) for r in rows]
        arrays = [pa.array(columns[f.name], type=f.type) for f in self.schema]
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def write(self, rows: list[ResultRow], seq: int) -> ShardInfo:
        """Write, flush and rename one shard; the shard exists complete or not at all."""
        name = shard_name(self.rank, seq)
        final = self.out_dir / name
        tmp = self.out_dir / f"{TMP_PREFIX}{name}.{os.getpid()}"
        rows = sorted(rows, key=lambda r: (r.seq, r.sample_index))  # input order within a shard
        try:
            with open(tmp, "wb") as f:
                pq.write_table(self.table(rows), f, compression="zstd")
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            _kill_test_pause("in_write", name)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            fsync_dir(self.out_dir)
        _kill_test_pause("after_rename", name)
        return ShardInfo.of(name, rows)


def _kill_test_pause(point: str, name: str) -> None:
    """See TEST_PAUSE_ENV: hang at the Nth shard's `point` of this process, for a kill test."""
    spec = os.environ.get(TEST_PAUSE_ENV)
    if not spec or not spec.startswith(point + ":"):
        return
    _kill_test_pauses[point] = count = _kill_test_pauses.get(point, 0) + 1
    if count == int(spec.partition(":")[2]):
        print(f"{TEST_PAUSE_ENV} {point} {name}", file=sys.stderr, flush=True)
        time.sleep(600)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_shard_metadata(path: Path) -> dict[str, Any] | None:
    """The batchgen metadata of a shard, or None if the file is not a readable batchgen shard."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError):
        return None
    raw = meta.get(METADATA_KEY)
    return json.loads(raw) if raw else None
