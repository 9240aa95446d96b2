"""The primitives an object-store commit protocol needs, on any resolved location: write-once
objects under unique names, read, list a prefix, delete, and conditional writes for leases
(If-None-Match / If-Match on S3, ifGenerationMatch on GCS, whose generation stands for the ETag).
Every call is retried on transient errors (pipeline/storage/retry.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import BatchgenError
from pipeline.storage import s3http
from pipeline.storage.resolve import Location, resolve
from pipeline.storage.retry import RetryPolicy, with_retries


class ObjectExists(BatchgenError):
    """A write-once object is already there (another writer used the name)."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One listed object: its name relative to the store's root, and its size."""

    name: str
    size: int


def unique_name(stem: str, suffix: str = "") -> str:
    """`stem` made unique to this attempt (host, pid, random), so no two writers share a name."""
    host = socket.gethostname().split(".")[0] or "host"
    return f"{stem}.{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}{suffix}"


class ObjectStore:
    """Objects under one root (`s3://bucket/prefix`, `gs://...`, a local folder), by name."""

    def __init__(self, root: str | Location, policy: RetryPolicy | None = None) -> None:
        self.loc = root if isinstance(root, Location) else resolve(root)
        self.fs = self.loc.fs
        self.policy = policy or RetryPolicy()
        self._endpoint = self.loc.s3_endpoint()
        self._gcs = self.loc.gcs
        # Any other scheme: an fsspec filesystem behind pyarrow's handler (resolve.py).
        handler = getattr(self.fs, "handler", None)
        self._fsspec = handler if isinstance(handler, pafs.FSSpecHandler) else None
        self._folders: set[str] = set()  # folders made on it by this store

    @property
    def conditional(self) -> bool:
        """Whether writes can be conditional on the store itself (atomic leases)."""
        return self._endpoint is not None or self._gcs is not None

    def url_of(self, name: str) -> str:
        """`name` as a URL a user can paste (s3://bucket/prefix/name), for messages."""
        return f"{self.loc.url.rstrip('/')}/{name}"

    def _parent(self, name: str) -> None:
        """Local folders need the parent made, and so do fsspec filesystems with real folders
        (FTP, SFTP: once per folder and store); S3 and GCS have no folders."""
        folder = self._path(name).rsplit("/", 1)[0]
        if self.loc.scheme == "file":
            self.fs.create_dir(folder, recursive=True)
        elif self._fsspec and folder not in self._folders:
            fs = self._fsspec.fs  # pyarrow's create_dir is not idempotent on all of them
            for attempt in range(3):  # one try per folder level another writer may race for
                try:
                    fs.makedirs(folder, exist_ok=True)
                    break
                except Exception:  # FTP's "550 File exists": another thread or rank made it
                    if fs.isdir(folder):
                        break
                    if attempt == 2:
                        raise
            self._folders.add(folder)

    def _path(self, name: str) -> str:
        return self.loc.child(name)

    def _retry(self, what: str, fn):
        if self._fsspec is not None:
            fn = self._reconnecting(fn)
        return with_retries(f"{what} {self.loc.url.rstrip('/')}/", fn, self.policy)

    def _reconnecting(self, fn):
        """`fn` on an fsspec filesystem, whose connection is made anew after any failure (the
        retry then runs on a fresh one; which failures it retries: retry.is_transient)."""
        handler = self._fsspec

        def go():
            try:
                return fn()
            except Exception:
                if hasattr(handler, "reset"):
                    handler.reset()
                raise

        return go

    def put_new(self, name: str, data: bytes) -> str:
        """Write `data` as `name`, which must not exist (ObjectExists otherwise); its ETag."""
        etag = self.put_if_absent(name, data)
        if etag is None:
            raise ObjectExists(
                f"{self._path(name)} already exists; write-once objects need new names"
            )
        return etag

    def write(self, name: str, data: bytes) -> None:
        """Write (or replace) `name`; use a `unique_name` where no one else may write it."""
        if self._gcs is not None:
            self._retry(f"writing {name} in", lambda: self._gcs_upload(name, data, None))
            return

        def go() -> None:
            self._parent(name)
            with self.fs.open_output_stream(self._path(name)) as out:
                out.write(data)

        self._retry(f"writing {name} in", go)

    def open_output(self, name: str) -> pa.NativeFile:
        """A stream that writes `name` (multipart on object stores); for large shards."""
        return self._retry(
            f"opening {name} in", lambda: self.fs.open_output_stream(self._path(name))
        )

    def open_input(self, name: str) -> pa.NativeFile:
        """A random-access file: reads fetch byte ranges, never the whole object at once."""
        return self._retry(f"opening {name} in", lambda: self.fs.open_input_file(self._path(name)))

    def read(self, name: str) -> bytes | None:
        """The whole (small) object `name`, or None when there is none."""
        return self.read_with_etag(name)[0]

    def read_with_etag(self, name: str) -> tuple[bytes | None, str | None]:
        """(content, ETag) of `name`, or (None, None) when there is none (on GCS the
        generation stands for the ETag)."""
        if self._gcs is not None:
            bucket, key = self._gcs_key(name)
            got = self._retry(f"reading {name} in", lambda: self._gcs.read(bucket, key))
            return (None, None) if got is None else got
        if self._endpoint is not None:
            resp = self._signed("GET", name)
            if resp.status == 404:
                return None, None
            _raise_for(resp, f"reading {self._path(name)}")
            return resp.body, resp.etag

        def go() -> bytes | None:
            try:
                with self.fs.open_input_stream(self._path(name)) as f:
                    return f.read()
            except FileNotFoundError:
                return None

        data = self._retry(f"reading {name} in", go)
        return data, (None if data is None else _digest(data))

    def put_if_absent(self, name: str, data: bytes) -> str | None:
        """Create `name` only if it does not exist; its ETag, or None if it existed."""
        if self._gcs is not None:
            return self._retry(f"creating {name} in", lambda: self._gcs_upload(name, data, "0"))
        if self._endpoint is not None:
            resp = self._signed("PUT", name, data, {"If-None-Match": "*"})
            if resp.status in (409, 412):
                return None
            _raise_for(resp, f"creating {self._path(name)}")
            return resp.etag
        # Without conditional writes: check, write, read back. Two writers racing within one
        # round trip can both pass the check; the read-back lets the loser see it lost.
        if self.read(name) is not None:
            return None
        self.write(name, data)
        back, etag = self.read_with_etag(name)
        return etag if back == data else None

    def put_if_match(self, name: str, data: bytes, etag: str) -> str | None:
        """Replace `name` only if its ETag is still `etag`; the new ETag, or None if it changed."""
        if self._gcs is not None:
            return self._retry(f"replacing {name} in", lambda: self._gcs_upload(name, data, etag))
        if self._endpoint is not None:
            resp = self._signed("PUT", name, data, {"If-Match": etag})
            if resp.status in (404, 409, 412):
                return None
            _raise_for(resp, f"replacing {self._path(name)}")
            return resp.etag
        current, now = self.read_with_etag(name)
        if current is None or now != etag:
            return None
        self.write(name, data)
        back, new = self.read_with_etag(name)
        return new if back == data else None

    def iter_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose name starts with the folder `prefix` (recursively), sorted by name."""
        base = self._path(prefix.rstrip("/")) if prefix else self.loc.path
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = self._retry(f"listing {prefix or '/'} in", lambda: self.fs.get_file_info(selector))
        root = self.loc.path.rstrip("/") + "/"
        for info in sorted(infos, key=lambda i: i.path):
            if info.type == pafs.FileType.File:
                yield ObjectInfo(
                    info.path[len(root) :] if info.path.startswith(root) else info.path, info.size
                )

    def delete(self, name: str) -> None:
        """Remove `name`; a missing one is not an error (deletes are retried)."""

        def go() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(self._path(name))

        self._retry(f"deleting {name} in", go)

    def _gcs_key(self, name: str) -> tuple[str, str]:
        key = self.loc.key.rstrip("/")
        return self.loc.bucket, f"{key}/{name}" if key else name

    def _gcs_upload(self, name: str, data: bytes, if_generation_match: str | None) -> str | None:
        assert self._gcs is not None
        return self._gcs.upload(*self._gcs_key(name), data, if_generation_match)

    def _signed(self, method: str, name: str, body: bytes = b"", headers=None) -> s3http.S3Response:
        assert self._endpoint is not None
        key = self.loc.key.rstrip("/")
        key = f"{key}/{name}" if key else name
        return self._retry(
            f"{method} {name} in",
            lambda: _check_transient(
                s3http.request(self._endpoint, method, self.loc.bucket, key, body, headers)
            ),
        )


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _TransientHTTP(OSError):
    """A 5xx or throttling answer, raised so that `with_retries` retries it."""


def _check_transient(resp: s3http.S3Response) -> s3http.S3Response:
    if resp.status >= 500 or resp.status == 429 or b"SlowDown" in resp.body:
        raise _TransientHTTP(
            f"HTTP status {resp.status}: {s3http.error_code(resp) or 'server error'}"
        )
    return resp


def _raise_for(resp: s3http.S3Response, action: str) -> None:
    if 200 <= resp.status < 300:
        return
    code = s3http.error_code(resp) or f"HTTP {resp.status}"
    raise OSError(f"{action}: the store answered {resp.status} {code}")
