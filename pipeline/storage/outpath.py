"""An output folder on an object store, spoken to like a local `Path`: the part of pathlib that
batchgen's output code uses (`/`, `name`, `iterdir`, `read_text`, `stat`, `unlink`, ...), so
the rank-state and shard code keep one shape for both. What an object store cannot do (rename,
fsync, lockf) is behind `pipeline.storage.stateio`, never here.

    output_location("s3://bucket/run")  -> StorePath
    output_location("run")              -> Path (local; unchanged)
"""

from __future__ import annotations

import fnmatch
import functools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.storage.store import ObjectStore
from pipeline.storage.urls import is_url

# The variables that choose a store's endpoint and credentials: a client per their values.
_CREDENTIAL_ENV = ("AWS_", "GOOGLE_", "STORAGE_EMULATOR_HOST")


@dataclass(frozen=True, slots=True)
class StoreStat:
    """What `StorePath.stat()` answers: the object's size and modification time."""

    st_size: int
    st_mtime: float


class StorePath:
    """A path (an object, or a 'folder' prefix) under an object-store output root."""

    __slots__ = ("_stat", "rel", "store")

    def __init__(self, store: ObjectStore, rel: str = "", stat: StoreStat | None = None) -> None:
        self.store, self.rel, self._stat = store, rel.strip("/"), stat

    @classmethod
    def of(cls, url: str) -> StorePath:
        """The root of the output at `url` (one filesystem client per URL and credentials)."""
        env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_CREDENTIAL_ENV)))
        return cls(_store(url, env))

    def __truediv__(self, name: str) -> StorePath:
        return StorePath(self.store, f"{self.rel}/{name}" if self.rel else name)

    def __str__(self) -> str:
        root = self.store.loc.url.rstrip("/")
        return f"{root}/{self.rel}" if self.rel else root

    def __repr__(self) -> str:
        return f"StorePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: StorePath) -> bool:
        return str(self) < str(other)

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1] if self.rel else self.store.loc.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> StorePath:
        return StorePath(self.store, self.rel.rsplit("/", 1)[0] if "/" in self.rel else "")

    @property
    def parents(self) -> list[StorePath]:
        return [] if not self.rel else [self.parent, *self.parent.parents]

    def with_name(self, name: str) -> StorePath:
        return self.parent / name

    def resolve(self) -> StorePath:
        return self

    def expanduser(self) -> StorePath:
        return self

    # -- reading -----------------------------------------------------------------------------

    def _info(self) -> list[pafs.FileInfo]:
        base = self.store.loc.child(self.rel) if self.rel else self.store.loc.path
        selector = pafs.FileSelector(base, recursive=False, allow_not_found=True)
        return self.store._retry(
            f"listing {self.rel or '/'} in", lambda: self.store.fs.get_file_info(selector)
        )

    def iterdir(self) -> Iterator[StorePath]:
        """The objects and 'folders' directly under this prefix (none if there is none)."""
        for info in sorted(self._info(), key=lambda i: i.path):
            name = info.path.rstrip("/").rsplit("/", 1)[-1]
            stat = None
            if info.type == pafs.FileType.File:
                mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
                stat = StoreStat(info.size or 0, mtime)
            yield StorePath(self.store, f"{self.rel}/{name}".lstrip("/"), stat)

    def glob(self, pattern: str) -> Iterator[StorePath]:
        """Children whose name matches `pattern` (one level: what batchgen's globs use)."""
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def is_dir(self) -> bool:
        """A prefix with objects under it; the output root always counts (a new run's)."""
        return not self.rel or any(True for _ in self.iterdir())

    def is_file(self) -> bool:
        return bool(self.rel) and self._lookup() is not None

    def exists(self) -> bool:
        return self.is_file() or (bool(self.rel) and self.is_dir())

    def _lookup(self) -> StoreStat | None:
        if self._stat is not None:
            return self._stat
        path = self.store.loc.child(self.rel)
        info = self.store._retry(
            f"reading {self.rel} in", lambda: self.store.fs.get_file_info(path)
        )
        if info.type != pafs.FileType.File:
            return None
        mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
        return StoreStat(info.size or 0, mtime)

    def stat(self) -> StoreStat:
        found = self._lookup()
        if found is None:
            raise FileNotFoundError(str(self))
        return found

    def read_bytes(self) -> bytes:
        data = self.store.read(self.rel)
        if data is None:
            raise FileNotFoundError(str(self))
        return data

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open_input(self) -> pa.NativeFile:
        """A random-access file over the object (ranged reads), for pyarrow's readers."""
        return self.store.open_input(self.rel)

    # -- writing -----------------------------------------------------------------------------

    def write_bytes(self, data: bytes) -> None:
        """Write (or replace) this object; write-once names go through stateio instead."""
        self.store.write(self.rel, data)
        self._stat = None

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = True) -> None:
        """Delete the object; a missing one is no error (a delete is idempotent on a store,
        and asking first would cost a request per object)."""
        self.store.delete(self.rel)
        self._stat = None  # what a listing said of it is stale now

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: a prefix exists once an object is under it."""

    def rmdir(self) -> None:
        """Nothing to remove: an empty prefix is no folder."""


@functools.lru_cache(maxsize=16)
def _store(url: str, _env: tuple[tuple[str, str], ...]) -> ObjectStore:
    return ObjectStore(url)


def output_location(spec: str | Path | StorePath) -> Path | StorePath:
    """The output folder `spec` names: a local `Path`, or a `StorePath` for a URL."""
    if isinstance(spec, StorePath | Path):
        return spec
    return StorePath.of(spec) if is_url(spec) else Path(spec)


def is_store(path: object) -> bool:
    """Whether `path` is on an object store (no rename, fsync or lockf there)."""
    return isinstance(path, StorePath)


def parquet_source(path: Path | StorePath) -> Path | pa.NativeFile:
    """What pyarrow.parquet's readers take for `path`: the path itself locally, a ranged-read
    file on an object store."""
    return path.open_input() if isinstance(path, StorePath) else path
