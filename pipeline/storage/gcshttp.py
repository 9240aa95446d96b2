"""Google Cloud Storage over its JSON API with the standard library: what batchgen's output
needs (write-once objects with `ifGenerationMatch=0`, compare-and-swap with
`ifGenerationMatch=<generation>`, uploads, ranged reads, listing a prefix, delete), and a
pyarrow filesystem over it, so readers and writers speak to gs:// as to any other store.

GCS's object generation plays the part of S3's ETag: it changes with every write of a name, and
a write conditional on it succeeds for exactly one of two racing writers.

Credentials: `STORAGE_EMULATOR_HOST` (the convention of Google's own client libraries) points
at an emulator and sends none; otherwise Google's application default credentials through
`google-auth` (the `batchgen[gcs]` extra). A token is held in memory only: never logged, never
written anywhere, never part of an error message.

No call here retries: pipeline/storage/retry.py does, above it (transient answers are raised as
OSError whose text it recognises: "HTTP status 503", a refused connection, a timeout).
"""

from __future__ import annotations

import datetime as dt
import http.client
import io
import json
import os
import threading
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import ConfigError
from pipeline.storage.ranged import RangedFile

GCS_ENDPOINT = "https://storage.googleapis.com"
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
KEY_FILE_ENV = "GOOGLE_APPLICATION_CREDENTIALS"
# How long the search for credentials waits for the GCE metadata server (one attempt): the
# "no Google credentials found" line comes well within the preflight's 10 s.
METADATA_PROBE_S = 1.0
SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
INSTALL_HINT = "pip install 'batchgen[gcs]'"
# One multipart request (metadata and bytes together) up to this size; larger objects go up
# as a resumable upload in chunks of RESUMABLE_CHUNK (a multiple of 256 KiB, as GCS requires).
MULTIPART_MAX = 16 * 2**20
RESUMABLE_CHUNK = 8 * 2**20
LIST_PAGE = 1000  # objects per listing request (GCS's own maximum)
TIMEOUT_S = 10.0  # per request; a wrong endpoint answers within the preflight's 10 s


class GcsError(OSError):
    """An answer of the store that is not a success; `status` is its HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class GcsSettings:
    """Where gs:// requests go and how they are authorised; `repr` hides the credentials."""

    endpoint: str  # scheme://host[:port]
    emulator: bool  # STORAGE_EMULATOR_HOST: no credentials are sent
    credentials: Any = field(default=None, repr=False, compare=False)  # google-auth's
    source: str = "Google's application default credentials"

    def where(self) -> str:
        """The endpoint in words, for messages."""
        return f"{self.endpoint} ({EMULATOR_ENV})" if self.emulator else self.endpoint


def gcs_settings(spec: str, env: Mapping[str, str]) -> GcsSettings:
    """The emulator named by STORAGE_EMULATOR_HOST, else Google's application default
    credentials (ConfigError in one line when google-auth is missing or finds none)."""
    host = env.get(EMULATOR_ENV, "").strip().rstrip("/")
    if host:
        return GcsSettings(host if "://" in host else f"http://{host}", emulator=True)
    try:
        import google.auth
        import google.auth.exceptions
    except ImportError as exc:
        raise ConfigError(
            f"{spec}: gs:// needs google-auth for Google's application default credentials: "
            f"{INSTALL_HINT} (or set {EMULATOR_ENV} for an emulator)"
        ) from exc
    key_file = env.get(KEY_FILE_ENV, "")
    if key_file and not os.path.isfile(key_file):
        what = "is not a file" if os.path.exists(key_file) else "does not exist"
        raise ConfigError(
            f"{spec}: {KEY_FILE_ENV}={key_file} {what}; set it to a service account's "
            "key file, or unset it to use `gcloud auth application-default login`"
        )
    try:
        credentials, _project = google.auth.default(scopes=[SCOPE], request=_discovery_request())
    except google.auth.exceptions.DefaultCredentialsError as exc:
        if key_file:
            reason = (str(exc).strip().splitlines() or ["not a key file"])[0].rstrip(".")
            raise ConfigError(
                f"{spec}: {KEY_FILE_ENV}={key_file} is not a usable key file ({reason}); "
                "set it to a service account's key file (JSON), or unset it"
            ) from exc
        raise ConfigError(
            f"{spec}: no Google credentials found; run `gcloud auth application-default login` "
            f"or set {KEY_FILE_ENV} to a service account's key file"
        ) from exc
    return GcsSettings(GCS_ENDPOINT, emulator=False, credentials=credentials)


