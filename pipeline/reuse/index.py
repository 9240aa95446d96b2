"""Key indexes on disk.

Per shard: at commit, beside `part-R-S.parquet`, a hidden `.part-R-S.keys` (Parquet, named so that no `*.parquet` glob takes it for a shard) holding the
request key and row position of every prompt of the shard that is not an error row, sorted by
key. It is written before the shard is renamed into place, so every committed shard has one.

Per --reuse folder, per run: `MergedIndex.build` streams the shards' indexes into 256 bucket
files by the key's first byte (keys are digests, so buckets are even), then sorts one bucket
at a time and appends it to two flat files: the keys (16 bytes each, sorted) and where each
row is (shard number, row). Lookups memory-map them and binary-search a whole batch of keys
at once (numpy.searchsorted), so a batch costs O(batch x log N) page reads and no structure
in memory grows with the folder: the build holds one bucket (N / 256 keys), a lookup only the
pages it touches, which the kernel may drop at any time.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.reuse.keys import KEY_BYTES

if TYPE_CHECKING:
    from pipeline.records import ResultRow

KEY_DTYPE = np.dtype(f"S{KEY_BYTES}")
LOC_DTYPE = np.dtype([("shard", "<u4"), ("row", "<u4")])
_ENTRY = np.dtype([("key", KEY_DTYPE), ("shard", "<u4"), ("row", "<u4")])
BUCKETS = 256
INDEX_META = b"batchgen_keys"


def key_index_path(shard: Path) -> Path:
    """Where a shard's key index lives: beside it, hidden from readers of the folder."""
    return shard.with_name(f".{shard.stem}.keys")


def write_key_index(shard: Path, rows: list[ResultRow]) -> None:
    """Write the key index of a shard about to be committed; `rows` in the shard's order."""
    keys, positions = [], []
    for i, r in enumerate(rows):
        if r.sample_index == 0 and r.error is None and r.request_key is not None:
            keys.append(r.request_key)
            positions.append(i)
    write_index(
        shard, np.array(keys, dtype=KEY_DTYPE), np.array(positions, dtype=np.uint32), len(rows)
    )


def write_index(shard: Path, keys: np.ndarray, positions: np.ndarray, shard_rows: int) -> None:
    """Write a shard's key index: `keys` (KEY_DTYPE) of the prompts at `positions`, unsorted."""
    order = np.argsort(keys, kind="stable")
    keys, positions = keys[order], positions[order]
    table = pa.table(
        {
            "key": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(KEY_BYTES), len(keys), [None, pa.py_buffer(keys.tobytes())]
            ),
            "row": pa.array(positions, type=pa.uint32()),
        }
    )
    meta = json.dumps({"shard": shard.name, "shard_rows": shard_rows})
    table = table.replace_schema_metadata({INDEX_META: meta})
    path = key_index_path(shard)
    tmp = path.with_name(f".tmp{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_key_index(shard: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(keys, rows, the shard's row count) of a committed shard's key index. Raises OSError or
    pyarrow.ArrowException when it is missing or unreadable, ValueError when it is not one."""
    table = pq.read_table(key_index_path(shard))
    raw = (table.schema.metadata or {}).get(INDEX_META)
    if raw is None:
        raise ValueError("not a batchgen key index")
    keys = table.column("key").combine_chunks()
    data = keys.buffers()[1]
    key_array = np.frombuffer(
        data, dtype=KEY_DTYPE, count=len(keys), offset=keys.offset * KEY_BYTES
    )
    rows = table.column("row").to_numpy()
    return key_array, rows, json.loads(raw)["shard_rows"]


class MergedIndex:
    """Every key of a list of shards, sorted on disk; see the module docstring."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder = folder
        self.size = size
        self._keys: np.ndarray | None = None
        self._locs: np.ndarray | None = None
        if size:
            self._keys = np.memmap(folder / "keys.bin", dtype=KEY_DTYPE, mode="r")
            self._locs = np.memmap(folder / "locs.bin", dtype=LOC_DTYPE, mode="r")

    @classmethod
    def build(cls, folder: Path, indexes: Iterator[tuple[np.ndarray, np.ndarray]]) -> MergedIndex:
        """Merge the shard indexes `indexes` (keys, rows; the i-th is shard number i) into
        `folder`, which must be empty."""
        folder.mkdir(parents=True, exist_ok=True)
        bucket_files = [open(folder / f"bucket-{b:03d}.bin", "wb") for b in range(BUCKETS)]  # noqa: SIM115
        try:
            for shard_no, (keys, rows) in enumerate(indexes):
                entries = np.empty(len(keys), dtype=_ENTRY)
                entries["key"], entries["shard"], entries["row"] = keys, shard_no, rows
                first = np.frombuffer(keys.tobytes(), dtype=np.uint8)[::KEY_BYTES]
                bounds = np.searchsorted(first, np.arange(BUCKETS + 1), side="left")
                for b in np.flatnonzero(np.diff(bounds)):
                    bucket_files[b].write(entries[bounds[b] : bounds[b + 1]].tobytes())
        finally:
            for f in bucket_files:
                f.close()
        size = 0
        with (
            open(folder / "keys.bin", "wb") as keys_out,
            open(folder / "locs.bin", "wb") as locs_out,
        ):
            for b in range(BUCKETS):
                path = folder / f"bucket-{b:03d}.bin"
                entries = np.fromfile(path, dtype=_ENTRY)
                path.unlink()
                order = np.argsort(entries["key"], kind="stable")  # the first shard wins a tie
                entries = entries[order]
                keys_out.write(entries["key"].tobytes())
                locs_out.write(entries[["shard", "row"]].astype(LOC_DTYPE).tobytes())
                size += len(entries)
        return cls(folder, size)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For a batch of keys: a mask of those found, and (shard, row) of each found one."""
        if not self.size or not len(keys):
            return np.zeros(len(keys), dtype=bool), np.empty(0, dtype=LOC_DTYPE)
        assert self._keys is not None and self._locs is not None
        pos = np.searchsorted(self._keys, keys)
        clipped = np.minimum(pos, self.size - 1)
        found = (pos < self.size) & (self._keys[clipped] == keys)
        return found, np.asarray(self._locs[clipped[found]])

    def close(self) -> None:
        self._keys = self._locs = None
