"""Hugging Face `datasets` input: hub ids, local dataset folders, builders with data files and
`save_to_disk` folders, in memory-mapped slices or streamed."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.config import SourceConfig
from pipeline.errors import BatchgenError, ConfigError
from pipeline.sources.base import Batch, rank_range


class HFDatasetSource:
    """A Hugging Face dataset: a hub id, a local dataset folder or builder with --data-files, or
    a `save_to_disk` folder. A row's id is `<split>:<row index in the split>`."""

    def __init__(self, cfg: SourceConfig, num_ranks: int = 1, rank: int = 0) -> None:
        self.cfg = cfg
        self.num_ranks = num_ranks
        with _quiet_datasets():
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
        self._place(rank)

    def _place(self, rank: int) -> None:
        self.rank = rank
        if self.cfg.streaming:
            known = _streaming_total(self.ds, self.cfg.split)
            self.start, self.stop = 0, None
            self.total_rows = None if known is None else len(range(rank, known, self.num_ranks))
        else:
            self.start, self.stop = rank_range(len(self.ds), self.num_ranks, rank)
            self.total_rows = self.stop - self.start

    def for_rank(self, rank: int) -> HFDatasetSource:
        """Another rank's slice of the same loaded dataset."""
        other = copy.copy(self)
        other._place(rank)
        return other

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

    def iter_batches(
        self, columns: list[str], batch_rows: int, start: int = 0, stop: int | None = None
    ) -> Iterator[Batch]:
        split = self.cfg.split
        if not self.cfg.streaming:
            ds = self.ds.select_columns(columns) if columns else self.ds
            end = self.stop if stop is None else min(self.start + stop, self.stop)
            for lo in range(self.start + start, end, batch_rows):
                hi = min(lo + batch_rows, end)
                data = ds[lo:hi]
                yield [f"{split}:{i}" for i in range(lo, hi)], {c: data[c] for c in columns}
            return
        # A stream has no random access: every rank reads it and keeps its own rows.
        ids: list[str] = []
        cols: dict[str, list[Any]] = {c: [] for c in columns}
        position = -1  # in this rank's slice
        for i, example in enumerate(self.ds):
            if i % self.num_ranks != self.rank:
                continue
            position += 1
            if position < start:
                continue
            if stop is not None and position >= stop:
                break
            ids.append(f"{split}:{i}")
            for c in columns:
                cols[c].append(example.get(c))
            if len(ids) >= batch_rows:
                yield ids, cols
                ids, cols = [], {c: [] for c in columns}
        if ids:
            yield ids, cols


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bar ("Generating train split") or info line on the terminal
    while a dataset loads: batchgen's own lines say what it reads."""
    from datasets.utils import logging as ds_logging

    bars, verbosity = ds_logging.is_progress_bar_enabled(), ds_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars:
            ds_logging.enable_progress_bar()


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
            **_storage_options(cfg.data_files),
        )
    except ImportError as exc:  # fsspec's filesystem for a --data-files URL is not installed
        raise ConfigError(f"--data-files: {exc}") from exc
    except ValueError as exc:
        if "Unknown split" in str(exc) or "split" in str(exc).lower():
            raise ConfigError(f"--split {cfg.split!r}: {exc}") from exc
        raise BatchgenError(f"--dataset {name}: {exc}") from exc
    except FileNotFoundError as exc:
        raise ConfigError(
            f"--dataset {name}: not found ({exc}); give a hub id, a local dataset folder, or a "
            "builder name (json, csv, parquet, text) with --data-files"
        ) from exc


def _storage_options(data_files: tuple[str, ...]) -> dict[str, Any]:
    """Credentials and endpoint for --data-files URLs (s3://...), by the AWS conventions."""
    from pipeline.storage import is_url

    urls = [f for f in data_files if is_url(f)]
    if not urls:
        return {}
    from pipeline.storage.resolve import storage_options

    options = storage_options(urls[0])
    return {"storage_options": options} if options else {}


def _streaming_total(ds, split: str) -> int | None:
    info = getattr(ds, "info", None)
    splits = getattr(info, "splits", None) or {}
    entry = splits.get(split) if hasattr(splits, "get") else None
    return getattr(entry, "num_examples", None) or None


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