def _discovery_request() -> Any:
    """The HTTP transport google-auth's `default()` uses to look for the GCE metadata server:
    one attempt of at most METADATA_PROBE_S per request, and a server that does not answer in
    time (or refuses the connection) reads as absent. google-auth's own probe tries 3 times with
    3 s timeouts and backoff (GCE_METADATA_TIMEOUT and GCE_METADATA_DETECT_RETRIES are read
    once, at its import): over 12 s off GCP where the metadata address swallows packets, past
    the preflight's 10 s. On GCP the metadata server answers in milliseconds."""
    import google.auth.exceptions
    import google.auth.transport
    import google.auth.transport.requests

    class Unanswered(google.auth.transport.Response):
        """What a metadata server that did not answer says: not found (no retry)."""

        status = 404
        headers: Mapping[str, str] = {}
        data = b""

    class BoundedRequest(google.auth.transport.requests.Request):
        def __call__(self, url: str, method: str = "GET", body: Any = None, headers: Any = None,
                     timeout: float | None = None, **kwargs: Any) -> Any:  # fmt: skip
            limit = METADATA_PROBE_S if timeout is None else min(timeout, METADATA_PROBE_S)
            try:
                return super().__call__(url, method, body, headers, limit, **kwargs)
            except google.auth.exceptions.TransportError:
                return Unanswered()

    return BoundedRequest()


@dataclass(frozen=True, slots=True)
class GcsObject:
    """What a listing or a metadata request says of one object."""

    name: str
    size: int
    generation: str
    updated: float | None = None  # seconds since the epoch

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> GcsObject:
        updated = raw.get("updated")
        when = None
        if updated:
            when = dt.datetime.fromisoformat(updated.replace("Z", "+00:00")).timestamp()
        return cls(raw["name"], int(raw.get("size", 0)), str(raw.get("generation", "")), when)


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")


