"""Parquet input: a file, a folder of them (recursively) or a glob, read in record batches.

The files' row counts come from the job's input listing (pipeline/sources/listing.py); a rank
reads the footer of, and opens, only the files that hold its rows."""

from __future__ import annotations

import copy
import glob
import hashlib
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import BatchgenError, ConfigError
from pipeline.sources.base import Batch, rank_range
from pipeline.sources.listing import Listing, ListingStore, job_listing, save_listing
from pipeline.storage import is_url

log = logging.getLogger("batchgen")


@dataclass(slots=True)
class _ParquetFile:
    """One file this rank reads: where it is, its listing entry and its row groups."""

    path: Path | str  # a str in the store's filesystem for URL inputs
    name: str  # relative name used in row ids
    num_rows: int
    size: int  # as listed
    offset: int  # input position of its first row
    row_group_rows: list[int] | None = None  # from its footer, once read


class ParquetSource:
    """A Parquet file, a folder of them (recursively) or a glob, read in record batches.

    Rows are numbered across files in sorted name order; a rank owns a contiguous range of that
    numbering, so ranks split evenly however the rows are spread over files and row groups.
    A row's id is `<file name>:<row index in that file>`. Row counts come from the job's input
    listing (pipeline/sources/listing.py): a rank opens only the files that hold its rows.
    """

    def __init__(
        self, spec: str, num_ranks: int = 1, rank: int = 0, store: ListingStore | None = None
    ) -> None:
        self.spec = spec
        self.num_ranks = num_ranks
        self.fs = None  # the store's filesystem for a URL; None for local files
        found = self._resolve_url(spec) if is_url(spec) else _resolve_local(spec)
        self.paths = {name: path for path, name, _ in found}
        self.sizes = {name: size for _, name, size in found}
        present = [(name, size) for _, name, size in found]
        self.listing = job_listing(store, "parquet", spec, present, self._list_all)
        try:
            self._place(rank)
        except _Changed as exc:  # a file of this rank differs from the job's listing
            fresh = self._list_all()
            lines = self.listing.changes(fresh)
            log.warning(
                "--parquet %s: %s since this job listed its input; a run with this input is a "
                "run with other settings",
                spec,
                "; ".join(lines) or exc.args[0],
            )
            self.listing = fresh
            if store is not None and store.save:
                save_listing(store.state_dir, fresh)
            self._place(rank)

    def for_rank(self, rank: int) -> ParquetSource:
        """The same input positioned on another rank's slice, from the same listing, for
        `batchgen plan --all-ranks`: the files are not checked against the listing here (that
        would read every footer of the input again); each rank checks its own when it runs."""
        other = copy.copy(self)
        other._place(rank, check=False)
        return other

    def _place(self, rank: int, check: bool = True) -> None:
        """Position on one rank's rows; check the files that hold them against the listing
        (their footers: one small read each)."""
        listing = self.listing
        assert listing.schema is not None
        self.schema = pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(listing.schema)))
        self.columns = list(self.schema.names)
        self.start, self.stop = rank_range(listing.rows, self.num_ranks, rank)
        self.total_rows = self.stop - self.start
        self.files = []
        for index, offset in listing.owned(self.start, self.stop):
            name, size, rows, digest = listing.files[index]
            f = _ParquetFile(self.paths[name], name, rows, size, offset)
            f.row_group_rows = listing.row_groups.get(name)
            if f.row_group_rows is None and check:
                footer = self._footer(f.path, self.sizes[name])
                if (footer.size, footer.digest) != (size, digest):
                    raise _Changed(f"{name}: its size or footer differs from the listing's")
                f.row_group_rows = footer.row_groups
            self.files.append(f)

    def _list_all(self) -> Listing:
        """Read every file's footer (several at a time): the listing, computed once per job."""
        items = list(self.paths.items())
        workers = 16 if self.fs is not None else 4  # a store's latency, or a local disk's
        with ThreadPoolExecutor(workers) as pool:
            footers = list(pool.map(lambda it: self._footer(it[1], self.sizes[it[0]]), items))
        schema, first = footers[0].schema, items[0][1]
        files, groups = [], {}
        for (name, path), footer in zip(items, footers, strict=True):
            _check_schema(schema, footer.schema, first, path)
            files.append([name, footer.size, footer.rows, footer.digest])
            groups[name] = footer.row_groups
        return Listing("parquet", self.spec, files, schema.serialize().to_pybytes().hex(), groups)

    def _footer(self, path: Path | str, size: int | None) -> _Footer:
        try:
            return _read_footer(self._open(path, size))
        except (pa.ArrowInvalid, OSError, ValueError) as exc:
            raise BatchgenError(
                f"--parquet: {path} is not a readable Parquet file ({exc})"
            ) from exc

    def _resolve_url(self, spec: str) -> list[tuple[str, str, int]]:
        """(path, name, size) of the objects a URL names, with the store's filesystem."""
        from pipeline.storage.files import expand

        loc, files = expand(spec, ".parquet", "--parquet")
        self.fs = loc.fs
        return [(f.path, f.name, f.size) for f in files]

    def _open(self, path: Path | str, size: int | None):
        """A local path, or a reader of an object that fetches byte ranges, retried."""
        if self.fs is None:
            return path
        assert size is not None  # a store's listing gives every object's size
        from pipeline.storage.files import RetryingReader

        return RetryingReader(self.fs, str(path), size)

    def field(self, name: str) -> pa.Field:
        return self.schema.field(name)

    def identity(self) -> dict[str, Any]:
        return self.listing.identity()

    def iter_batches(
        self, columns: list[str], batch_rows: int, start: int = 0, stop: int | None = None
    ) -> Iterator[Batch]:
        # Rows of small files are gathered into batches of up to `batch_rows`: a prompt
        # builder call (and a tokenizer call) per batch, not one per five-row file.
        lo = self.start + start
        hi = self.stop if stop is None else min(self.start + stop, self.stop)
        ids: list[str] = []
        cols: dict[str, list[Any]] = {}
        for f in self.files:
            if f.offset >= hi or f.offset + f.num_rows <= lo:
                continue
            for more_ids, more_cols in self._iter_file(f, columns, batch_rows, lo, hi):
                if ids and len(ids) + len(more_ids) > batch_rows:
                    yield ids, cols
                    ids = []
                if not ids:
                    ids, cols = more_ids, more_cols
                    continue
                ids += more_ids
                for c in columns:
                    cols[c] += more_cols[c]
        if ids:
            yield ids, cols

    def _iter_file(
        self, f: _ParquetFile, columns: list[str], batch_rows: int, start: int, stop: int
    ) -> Iterator[Batch]:
        """The rows of `f` at input positions [start, stop)."""
        lo, hi = max(start - f.offset, 0), min(stop - f.offset, f.num_rows)
        # No pre-buffering: with it pyarrow keeps the buffers of the row groups it has read
        # (~34 MB more over a 20M-row file), and from a store it would fetch every requested
        # row group at once. Without it each column chunk is one read (a ranged GET).
        with pq.ParquetFile(self._open(f.path, f.size), pre_buffer=False) as pf:
            sizes = f.row_group_rows
            if sizes is None:  # not checked at the start (plan --all-ranks): from this footer
                sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
            # Only the row groups that overlap the wanted rows are read.
            groups, group_start, first_row = [], 0, None
            for i, n in enumerate(sizes):
                if group_start < hi and group_start + n > lo:
                    groups.append(i)
                    first_row = group_start if first_row is None else first_row
                group_start += n
            if not groups:
                return
            row = first_row
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
                b_lo, b_hi = max(lo - row, 0), min(hi - row, batch.num_rows)
                if b_lo < b_hi:
                    part = batch.slice(b_lo, b_hi - b_lo)
                    ids = [f"{f.name}:{i}" for i in range(row + b_lo, row + b_hi)]
                    yield ids, {c: part.column(c).to_pylist() for c in columns}
                row += batch.num_rows
                if row >= hi:
                    return


