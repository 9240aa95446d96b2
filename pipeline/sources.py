"""Input readers. Each streams one rank's slice of the input as column batches with stable row ids.

Memory is bounded by one batch, never by the dataset: Parquet is read a row group slice at a
time, an Arrow-backed `datasets.Dataset` is sliced (memory-mapped), a streaming one iterated.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import SourceConfig
from pipeline.errors import BatchgenError, ConfigError

# One yielded batch: the ids of its rows and the requested columns as Python lists.
Batch = tuple[list[str], dict[str, list[Any]]]


class Source(Protocol):
    """What the runner needs from an input."""

    columns: list[str]
    total_rows: int | None  # rows in this rank's slice, when known up front

    def field(self, name: str) -> pa.Field: ...

    def identity(self) -> dict[str, Any]: ...

    def iter_batches(self, columns: list[str], batch_rows: int) -> Iterator[Batch]: ...


def rank_range(total: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    """The contiguous [start, stop) rows of `total` owned by one rank; sizes differ by at most 1."""
    base, extra = divmod(total, num_shards)
    start = shard_index * base + min(shard_index, extra)
    return start, start + base + (1 if shard_index < extra else 0)


def require_columns(source: Source, wanted: dict[str, str]) -> None:
    """Fail before any engine time if a flag names a column the input lacks."""
    for name, flag in wanted.items():
        if name not in source.columns:
            raise ConfigError(
                f"{flag} {name!r}: no such column; the input's columns are: "
                f"{', '.join(source.columns)}"
            )


def open_source(cfg: SourceConfig, num_shards: int = 1, shard_index: int = 0) -> Source:
    if cfg.parquet is not None:
        return ParquetSource(cfg.parquet, num_shards, shard_index)
    return HFDatasetSource(cfg, num_shards, shard_index)


@dataclass(slots=True)
class _ParquetFile:
    path: Path
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

    def __init__(self, spec: str, num_shards: int = 1, shard_index: int = 0) -> None:
        self.spec = spec
        paths, root = _resolve_parquet(spec)
        self.files: list[_ParquetFile] = []
        schema: pa.Schema | None = None
        first_path: Path | None = None
        for path in paths:
            try:
                meta = pq.ParquetFile(path)
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
                    name=os.path.relpath(path, root),
                    num_rows=md.num_rows,
                    row_group_rows=[md.row_group(i).num_rows for i in range(md.num_row_groups)],
                    size=path.stat().st_size,
                    footer=_footer_digest(path),
                )
            )
            meta.close()
        assert schema is not None
        self.schema = schema
        self.columns = list(schema.names)
        total = sum(f.num_rows for f in self.files)
        self.start, self.stop = rank_range(total, num_shards, shard_index)
        self.total_rows = self.stop - self.start

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
        with pq.ParquetFile(f.path) as pf:
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


class HFDatasetSource:
    """A Hugging Face dataset: a hub id, a local dataset folder or builder with --data-files, or
    a `save_to_disk` folder. A row's id is `<split>:<row index in the split>`."""

    def __init__(self, cfg: SourceConfig, num_shards: int = 1, shard_index: int = 0) -> None:
        self.cfg = cfg
        self.num_shards, self.shard_index = num_shards, shard_index
        self.ds = _load_dataset(cfg)
        features = self.ds.features
        if features is None:  # a streaming dataset whose features are unknown until read
            first = next(iter(self.ds.take(1)), None)
            if first is None:
                raise BatchgenError(f"--dataset {cfg.dataset}: split {cfg.split!r} is empty")
            self.ds = self.ds._resolve_features()
            features = self.ds.features
        self.schema: pa.Schema = features.arrow_schema
        self.columns = list(self.schema.names)
        if cfg.streaming:
            known = _streaming_total(self.ds, cfg.split)
            self.start, self.stop = 0, None
            self.total_rows = None if known is None else len(range(shard_index, known, num_shards))
        else:
            self.start, self.stop = rank_range(len(self.ds), num_shards, shard_index)
            self.total_rows = self.stop - self.start

    def field(self, name: str) -> pa.Field:
        return self.schema.field(name)

    def identity(self) -> dict[str, Any]:
        cfg = self.cfg
        ident: dict[str, Any] = {
            "kind": "datasets",
            "dataset": cfg.dataset,
            "config_name": cfg.config_name,
            "split": cfg.split,
            "revision": cfg.revision,
            "streaming": cfg.streaming,
            "data_files": [[p, _size_or_none(p)] for p in cfg.data_files],
        }
        fingerprint = getattr(self.ds, "_fingerprint", None)
        local = Path(cfg.dataset).expanduser()
        if local.is_dir():
            ident["files"] = _folder_signature(local)
        elif fingerprint and not cfg.streaming and not cfg.data_files:
            ident["fingerprint"] = fingerprint
        return ident

    def iter_batches(self, columns: list[str], batch_rows: int) -> Iterator[Batch]:
        split = self.cfg.split
        if not self.cfg.streaming:
            ds = self.ds.select_columns(columns) if columns else self.ds
            for lo in range(self.start, self.stop, batch_rows):
                hi = min(lo + batch_rows, self.stop)
                data = ds[lo:hi]
                yield [f"{split}:{i}" for i in range(lo, hi)], {c: data[c] for c in columns}
            return
        # A stream has no random access: every rank reads it and keeps its own rows.
        ids: list[str] = []
        cols: dict[str, list[Any]] = {c: [] for c in columns}
        for i, example in enumerate(self.ds):
            if i % self.num_shards != self.shard_index:
                continue
            ids.append(f"{split}:{i}")
            for c in columns:
                cols[c].append(example.get(c))
            if len(ids) >= batch_rows:
                yield ids, cols
                ids, cols = [], {c: [] for c in columns}
        if ids:
            yield ids, cols


