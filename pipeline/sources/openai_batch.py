"""Batch request files (--openai-batch): OpenAI Batch API / `vllm run-batch` JSONL, or Anthropic
Message Batches JSONL; a file, a folder of *.jsonl (recursively) or a glob; read line by line.

Each non-blank line is one row whose id is its custom_id; the row carries the parsed request
(pipeline/batchfile.py) for the prompt builder, its own settings for the per-row settings
machinery (the --sampling-column path) and, for `batchgen export`, its position in the input,
its endpoint and the model it named.

Listing the input reads it once, in bounded memory, once per job (pipeline/sources/listing.py):
it counts the rows (for rank ranges), digests the files (for the resume fingerprint) and
refuses a repeated custom_id, naming both lines. A rank then reads only its own files: once to
check their digests against the listing, once to generate. The ids are not held in a set: each id's 64-bit hash and position go to a fixed
buffer, spilled to hash partitions in a temporary folder when it fills; each partition is then
sorted alone, and only hash collisions are read again to tell a real repeat from a collision.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.batchfile import parse_line
from pipeline.errors import BatchgenError, ConfigError
from pipeline.sources.base import Batch, rank_range
from pipeline.sources.listing import Listing, ListingStore, job_listing, save_listing

log = logging.getLogger("batchgen")

# The columns this source yields: the parsed request, the row's settings, and what export needs.
REQUEST_COLUMN = "request"
SAMPLING_COLUMN = "sampling"
POSITION_COLUMN = "position"  # the row's index in the whole input, all files together
URL_COLUMN = "url"
MODEL_COLUMN = "model"
KEEP_COLUMNS = (POSITION_COLUMN, URL_COLUMN, MODEL_COLUMN)
_TYPES = {
    REQUEST_COLUMN: pa.string(),
    SAMPLING_COLUMN: pa.string(),
    POSITION_COLUMN: pa.int64(),
    URL_COLUMN: pa.string(),
    MODEL_COLUMN: pa.string(),
}
FLAG = "--openai-batch"
# The id of a line that has no usable custom_id (it is an error row).
_ID_PREFIX = re.compile(rb'^\s*\{\s*"custom_id"\s*:\s*("(?:[^"\\]|\\.)*")')


class OpenAIBatchSource:
    """Batch request lines, streamed; a rank owns a contiguous range of the rows."""

    def __init__(
        self, spec: str, num_ranks: int = 1, rank: int = 0, store: ListingStore | None = None
    ) -> None:
        self.spec = spec
        self.num_ranks = num_ranks
        paths, root = _resolve(spec)
        self.paths = {os.path.relpath(p, root): p for p in paths}
        self.columns = list(_TYPES)
        present = [(name, p.stat().st_size) for name, p in self.paths.items()]
        self.listing = job_listing(store, "openai_batch", spec, present, self._list_all)
        try:
            self._place(rank)
        except _Changed as exc:  # a file of this rank differs from the job's listing
            fresh = self._list_all()
            lines = self.listing.changes(fresh) or [str(exc)]
            log.warning("%s %s: %s since this job listed its input", FLAG, spec, "; ".join(lines))
            self.listing = fresh
            if store is not None and store.save:
                save_listing(store.state_dir, fresh)
            self._place(rank)

    def for_rank(self, rank: int) -> OpenAIBatchSource:
        """The same input positioned on another rank's rows, from the same listing."""
        other = copy.copy(self)
        other._place(rank)
        return other

    def _place(self, rank: int) -> None:
        """Position on one rank's rows; check the files that hold them against the listing
        (their bytes' digest: a rank reads its own files twice, nobody else's)."""
        listing = self.listing
        self.start, self.stop = rank_range(listing.rows, self.num_ranks, rank)
        self.total_rows = self.stop - self.start
        self.owned: list[tuple[str, Path, int]] = []  # (name, path, first row's position)
        for index, offset in listing.owned(self.start, self.stop):
            name, _, _, digest = listing.files[index]
            path = self.paths[name]
            if name not in listing.row_groups and _file_digest(path) != digest:
                raise _Changed(f"{name}: its bytes differ from the listing's")
            self.owned.append((name, path, offset))

    def field(self, name: str) -> pa.Field:
        return pa.field(name, _TYPES[name])

    def identity(self) -> dict[str, Any]:
        return self.listing.identity()

    def iter_batches(
        self, columns: list[str], batch_rows: int, start: int = 0, stop: int | None = None
    ) -> Iterator[Batch]:
        ids: list[str] = []
        cols: dict[str, list[Any]] = {c: [] for c in columns}
        first = self.start + start
        end = self.stop if stop is None else min(self.start + stop, self.stop)
        for position, name, line, raw in _lines(self.owned, first):
            if position >= end:
                break
            request = parse_line(_decode(raw), line, name)
            ids.append(request.custom_id or f"<{name} line {line}>")
            values = {
                REQUEST_COLUMN: request,
                SAMPLING_COLUMN: request.sampling or None,
                POSITION_COLUMN: position,
                URL_COLUMN: request.url,
                MODEL_COLUMN: request.model,
            }
            for c in columns:
                cols[c].append(values[c])
            if len(ids) == batch_rows:
                yield ids, cols
                ids, cols = [], {c: [] for c in columns}
        if ids:
            yield ids, cols

    def _list_all(self) -> Listing:
        """Rows, file digests and the duplicate check over every file, in one bounded pass:
        the listing, computed once per job."""
        spill = _HashSpill()
        position = 0
        files = []
        try:
            for name, path in self.paths.items():
                digest, rows = hashlib.sha256(), 0
                with open(path, "rb") as fh:
                    for raw in fh:
                        digest.update(raw)
                        if not raw.strip():
                            continue
                        custom_id = _custom_id(raw)
                        if custom_id is not None:
                            spill.add(_hash(custom_id), position)
                        position += 1
                        rows += 1
                files.append([name, path.stat().st_size, rows, digest.hexdigest()[:16]])
            suspects = spill.collisions()
        finally:
            spill.close()
        if suspects:
            self._refuse_repeat(suspects, files)
        return Listing("openai_batch", self.spec, files, row_groups={f[0]: [] for f in files})

    def _refuse_repeat(self, suspects: set[int], files: list[list[Any]]) -> None:
        """Read the colliding rows' ids again; raise on the first id that really repeats."""
        first: dict[str, tuple[str, int]] = {}
        everything, offset = [], 0
        for name, _, rows, _ in files:
            everything.append((name, self.paths[name], offset))
            offset += rows
        for position, name, line, raw in _lines(everything):
            if position not in suspects:
                continue
            custom_id = _custom_id(raw)
            if custom_id in first:
                where, at = first[custom_id]
                at_text = f"line {at}" if where == name else f"line {at} of {where}"
                raise ConfigError(
                    f"{FLAG} {self.spec}: custom_id {custom_id!r} is on {at_text} and again on "
                    f"line {line} of {name}; custom_ids must be unique (OpenAI refuses such a file "
                    "too): give one of them another id"
                )
            first[custom_id] = (name, line)


