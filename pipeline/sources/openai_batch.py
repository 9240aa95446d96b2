"""Batch request files (--openai-batch): OpenAI Batch API / `vllm run-batch` JSONL, or Anthropic
Message Batches JSONL; a file, a folder of *.jsonl (recursively) or a glob; read line by line.

Each non-blank line is one row whose id is its custom_id; the row carries the parsed request
(pipeline/batchfile.py) for the prompt builder, its own settings for the per-row settings
machinery (the --sampling-column path) and, for `batchgen export`, its position in the input,
its endpoint and the model it named.

Opening the source reads the input once, in bounded memory: it counts the rows (for rank
ranges), digests the files (for the resume fingerprint) and refuses a repeated custom_id, naming
both lines. The ids are not held in a set: each id's 64-bit hash and position go to a fixed
buffer, spilled to hash partitions in a temporary folder when it fills; each partition is then
sorted alone, and only hash collisions are read again to tell a real repeat from a collision.
"""

from __future__ import annotations

import glob
import hashlib
import json
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
from pipeline.sources import Batch, rank_range

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

    def __init__(self, spec: str, num_ranks: int = 1, rank: int = 0) -> None:
        self.spec = spec
        self.paths, root = _resolve(spec)
        self.names = [os.path.relpath(p, root) for p in self.paths]
        self.columns = list(_TYPES)
        self.files: list[list[Any]] = []
        total = self._scan()
        self.start, self.stop = rank_range(total, num_ranks, rank)
        self.total_rows = self.stop - self.start

    def field(self, name: str) -> pa.Field:
        return pa.field(name, _TYPES[name])

    def identity(self) -> dict[str, Any]:
        return {"kind": "openai_batch", "spec": self.spec, "files": self.files}

    def iter_batches(self, columns: list[str], batch_rows: int) -> Iterator[Batch]:
        ids: list[str] = []
        cols: dict[str, list[Any]] = {c: [] for c in columns}
        for position, name, line, raw in self._lines(self.start):
            if position >= self.stop:
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

    def _lines(self, skip: int = 0) -> Iterator[tuple[int, str, int, bytes]]:
        """(position, file name, 1-based line number, bytes) of every non-blank line from
        position `skip` on; lines before it are counted, not parsed."""
        position = 0
        for path, name in zip(self.paths, self.names, strict=True):
            with open(path, "rb") as fh:
                for number, raw in enumerate(fh, 1):
                    if not raw.strip():
                        continue
                    if position >= skip:
                        yield position, name, number, raw
                    position += 1

    def _scan(self) -> int:
        """Rows, file digests and the duplicate check, in one bounded pass."""
        spill = _HashSpill()
        position = 0
        try:
            for path, name in zip(self.paths, self.names, strict=True):
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
                self.files.append([name, path.stat().st_size, rows, digest.hexdigest()[:16]])
            suspects = spill.collisions()
        finally:
            spill.close()
        if suspects:
            self._refuse_repeat(suspects)
        return position

    def _refuse_repeat(self, suspects: set[int]) -> None:
        """Read the colliding rows' ids again; raise on the first id that really repeats."""
        first: dict[str, tuple[str, int]] = {}
        for position, name, line, raw in self._lines():
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