class _Changed(Exception):
    """A file this rank owns differs from the job's listing of it."""


@dataclass(slots=True)
class _Footer:
    size: int  # the file's
    rows: int
    row_groups: list[int]
    schema: pa.Schema
    digest: str


def _read_footer(source: Path | str | Any) -> _Footer:
    """One file's footer from one open: its digest (schema, row groups, each column chunk's
    offsets, sizes and min/max statistics: different for nearly any rewrite, including one that
    keeps the file's size and row count), row counts and schema."""
    with open(source, "rb") if isinstance(source, (Path, str)) else source as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(-8, os.SEEK_END)
        tail = fh.read(8)
        if tail[4:] != b"PAR1":
            raise ValueError("no Parquet footer at its end")
        length = int.from_bytes(tail[:4], "little")
        fh.seek(-(8 + length), os.SEEK_END)
        footer = fh.read(length)
    meta = pq.read_metadata(pa.py_buffer(b"PAR1" + footer + tail))
    return _Footer(
        size=size,
        rows=meta.num_rows,
        row_groups=[meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
        schema=meta.schema.to_arrow_schema(),
        digest=hashlib.sha256(footer).hexdigest()[:16],
    )


def _check_schema(schema: pa.Schema, other: pa.Schema, first: Any, path: Any) -> None:
    """Refuse a file whose columns differ from the first file's (up to representation)."""
    if other.names != schema.names:
        raise BatchgenError(
            f"--parquet: {path} has columns {other.names} but {first} has "
            f"{schema.names}; give files of one schema"
        )
    for a, b in zip(schema, other, strict=True):
        if _arrow_kind(a.type) != _arrow_kind(b.type):
            raise BatchgenError(
                f"--parquet: column {a.name!r} is {b.type} in {path} but {a.type} in "
                f"{first}; give files of one schema (cast one of them)"
            )


def _arrow_kind(t: pa.DataType) -> str:
    """A type up to representation: string and large_string hold the same values."""
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    return str(t)


def _resolve_local(spec: str) -> list[tuple[Path, str, int | None]]:
    """(path, name, size) of the local files --parquet names, sorted: names from a folder
    listing (no file opened, and no stat for a folder: the size is None then, checked by the
    file's owner), which every rank makes to notice a file added or removed."""
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        root = Path(_glob_root(os.path.expanduser(spec)))
        found = [(p, os.path.relpath(p, root), None) for p in paths if p.is_file()]
        what = "matches no file"
    elif path.is_dir():
        found = [(path / name, name, None) for name in _walk(path)]
        what = "holds no .parquet file"
    elif path.is_file():
        found, what = [(path, path.name, path.stat().st_size)], ""
    else:
        raise ConfigError(f"--parquet {spec}: no such file or folder")
    if not found:
        raise ConfigError(f"--parquet {spec}: {what}; give a .parquet file, a folder or a glob")
    return found


def _walk(folder: Path) -> list[str]:
    """Relative names of the .parquet files under `folder`, hidden names (".", "_") left out,
    in the order of their paths' parts (as sorted Paths are, so row numbering stays what
    earlier versions made); symlinked folders are not followed. One readdir per folder: no
    stat of a file whose entry says what it is."""
    found: list[list[str]] = []
    stack: list[tuple[list[str], str]] = [([], str(folder))]
    while stack:
        parts, where = stack.pop()
        with os.scandir(where) as entries:
            for e in entries:
                if e.name.startswith((".", "_")):
                    continue
                if e.is_dir(follow_symlinks=False):
                    stack.append(([*parts, e.name], e.path))
                elif e.name.endswith(".parquet") and e.is_file():
                    found.append([*parts, e.name])
    found.sort()
    return ["/".join(parts) for parts in found]


def _glob_root(pattern: str) -> str:
    parts = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return str(Path(*parts)) if parts else "."