class _Changed(Exception):
    """A file this rank owns differs from the job's listing of it."""


def _lines(
    files: list[tuple[str, Path, int]], skip: int = 0
) -> Iterator[tuple[int, str, int, bytes]]:
    """(position, file name, 1-based line number, bytes) of every non-blank line of `files`
    (each with the input position of its first row) from position `skip` on; lines before it
    are counted, not parsed."""
    for name, path, position in files:
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                if position >= skip:
                    yield position, name, number, raw
                position += 1


def _file_digest(path: Path) -> str:
    """A file's bytes' digest, as the listing records it."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class _HashSpill:
    """(64-bit id hash, position) pairs: a fixed buffer, spilled to hash partitions on disk."""

    BUFFER = 1 << 18  # pairs held in memory (4 MiB)
    PARTS = 64  # partitions: each is sorted alone, 1/64 of the pairs (16 GiB at 10^9 rows)

    def __init__(self) -> None:
        import numpy as np

        self.np = np
        self.buf = np.empty((self.BUFFER, 2), dtype=np.uint64)
        self.n = 0
        self.dir: str | None = None

    def add(self, h: int, position: int) -> None:
        self.buf[self.n] = (h, position)
        self.n += 1
        if self.n == self.BUFFER:
            self._flush()

    def _flush(self) -> None:
        np = self.np
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="batchgen-ids-")
        pairs = self.buf[: self.n]
        part = pairs[:, 0] % self.PARTS
        for p in np.unique(part):
            with open(os.path.join(self.dir, f"{int(p):03d}"), "ab") as fh:
                pairs[part == p].tofile(fh)
        self.n = 0

    def collisions(self) -> set[int]:
        """Positions whose id hash another position shares."""
        if self.dir is None:
            return self._colliding(self.buf[: self.n])
        self._flush()
        found: set[int] = set()
        for name in sorted(os.listdir(self.dir)):
            pairs = self.np.fromfile(os.path.join(self.dir, name), dtype=self.np.uint64)
            found |= self._colliding(pairs.reshape(-1, 2))
        return found

    def _colliding(self, pairs: Any) -> set[int]:
        np = self.np
        if len(pairs) < 2:
            return set()
        pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
        same = pairs[1:, 0] == pairs[:-1, 0]
        hits = np.concatenate([same, [False]]) | np.concatenate([[False], same])
        return {int(p) for p in pairs[hits, 1]}

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _hash(custom_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(custom_id.encode(), digest_size=8).digest(), "big")


def _custom_id(raw: bytes) -> str | None:
    """A line's custom_id without parsing the whole line where it comes first (the usual
    layout); None if it has none usable (that line becomes an error row)."""
    match = _ID_PREFIX.match(raw)
    try:
        if match is not None:
            value = json.loads(match.group(1))
        else:
            value = json.loads(raw).get("custom_id")
    except (ValueError, AttributeError):  # not JSON, or not an object
        return None
    return value if isinstance(value, str) and value else None


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace")  # json.loads then names the bad spot


def _resolve(spec: str) -> tuple[list[Path], Path]:
    """Files named by --openai-batch, sorted, and the folder their names are relative to."""
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        paths = [p for p in paths if p.is_file()]
        root = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else path
    elif path.is_dir():
        paths = sorted(
            p
            for p in path.rglob("*.jsonl")
            if p.is_file() and not any(s.startswith((".", "_")) for s in p.relative_to(path).parts)
        )
        root = path
    elif path.is_file():
        paths, root = [path], path.parent
    else:
        raise ConfigError(f"{FLAG} {spec}: no such file or folder")
    if not paths:
        raise ConfigError(f"{FLAG} {spec}: no .jsonl file there; give a JSONL file, folder or glob")
    for p in paths:
        if not os.access(p, os.R_OK):
            raise BatchgenError(f"{FLAG} {p}: not readable; fix its permissions")
    return paths, root
