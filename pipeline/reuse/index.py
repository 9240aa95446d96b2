"""Key indexes on disk.

Per shard: at commit, beside `part-R-S.parquet`, a hidden `.part-R-S.keys` (Parquet, named so
that no `*.parquet` glob takes it for a shard) holding the request key and row position of
every prompt of the shard that is not an error row, sorted by key. It is written before the
shard is renamed into place, so every committed shard has one.

Per --reuse folder, per run: `MergedIndex.build` streams the shards' indexes into 256 bucket
files by the key's first byte (keys are digests, so buckets are even), then sorts one bucket at
a time (a bucket over SORT_BUDGET entries is split again by the next byte, so the build's memory
is bounded whatever the folder's size) and appends it to one flat file of entries (key, shard
number, row; 24 bytes, one per distinct key), plus a fence: the first key of every block of
BLOCK entries. A lookup of a batch finds each key's block in the fence (in memory: 16 bytes per
BLOCK keys, 3 MB at 100M) and reads that block with one `pread` (12 KB), so the process holds
no page of the index beyond the block it reads: its memory does not grow with the folder, and
the kernel's page cache (not the process) keeps the hot blocks.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

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
BLOCK = 512  # entries per block read by a lookup: 12 KB; the fence holds 1 key in BLOCK
SORT_BUDGET = 1 << 21  # entries sorted in memory at once (48 MB, ~150 MB with the sort's copies)
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


def key_index_rows(shard: Path) -> int:
    """The row count of the shard a key index was written for, read from the index's footer
    alone. Raises OSError or pyarrow.ArrowException when it is missing or unreadable,
    ValueError when it is not a batchgen key index."""
    raw = (pq.read_schema(key_index_path(shard)).metadata or {}).get(INDEX_META)
    if raw is None:
        raise ValueError("not a batchgen key index")
    return int(json.loads(raw)["shard_rows"])


class MergedIndex:
    """Every distinct key of a list of shards, sorted on disk; see the module docstring."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder = folder
        self.size = size
        self._fd: int | None = None
        self.fence = np.empty(0, dtype=KEY_DTYPE)
        self._buffer = np.empty(0, dtype=_ENTRY)  # the blocks of a batch, read by lookup
        if size:
            self.fence = np.fromfile(folder / "fence.bin", dtype=KEY_DTYPE)
            self._fd = os.open(folder / "entries.bin", os.O_RDONLY)

    @classmethod
    def build(
        cls,
        folder: Path,
        indexes: Iterator[tuple[np.ndarray, np.ndarray]],
        budget: int = SORT_BUDGET,
    ) -> MergedIndex:
        """Merge the shard indexes `indexes` (keys, rows; the i-th is shard number i) into
        `folder`, which must be empty; at most `budget` entries are sorted in memory at once."""
        folder.mkdir(parents=True, exist_ok=True)
        buckets = _partition(folder / "b", _shard_entries(indexes), 0)
        out = _SortedWriter(folder)
        try:
            for path in buckets:
                _sort_into(path, 0, budget, out)
        finally:
            out.close()
        return cls(folder, out.size)

    def mark_complete(self) -> None:
        """Record that the folder holds a whole index (a killed build leaves none)."""
        (self.folder / "complete").write_text(json.dumps({"size": self.size}))

    @staticmethod
    def complete(folder: Path) -> int | None:
        """The size of the whole index in `folder`, or None when there is none."""
        try:
            return int(json.loads((folder / "complete").read_text())["size"])
        except (OSError, ValueError, KeyError):
            return None

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For a batch of keys: a mask of those found, and (shard, row) of each found one."""
        found = np.zeros(len(keys), dtype=bool)
        if not self.size or not len(keys):
            return found, np.empty(0, dtype=LOC_DTYPE)
        assert self._fd is not None
        blocks = np.searchsorted(self.fence, keys, side="right") - 1  # -1: below every key
        # The blocks wanted, read in order and joined, are one sorted run of entries: a single
        # searchsorted finds every key of the batch in it.
        wanted = np.unique(blocks[blocks >= 0]).tolist()
        if len(self._buffer) < len(wanted) * BLOCK:  # kept: the batch's size bounds it
            self._buffer = np.empty(len(wanted) * BLOCK, dtype=_ENTRY)
        raw = memoryview(self._buffer.view(np.uint8))
        size, got = BLOCK * _ENTRY.itemsize, 0
        for block in wanted:  # read straight into the buffer: no copy of the blocks
            got += os.preadv(self._fd, [raw[got : got + size]], block * size)
        entries = self._buffer[: got // _ENTRY.itemsize]
        if not len(entries):
            return found, np.empty(0, dtype=LOC_DTYPE)
        pos = np.minimum(np.searchsorted(entries["key"], keys), len(entries) - 1)
        found = entries["key"][pos] == keys
        return found, entries[pos[found]][["shard", "row"]].astype(LOC_DTYPE)

    def close(self) -> None:
        """Close the entries file (the folder stays; its owner removes it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _shard_entries(indexes: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[np.ndarray]:
    """Each shard's index as entries (key, shard number, row)."""
    for shard_no, (keys, rows) in enumerate(indexes):
        entries = np.empty(len(keys), dtype=_ENTRY)
        entries["key"], entries["shard"], entries["row"] = keys, shard_no, rows
        yield entries


def _partition(prefix: Path, chunks: Iterable[np.ndarray], depth: int) -> list[Path]:
    """Append the entries of `chunks` to up to 256 files by their key's byte `depth`; the files
    written, in key order. One chunk is in memory at a time."""
    files: dict[int, BinaryIO] = {}
    try:
        for entries in chunks:
            entries = entries[np.argsort(entries["key"], kind="stable")]  # a no-op when sorted
            byte = np.frombuffer(entries["key"].tobytes(), dtype=np.uint8)[depth::KEY_BYTES]
            bounds = np.searchsorted(byte, np.arange(BUCKETS + 1), side="left")
            for b in np.flatnonzero(np.diff(bounds)).tolist():
                if b not in files:
                    files[b] = open(_bucket(prefix, b), "wb")  # noqa: SIM115
                files[b].write(entries[bounds[b] : bounds[b + 1]].tobytes())
    finally:
        for f in files.values():
            f.close()
    return [_bucket(prefix, b) for b in sorted(files)]


def _bucket(prefix: Path, byte: int) -> Path:
    return prefix.with_name(f"{prefix.name}-{byte:02x}.bin")


def _sort_into(path: Path, depth: int, budget: int, out: _SortedWriter) -> None:
    """Append the entries of bucket file `path`, sorted, to `out`, and remove the file; a
    bucket larger than `budget` entries is split again by the next byte of its keys."""
    count = path.stat().st_size // _ENTRY.itemsize
    if count <= budget or depth + 1 >= KEY_BYTES:
        entries = np.fromfile(path, dtype=_ENTRY)
        path.unlink()
        out.append(entries[np.argsort(entries["key"], kind="stable")])  # first shard first
        return
    step = max(budget, 1)
    chunks = (
        np.fromfile(path, dtype=_ENTRY, count=step, offset=i * _ENTRY.itemsize)
        for i in range(0, count, step)
    )
    parts = _partition(path.with_suffix(""), chunks, depth + 1)
    path.unlink()
    for part in parts:
        _sort_into(part, depth + 1, budget, out)


class _SortedWriter:
    """Appends sorted runs of entries to entries.bin, one entry per key (the first, so the
    first shard listed wins a tie), and every BLOCK-th key to fence.bin."""

    def __init__(self, folder: Path) -> None:
        self.entries = open(folder / "entries.bin", "wb")  # noqa: SIM115
        self.fence = open(folder / "fence.bin", "wb")  # noqa: SIM115
        self.size = 0
        self.last: bytes | None = None

    def append(self, entries: np.ndarray) -> None:
        if not len(entries):
            return
        keys = entries["key"]
        first = np.ones(len(entries), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        if self.last is not None and keys[0] == self.last:
            first[0] = False
        entries = entries[first]
        self.last = bytes(keys[-1])
        self.entries.write(entries.tobytes())
        self.fence.write(entries["key"][(-self.size) % BLOCK :: BLOCK].tobytes())
        self.size += len(entries)

    def close(self) -> None:
        self.entries.close()
        self.fence.close()