def _load_dataset(cfg: SourceConfig):
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a hard dependency
        raise BatchgenError("--dataset needs the `datasets` package: pip install datasets") from exc
    name = cfg.dataset
    assert name is not None
    local = Path(name).expanduser()
    if local.is_dir() and any((local / m).is_file() for m in ("dataset_dict.json", "state.json")):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise ConfigError(
                    f"--split {cfg.split!r}: {name} has splits {', '.join(ds)}; pick one with --split"
                )
            ds = ds[cfg.split]
        elif ds.split is not None and str(ds.split) != cfg.split:
            # One split saved on its own: reading it under another name would give its rows
            # ids of the wrong split (`train:7` for the 7th test row).
            raise ConfigError(
                f"--split {cfg.split!r}: {name} holds only the split {str(ds.split)!r}, saved on "
                f"its own; pass --split {ds.split}"
            )
        if cfg.streaming:
            ds = ds.to_iterable_dataset()
        return ds
    data_files = list(cfg.data_files) or None
    try:
        return datasets.load_dataset(
            name,
            name=cfg.config_name,
            data_files=data_files,
            split=cfg.split,
            revision=cfg.revision,
            streaming=cfg.streaming,
        )
    except ValueError as exc:
        if "Unknown split" in str(exc) or "split" in str(exc).lower():
            raise ConfigError(f"--split {cfg.split!r}: {exc}") from exc
        raise BatchgenError(f"--dataset {name}: {exc}") from exc
    except FileNotFoundError as exc:
        raise ConfigError(
            f"--dataset {name}: not found ({exc}); give a hub id, a local dataset folder, or a "
            "builder name (json, csv, parquet, text) with --data-files"
        ) from exc


def _streaming_total(ds, split: str) -> int | None:
    info = getattr(ds, "info", None)
    splits = getattr(info, "splits", None) or {}
    entry = splits.get(split) if hasattr(splits, "get") else None
    return getattr(entry, "num_examples", None) or None


def _footer_digest(path: Path) -> str:
    """A digest of a Parquet file's footer (schema, row groups, each column chunk's offsets,
    sizes and min/max statistics): one small read at the end of the file, and different for
    nearly any rewrite, including one that keeps the file's size and row count."""
    with open(path, "rb") as fh:
        fh.seek(-8, os.SEEK_END)
        length = int.from_bytes(fh.read(4), "little")
        fh.seek(-(8 + length), os.SEEK_END)
        return hashlib.sha256(fh.read(length)).hexdigest()[:16]


def _size_or_none(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _folder_signature(folder: Path) -> str:
    """Names and sizes of a local dataset folder's files: changes when its data does."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and ".cache" not in p.parts:
            h.update(f"{p.relative_to(folder)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]