class GcsClient:
    """The JSON API requests batchgen makes, one bucket or many; thread-safe (one connection
    per request, the token refreshed under a lock)."""

    def __init__(self, settings: GcsSettings, timeout: float = TIMEOUT_S) -> None:
        self.settings = settings
        self.timeout = timeout
        self._lock = threading.Lock()

    # -- requests ------------------------------------------------------------------------------

    def _auth(self) -> dict[str, str]:
        creds = self.settings.credentials
        if self.settings.emulator or creds is None:
            return {}
        with self._lock:
            if not creds.valid:
                import google.auth.exceptions
                import google.auth.transport.requests

                try:
                    creds.refresh(google.auth.transport.requests.Request())
                except google.auth.exceptions.TransportError as exc:
                    raise ConnectionError(f"refreshing Google credentials: {exc}") from None
                except google.auth.exceptions.RefreshError as exc:
                    raise GcsError(f"Google credentials were refused: {exc}", 401) from None
            return {"Authorization": f"Bearer {creds.token}"}

    def _request(
        self,
        method: str,
        url: str,
        body: bytes | memoryview = b"",
        headers: Mapping[str, str] | None = None,
    ) -> _Response:
        """One request; a 429 or 5xx answer, a reset or a timeout raises an OSError that the
        retry layer retries. Other statuses are returned for the caller to judge."""
        if not url.startswith(("http://", "https://")):
            url = self.settings.endpoint + url
        parts = urllib.parse.urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn_cls = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        # The token goes to the endpoint only (an upload session's URL names its own host).
        own = parts.netloc == urllib.parse.urlsplit(self.settings.endpoint).netloc
        auth = self._auth() if own else {}
        conn = conn_cls(parts.netloc, timeout=self.timeout)
        try:
            conn.request(method, target, body=body, headers={**auth, **(headers or {})})
            resp = conn.getresponse()
            data = resp.read()
        except http.client.HTTPException as exc:  # a torn answer: as a reset connection
            raise ConnectionResetError(f"{method} {parts.path}: {exc!r}") from None
        finally:
            conn.close()
        out = _Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        if out.status == 429 or out.status >= 500:
            raise GcsError(f"HTTP status {out.status}: {_reason(out)}", out.status)
        return out

    def _fail(self, resp: _Response, action: str) -> GcsError:
        if resp.status == 404:
            return GcsError(f"{action}: not found (404)", 404)
        return GcsError(f"{action}: the store answered {resp.status} {_reason(resp)}", resp.status)

    # -- buckets and objects ---------------------------------------------------------------------

    def bucket_exists(self, bucket: str) -> bool:
        """Whether `bucket` is there (GcsError 401 when the credentials are refused). A 403 means
        it is there: roles/storage.objectAdmin may write objects without reading the bucket."""
        resp = self._request("GET", f"/storage/v1/b/{_q(bucket)}?fields=name")
        if resp.status == 404:
            return False
        if resp.status not in (200, 403):
            raise self._fail(resp, f"reading the bucket {bucket}")
        return True

    def stat(self, bucket: str, name: str) -> GcsObject | None:
        """The object's metadata, or None when there is none."""
        resp = self._request(
            "GET", f"{_object_url(bucket, name)}?fields=name,size,generation,updated"
        )
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise self._fail(resp, f"reading gs://{bucket}/{name}")
        return GcsObject.parse(resp.json())

    def read(
        self, bucket: str, name: str, start: int = 0, length: int | None = None
    ) -> tuple[bytes, str] | None:
        """(bytes, generation) of the object (or of `length` bytes from `start`); None if absent."""
        headers = {}
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            headers["Range"] = f"bytes={start}-{end}"
        resp = self._request("GET", f"{_object_url(bucket, name)}?alt=media", headers=headers)
        if resp.status == 404:
            return None
        if resp.status == 416:  # a range past the end
            return b"", resp.headers.get("x-goog-generation", "")
        if resp.status not in (200, 206):
            raise self._fail(resp, f"reading gs://{bucket}/{name}")
        return resp.body, resp.headers.get("x-goog-generation", "")

    def upload(
        self,
        bucket: str,
        name: str,
        data: bytes | memoryview,
        if_generation_match: str | None = None,
    ) -> str | None:
        """Write `data` as `name`; its new generation. With `if_generation_match` ('0': only if
        absent; a generation: only if still that one) None when the condition failed."""
        query = {"name": name}
        if if_generation_match is not None:
            query["ifGenerationMatch"] = if_generation_match
        if len(data) <= MULTIPART_MAX or if_generation_match is not None:
            resp = self._multipart(bucket, name, data, query)
        else:
            resp = self._resumable(bucket, data, query)
        if resp.status == 412 or (resp.status == 404 and if_generation_match not in (None, "0")):
            return None
        if resp.status != 200:
            raise self._fail(resp, f"writing gs://{bucket}/{name}")
        return str(resp.json().get("generation", ""))

    def _multipart(
        self, bucket: str, name: str, data: bytes | memoryview, query: dict[str, str]
    ) -> _Response:
        """One request carrying metadata and bytes (the emulators, unlike for media uploads,
        honour preconditions on it, as GCS does on every upload)."""
        boundary = f"batchgen-{uuid.uuid4().hex}"
        head = (
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            f"{json.dumps({'name': name})}\r\n--{boundary}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        # join takes any buffer (bytes, memoryview, pa.Buffer): the shard is copied once, here
        body = b"".join((head, data, f"\r\n--{boundary}--\r\n".encode()))
        url = f"/upload/storage/v1/b/{_q(bucket)}/o?uploadType=multipart&" + _query(query)
        return self._request(
            "POST", url, body, {"Content-Type": f"multipart/related; boundary={boundary}"}
        )

    def _resumable(self, bucket: str, data: bytes | memoryview, query: dict[str, str]) -> _Response:
        """A large object in chunks of one upload session (restarted whole when retried)."""
        url = f"/upload/storage/v1/b/{_q(bucket)}/o?uploadType=resumable&" + _query(query)
        start = self._request(
            "POST",
            url,
            json.dumps({"name": query["name"]}).encode(),
            {"Content-Type": "application/json; charset=UTF-8"},
        )
        session = start.headers.get("location")
        if start.status != 200 or not session:
            raise self._fail(start, f"starting an upload of gs://{bucket}/{query['name']}")
        view, total = memoryview(data), len(data)
        for offset in range(0, total, RESUMABLE_CHUNK):
            chunk = view[offset : offset + RESUMABLE_CHUNK]
            last = offset + len(chunk) >= total
            size = str(total) if last else "*"
            resp = self._request(
                "PUT",
                session,
                chunk,
                {"Content-Range": f"bytes {offset}-{offset + len(chunk) - 1}/{size}"},
            )
            if not last and resp.status != 308:
                raise self._fail(resp, f"uploading gs://{bucket}/{query['name']}")
        return resp

    def delete(self, bucket: str, name: str) -> None:
        """Remove the object; a missing one is no error."""
        resp = self._request("DELETE", _object_url(bucket, name))
        if resp.status not in (200, 204, 404):
            raise self._fail(resp, f"deleting gs://{bucket}/{name}")

    def list(self, bucket: str, prefix: str, delimiter: bool) -> Iterator[GcsObject | str]:
        """Objects whose name starts with `prefix` (page after page); with `delimiter`, one level:
        objects directly under it, and the 'folders' below it as strings ending in '/'."""
        token: str | None = None
        while True:
            query = {
                "prefix": prefix,
                "maxResults": str(LIST_PAGE),
                "fields": "items(name,size,generation,updated),prefixes,nextPageToken",
            }
            if delimiter:
                query["delimiter"] = "/"
            if token:
                query["pageToken"] = token
            resp = self._request("GET", f"/storage/v1/b/{_q(bucket)}/o?" + _query(query))
            if resp.status == 404:
                raise GcsError(f"listing gs://{bucket}/{prefix}: the bucket does not exist", 404)
            if resp.status != 200:
                raise self._fail(resp, f"listing gs://{bucket}/{prefix}")
            page = resp.json() or {}
            yield from (GcsObject.parse(item) for item in page.get("items", ()))
            yield from page.get("prefixes", ())
            token = page.get("nextPageToken")
            if not token:
                return


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _object_url(bucket: str, name: str) -> str:
    return f"/storage/v1/b/{_q(bucket)}/o/{_q(name)}"


def _query(params: Mapping[str, str]) -> str:
    return urllib.parse.urlencode(params, quote_via=urllib.parse.quote)


def _reason(resp: _Response) -> str:
    """The error's reason from a JSON error body ('rateLimitExceeded', 'Forbidden', ...)."""
    try:
        err = json.loads(resp.body)["error"]
        reasons = [e.get("reason") for e in err.get("errors", ()) if e.get("reason")]
        return (
            f"{err.get('message', '')} ({', '.join(reasons)})"
            if reasons
            else str(err.get("message"))
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return resp.body[:200].decode(errors="replace").strip() or http.client.responses.get(
            resp.status, "error"
        )


# -- pyarrow's view ---------------------------------------------------------------------------


def _split(path: str) -> tuple[str, str]:
    bucket, _, name = path.strip("/").partition("/")
    return bucket, name


class _RangedReader(RangedFile):
    """A random-access object: each read is one ranged GET (a Parquet footer, a row group)."""

    def __init__(self, client: GcsClient, bucket: str, name: str, size: int) -> None:
        super().__init__(size)
        self.client, self.bucket, self.name = client, bucket, name

    def _read_at(self, offset: int, n: int) -> bytes:
        got = self.client.read(self.bucket, self.name, offset, n)
        if got is None:
            raise FileNotFoundError(f"gs://{self.bucket}/{self.name}")
        return got[0]


class _Upload(io.RawIOBase):
    """Bytes collected in memory and uploaded whole on close (one request, or a resumable
    upload for a large object): an upload cut off by a crash leaves no object."""

    def __init__(self, client: GcsClient, bucket: str, name: str) -> None:
        super().__init__()
        self.client, self.bucket, self.name = client, bucket, name
        self._buf = io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self._buf.write(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self.client.upload(self.bucket, self.name, self._buf.getbuffer())
            finally:
                self._buf = io.BytesIO()
                super().close()


class GcsHandler(pafs.FileSystemHandler):
    """gs:// as a pyarrow filesystem (`pafs.PyFileSystem(GcsHandler(client))`): paths are
    'bucket/name'; 'folders' are the prefixes before a '/'."""

    def __init__(self, client: GcsClient) -> None:
        self.client = client

    def get_type_name(self) -> str:
        return "gcs-json"

    def normalize_path(self, path: str) -> str:
        return path.strip("/")

    def equals(self, other: Any) -> bool:
        return isinstance(other, GcsHandler) and other.client is self.client

    def _info(self, path: str) -> pafs.FileInfo:
        bucket, name = _split(path)
        if not name:
            found = self.client.bucket_exists(bucket)
            return pafs.FileInfo(path, pafs.FileType.Directory if found else pafs.FileType.NotFound)
        obj = self.client.stat(bucket, name)
        if obj is not None:
            mtime = None if obj.updated is None else dt.datetime.fromtimestamp(obj.updated, dt.UTC)
            return pafs.FileInfo(path, pafs.FileType.File, size=obj.size, mtime=mtime)
        try:
            child = next(
                iter(self.client.list(bucket, name.rstrip("/") + "/", delimiter=True)), None
            )
        except GcsError as exc:
            if exc.status != 404:
                raise
            child = None
        return pafs.FileInfo(
            path, pafs.FileType.Directory if child is not None else pafs.FileType.NotFound
        )

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return [self._info(p) for p in paths]

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        """One level (or, with `recursive`, every object below: files only, as the callers
        use them) under `selector.base_dir`."""
        bucket, name = _split(selector.base_dir)
        prefix = f"{name}/" if name else ""
        out: list[pafs.FileInfo] = []
        for item in self.client.list(bucket, prefix, delimiter=not selector.recursive):
            if isinstance(item, str):
                out.append(pafs.FileInfo(f"{bucket}/{item.rstrip('/')}", pafs.FileType.Directory))
            elif item.name != prefix:  # a zero-byte 'folder' marker some tools write
                mtime = (
                    None
                    if item.updated is None
                    else dt.datetime.fromtimestamp(item.updated, dt.UTC)
                )
                out.append(
                    pafs.FileInfo(
                        f"{bucket}/{item.name}", pafs.FileType.File, size=item.size, mtime=mtime
                    )
                )
        if not out and not selector.allow_not_found and not self.client.bucket_exists(bucket):
            raise FileNotFoundError(f"gs://{selector.base_dir}")
        return out

    def create_dir(self, path: str, recursive: bool) -> None:
        """No folders on GCS: a prefix exists once an object is under it."""

    def delete_dir(self, path: str) -> None:
        self.delete_dir_contents(path, missing_dir_ok=True)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        bucket, name = _split(path)
        for item in list(self.client.list(bucket, f"{name}/" if name else "", delimiter=False)):
            assert isinstance(item, GcsObject)
            self.client.delete(bucket, item.name)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete every bucket's contents")

    def delete_file(self, path: str) -> None:
        self.client.delete(*_split(path))

    def move(self, src: str, dest: str) -> None:
        raise OSError("gs:// has no rename; batchgen writes every object once under its final name")

    def copy_file(self, src: str, dest: str) -> None:
        got = self.client.read(*_split(src))
        if got is None:
            raise FileNotFoundError(f"gs://{src}")
        self.client.upload(*_split(dest), got[0])

    def open_input_stream(self, path: str) -> pa.PythonFile:
        got = self.client.read(*_split(path))
        if got is None:
            raise FileNotFoundError(f"gs://{path}")
        return pa.PythonFile(io.BytesIO(got[0]), mode="r")

    def open_input_file(self, path: str) -> pa.PythonFile:
        bucket, name = _split(path)
        obj = self.client.stat(bucket, name)
        if obj is None:
            raise FileNotFoundError(f"gs://{path}")
        return pa.PythonFile(_RangedReader(self.client, bucket, name, obj.size), mode="r")

    def open_output_stream(self, path: str, metadata: Any = None) -> pa.PythonFile:
        return pa.PythonFile(_Upload(self.client, *_split(path)), mode="w")

    def open_append_stream(self, path: str, metadata: Any = None) -> Any:
        raise OSError("gs:// objects cannot be appended to")


def filesystem(client: GcsClient) -> pafs.PyFileSystem:
    """pyarrow's filesystem over `client`."""
    return pafs.PyFileSystem(GcsHandler(client))
