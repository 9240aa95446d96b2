"""Parquet input: a file, a folder of them (recursively) or a glob, read in record batches."""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import BatchgenError, ConfigError
from pipeline.sources.base import Batch, rank_range
from pipeline.storage import is_url


@dataclass(slots=True)
class _ParquetFile:
    path: Path | str  # a str in the store's filesystem for URL inputs
    name: str  # relative name used in row ids
    num_rows: int
    row_group_rows: list[int]
    size: int
    footer: str  # digest of the Parquet footer: changes when the data does, even at equal size


class ParquetSource:
    """A Parquet file, a folder of them (recursively) or a glob, read in record batches.

    Rows are numbered across files in sorted name order; a rank owns a contiguous range of that
    numbering, so ranks split evenly however the rows are spread over files and row groups.
    A row's id is `<file name>:<row index in that file>`.
    """

    def __init__(self, spec: str, num_ranks: int = 1, rank: int = 0) -> None:
        self.spec = spec
        self.fs = None  # the store's filesystem for a URL; None for local files
        if is_url(spec):
            found = self._resolve_url(spec)
        else:
            paths, root = _resolve_parquet(spec)
            found = [(p, os.path.relpath(p, root), p.stat().st_size) for p in paths]
        self.files: list[_ParquetFile] = []
        schema: pa.Schema | None = None
        first_path: Path | str | None = None
        for path, name, size in found:
            try:
                meta = pq.ParquetFile(self._open(path, size))
            except (pa.ArrowInvalid, OSError) as exc:
                raise BatchgenError(
                    f"--parquet: {path} is not a readable Parquet file ({exc})"
                ) from exc
            file_schema = meta.schema_arrow
            if schema is None:
                schema, first_path = file_schema, path
            elif file_schema.names != schema.names:
                raise BatchgenError(
                    f"--parquet: {path} has columns {file_schema.names} but {first_path} has "
                    f"{schema.names}; give files of one schema"
                )
            else:
                for a, b in zip(schema, file_schema, strict=True):
                    if _arrow_kind(a.type) != _arrow_kind(b.type):
                        raise BatchgenError(
                            f"--parquet: column {a.name!r} is {b.type} in {path} but {a.type} in "
                            f"{first_path}; give files of one schema (cast one of them)"
                        )
            md = meta.metadata
            self.files.append(
                _ParquetFile(
                    path=path,
                    name=name,
                    num_rows=md.num_rows,
                    row_group_rows=[md.row_group(i).num_rows for i in range(md.num_row_groups)],
                    size=size,
                    footer=_footer_digest(self._open(path, size)),
                )
            )
            meta.close()
        assert schema is not None
        self.schema = schema
        self.columns = list(schema.names)
        total = sum(f.num_rows for f in self.files)
        self.start, self.stop = rank_range(total, num_ranks, rank)
        self.total_rows = self.stop - self.start

    def _resolve_url(self, spec: str) -> list[tuple[str, str, int]]:
        """(path, name, size) of the objects a URL names, with the store's filesystem."""
        from pipeline.storage.files import expand

        loc, files = expand(spec, ".parquet", "--parquet")
        self.fs = loc.fs
        return [(f.path, f.name, f.size) for f in files]

    def _open(self, path: Path | str, size: int):
        """A local path, or a reader of an object that fetches byte ranges, retried."""
        if self.fs is None:
            return path
        from pipeline.storage.files import RetryingReader

        return RetryingReader(self.fs, str(path), size)

    def field(self, name: str) -> pa.Field:
        return self.schema.field(name)

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "parquet",
            "spec": self.spec,
            "files": [[f.name, f.size, f.num_rows, f.footer] for f in self.files],
        }

    def iter_batches(self, columns: list[str], batch_rows: int) -> Iterator[Batch]:
        offset = 0  # global index of the current file's first row
        for f in self.files:
            if offset >= self.stop:
                return
            if offset + f.num_rows <= self.start:
                offset += f.num_rows
                continue
            yield from self._iter_file(f, offset, columns, batch_rows)
            offset += f.num_rows

    def _iter_file(
        self, f: _ParquetFile, file_offset: int, columns: list[str], batch_rows: int
    ) -> Iterator[Batch]:
        # Only the row groups that overlap this rank's range are opened.
        lo, hi = max(self.start - file_offset, 0), min(self.stop - file_offset, f.num_rows)
        groups, group_start, first_row = [], 0, None
        for i, n in enumerate(f.row_group_rows):
            if group_start < hi and group_start + n > lo:
                groups.append(i)
                first_row = group_start if first_row is None else first_row
            group_start += n
        if not groups:
            return
        # From a store, no pre-buffering: pyarrow would fetch every requested row group at once.
        with pq.ParquetFile(self._open(f.path, f.size), pre_buffer=self.fs is None) as pf:
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


def _arrow_kind(t: pa.DataType) -> str:
    """A type up to representation: string and large_string hold the same values."""
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    return str(t)


def _resolve_parquet(spec: str) -> tuple[list[Path], Path]:
    """Files named by --parquet, sorted, and the folder their ids are relative to."""
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        paths = [p for p in paths if p.is_file()]
        root = Path(_glob_root(os.path.expanduser(spec)))
        what = "matches no file"
    elif path.is_dir():
        paths = sorted(
            p
            for p in path.rglob("*.parquet")
            if p.is_file()
            and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
        )
        root = path
        what = "holds no .parquet file"
    elif path.is_file():
        paths, root = [path], path.parent
        what = ""
    else:
        raise ConfigError(f"--parquet {spec}: no such file or folder")
    if not paths:
        raise ConfigError(f"--parquet {spec}: {what}; give a .parquet file, a folder or a glob")
    return paths, root


def _glob_root(pattern: str) -> str:
    parts = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return str(Path(*parts)) if parts else "."


def _footer_digest(source) -> str:
    """A digest of a Parquet file's footer (schema, row groups, each column chunk's offsets,
    sizes and min/max statistics): one small read at the end of the file, and different for
    nearly any rewrite, including one that keeps the file's size and row count."""
    with open(source, "rb") if isinstance(source, Path) else source as fh:
        fh.seek(-8, os.SEEK_END)
        length = int.from_bytes(fh.read(4), "little")
        fh.seek(-(8 + length), os.SEEK_END)
        return hashlib.sha256(fh.read(length)).hexdigest()[:16]
