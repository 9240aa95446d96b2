"""`--id-column` uniqueness, checked in memory that does not grow with the input.

The first IN_MEMORY_IDS ids are kept in a dict, so a repeat among them is refused at the row
that repeats, naming the id. Past that, each id's 128-bit hash and position are spilled to one
of SPILL_BUCKETS files by hash (a hash-partitioned on-disk check): ids are hashed HASH_CHUNK at
a time (their strings are not kept longer) and the 24-byte records written once SPILL_BUFFER of
them are held (6 MB); when the input ends each file is loaded alone and sorted, so memory is
one bucket: rows / 256 x 24 bytes (1.9 MB at 20M rows in one rank). A bucket over BUCKET_BYTES
(past ~90M rows in one rank) is first split by its hashes' next byte, streamed SPILL_BUFFER
records at a time, and each part checked the same way, so the check's memory stays flat at any
size (a billion rows: about 4 GB of buckets, each split in 256, ~0.4 MB a part). A repeat found there is
refused at the end of the rank's input, naming both rows; rows committed before are kept
(resume is by position, so they are still exactly once). Positions may come in any order: a
resume adds the rows it does first and its committed rows' ids last (pipeline/stages.py). Two different ids share a 128-bit hash with odds below 10^-20 at 10^9 rows.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import BatchgenError

IN_MEMORY_IDS = 100_000
SPILL_BUCKETS = 256
SPILL_BUFFER = 1 << 18  # hashed records held before a spill (6 MB)
BUCKET_BYTES = 1 << 23  # a spill file loaded whole to be checked (8 MB); larger ones are split
SPLIT_PARTS = 256  # the parts of a split bucket: one per value of a byte of the hash
HASH_CHUNK = 1 << 14  # id strings held before they are hashed (~2 MB of short ids)
_KEYS = ("batchgen-ids-one", "batchgen-ids-two")  # pandas' siphash takes 16-byte keys


class UniqueIds:
    """Refuses an --id-column value that is null or repeats within one rank's input."""

    def __init__(self, id_column: str, in_memory: int = IN_MEMORY_IDS) -> None:
        self.id_column = id_column
        self.in_memory = in_memory
        self._seen: dict[str, int] | None = {}
        self._buffer: list[tuple[list[str], range | list[int]]] = []  # ids not yet hashed
        self._buffered = 0
        self._records: list[Any] = []  # hashed, not yet spilled (numpy record arrays)
        self._held = 0
        self._dir: Path | None = None

    def add(self, values: list[Any], first: int) -> list[str]:
        """The ids (as strings) of rows at positions first, first+1, ...; raises on a null id
        and on a repeat found in memory."""
        ids = []
        for i, value in enumerate(values):
            if value is None:
                raise BatchgenError(
                    f"--id-column {self.id_column!r} is null in row {first + i}; ids must be "
                    "set and unique (omit --id-column to use row positions)"
                )
            ids.append(str(value))
        if self._seen is not None:
            for i, row_id in enumerate(ids):
                if row_id in self._seen:
                    a, b = sorted((self._seen[row_id], first + i))
                    raise self._repeat(f"the id {row_id!r} (rows {a:,} and {b:,})")
                self._seen[row_id] = first + i
            if len(self._seen) > self.in_memory:
                self._spill_seen()
        else:
            self._buffer.append((ids, range(first, first + len(ids))))
            self._buffered += len(ids)
            if self._buffered >= HASH_CHUNK:
                self._hash()
            if self._held >= SPILL_BUFFER:
                self._flush()
        return ids

    def finish(self) -> None:
        """Check the spilled ids (the input has ended); raises on a repeat."""
        if self._dir is None:
            return
        try:
            self._flush()
            for path in sorted(self._dir.iterdir()):
                self._check(path, 1)
        finally:
            self.close()

    def _check(self, path: Path, level: int) -> None:
        """Refuse a repeat among one spill file's ids: loaded whole and sorted, or, over
        BUCKET_BYTES, split first by the next byte of their first hash (a repeat's two records
        share every byte, so they land in one part) and each part checked alike."""
        import numpy as np

        if path.stat().st_size > BUCKET_BYTES and level < 8:
            parts = path.parent / f"{path.name}.{level}"
            parts.mkdir()
            with open(path, "rb") as f:
                while len(rec := np.fromfile(f, dtype=_record(), count=SPILL_BUFFER)):
                    _append_buckets(rec, parts, 8 * level, SPLIT_PARTS)
            path.unlink()  # the disk holds the ids once, not twice, while the parts are checked
            for part in sorted(parts.iterdir()):
                self._check(part, level + 1)
            return
        rec = np.fromfile(path, dtype=_record())
        order = np.lexsort((rec["pos"], rec["h2"], rec["h1"]))
        rec = rec[order]
        same = (rec["h1"][1:] == rec["h1"][:-1]) & (rec["h2"][1:] == rec["h2"][:-1])
        if same.any():
            i = int(np.argmax(same))
            a, b = int(rec["pos"][i]), int(rec["pos"][i + 1])
            raise self._repeat(f"one id in rows {a:,} and {b:,} of this rank's input")

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _repeat(self, what: str) -> BatchgenError:
        return BatchgenError(
            f"--id-column {self.id_column!r} repeats {what}; resume needs unique ids: pick a "
            "unique column or omit --id-column"
        )

    def _spill_seen(self) -> None:
        """Move the in-memory ids to the spill, HASH_CHUNK at a time: their strings are freed
        as they are hashed (all at once, the copies made to hash them were a ~40 MB peak)."""
        self._dir = Path(tempfile.mkdtemp(prefix="batchgen-ids-"))
        seen, self._seen = self._seen, None
        assert seen is not None
        while seen:
            chunk = [seen.popitem() for _ in range(min(HASH_CHUNK, len(seen)))]
            self._buffer = [([i for i, _ in chunk], [p for _, p in chunk])]
            self._buffered = len(chunk)
            del chunk
            self._hash()
            if self._held >= SPILL_BUFFER:
                self._flush()
        self._flush()

    def _hash(self) -> None:
        """Hash the buffered id strings into records, dropping the strings."""
        import numpy as np
        import pandas as pd

        if not self._buffer:
            return
        ids = np.array([i for chunk, _ in self._buffer for i in chunk], dtype=object)
        positions = np.fromiter((p for _, ps in self._buffer for p in ps), dtype="<i8")
        self._buffer, self._buffered = [], 0
        rec = np.empty(len(ids), dtype=_record())
        rec["h1"] = pd.util.hash_array(ids, hash_key=_KEYS[0], categorize=False)
        rec["h2"] = pd.util.hash_array(ids, hash_key=_KEYS[1], categorize=False)
        rec["pos"] = positions
        self._records.append(rec)
        self._held += len(rec)

    def _flush(self) -> None:
        """Append the held records to their buckets' files."""
        import numpy as np

        self._hash()
        if not self._records:
            return
        rec = np.concatenate(self._records)
        self._records, self._held = [], 0
        assert self._dir is not None
        _append_buckets(rec, self._dir, 0, SPILL_BUCKETS)


def _append_buckets(rec: Any, folder: Path, shift: int, buckets: int) -> None:
    """Append each record to the file of its bucket in `folder`: its first hash shifted right
    by `shift` bits, modulo `buckets` (the spill's buckets: the low byte; the parts of a split
    bucket: the next bytes)."""
    import numpy as np

    bucket = (rec["h1"] >> np.uint64(shift)) % np.uint64(buckets)
    order = np.argsort(bucket, kind="stable")
    rec, bucket = rec[order], bucket[order]
    bounds = np.searchsorted(bucket, np.arange(buckets + 1))
    for b in range(buckets):
        lo, hi = bounds[b], bounds[b + 1]
        if lo < hi:
            with open(folder / f"{b:03d}.bin", "ab") as f:
                rec[lo:hi].tofile(f)


def _record() -> Any:
    """One spilled id: its two 64-bit hashes and its position (numpy imported on use)."""
    import numpy as np

    return np.dtype([("h1", "<u8"), ("h2", "<u8"), ("pos", "<i8")])
