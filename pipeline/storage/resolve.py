"""A path or URL -> (pyarrow filesystem, path), with credentials and endpoints from the
conventions users already have: the AWS variables and profiles for s3://, Google's application
default credentials for gs://, fsspec for any other scheme it knows. Credentials are held only
in the filesystem objects: never logged, never in a manifest (`Location.describe()` omits them).
"""

from __future__ import annotations

import configparser
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from pyarrow.fs import FSSpecHandler

from pipeline.errors import ConfigError
from pipeline.storage import gcshttp
from pipeline.storage.s3http import S3Endpoint
from pipeline.storage.urls import url_scheme

DEFAULT_REGION = "us-east-1"
# Short timeouts, so a wrong endpoint answers within the preflight's 10 s; retries are ours
# (pipeline/storage/retry.py), so the SDK's own make one attempt.
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class S3Settings:
    """What the AWS conventions say for s3://; `repr` hides the secrets."""

    region: str
    endpoint: str | None = None  # scheme://host[:port], or None for AWS itself
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    profile: str | None = None
    source: str = "the AWS SDK's default chain"  # where the credentials come from, in words

    @property
    def has_keys(self) -> bool:
        return bool(self.access_key and self.secret_key)


@dataclass(frozen=True, slots=True)
class Location:
    """A resolved path or URL: the filesystem to use and the path inside it."""

    url: str  # as the user gave it
    scheme: str  # 'file' for a local path
    fs: pafs.FileSystem = field(repr=False)
    path: str  # in `fs`: 'bucket/key' on object stores, an absolute path locally
    s3: S3Settings | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # for fsspec
    gcs: gcshttp.GcsClient | None = field(default=None, repr=False)  # gs://: its JSON API

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def key(self) -> str:
        parts = self.path.split("/", 1)
        return parts[1] if len(parts) > 1 else ""

    def child(self, name: str) -> str:
        """The path of `name` under this location."""
        return f"{self.path.rstrip('/')}/{name}" if self.path else name

    def s3_endpoint(self) -> S3Endpoint | None:
        """Signed-request settings for conditional writes, when the keys are known."""
        s3 = self.s3
        if s3 is None or not s3.has_keys:
            return None
        endpoint = s3.endpoint or f"https://s3.{s3.region}.amazonaws.com"
        assert s3.access_key and s3.secret_key
        return S3Endpoint(endpoint, s3.region, s3.access_key, s3.secret_key, s3.session_token)

    def describe(self) -> dict[str, Any]:
        """What may be recorded (manifest, card, logs): no credentials."""
        out: dict[str, Any] = {"url": self.url, "scheme": self.scheme}
        if self.s3 is not None:
            out["endpoint"] = self.s3.endpoint
            out["region"] = self.s3.region
        if self.gcs is not None:
            out["endpoint"] = self.gcs.settings.endpoint
        return out


def s3_settings(env: Mapping[str, str] | None = None) -> S3Settings:
    """The AWS conventions: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, else
    the profile (AWS_PROFILE, default 'default') in AWS_SHARED_CREDENTIALS_FILE
    (~/.aws/credentials); region from AWS_REGION, AWS_DEFAULT_REGION or the profile's config;
    endpoint from AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or the profile's endpoint_url."""
    env = os.environ if env is None else env
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    creds = _ini(env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), profile)
    conf_section = profile if profile == "default" else f"profile {profile}"
    conf = _ini(env.get("AWS_CONFIG_FILE", "~/.aws/config"), conf_section)
    region = (
        env.get("AWS_REGION")
        or env.get("AWS_DEFAULT_REGION")
        or conf.get("region")
        or DEFAULT_REGION
    )
    endpoint = (
        env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
        or conf.get("endpoint_url")
        or None
    )
    # The variables win over the profile; the profile's keys are the variables' names in lower
    # case (its config file's too, the credentials file winning).
    names = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
    for keys, case, named, origin in (
        (env, str.upper, None, "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ({**conf, **creds}, str.lower, profile, f"the AWS profile {profile!r}"),
    ):
        key_id, secret, token = (keys.get(case(n)) for n in names)
        if key_id and secret:
            return S3Settings(region, endpoint, key_id, secret, token, named, origin)
    return S3Settings(region, endpoint, profile=profile)


def _ini(path: str, section: str) -> dict[str, str]:
    parser = configparser.ConfigParser()
    try:
        parser.read(Path(path).expanduser())
    except configparser.Error:
        return {}
    return dict(parser[section]) if parser.has_section(section) else {}


def resolve(spec: str, env: Mapping[str, str] | None = None) -> Location:
    """The filesystem and path of a local path, a file:// URL, s3://, gs:// or an fsspec URL."""
    scheme = url_scheme(spec)
    if scheme is None or scheme == "file":
        local = spec[len("file://") :] if scheme == "file" else spec
        return Location(
            spec, "file", pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())
        )
    rest = spec.split("://", 1)[1].strip("/")
    if not rest:
        raise ConfigError(f"{spec}: the URL names no bucket; give {scheme}://BUCKET/PREFIX")
    if scheme in ("s3", "s3a"):
        return _s3_location(spec, rest, s3_settings(env))
    if scheme in ("gs", "gcs"):
        # STORAGE_EMULATOR_HOST, else application default credentials (GOOGLE_APPLICATION_
        # CREDENTIALS, gcloud's login, the metadata server), as Google's own clients find them.
        client = gcshttp.GcsClient(gcshttp.gcs_settings(spec, os.environ if env is None else env))
        return Location(spec, "gs", gcshttp.filesystem(client), rest, gcs=client)
    return _fsspec_location(spec, scheme)


def _s3_location(spec: str, rest: str, s3: S3Settings) -> Location:
    kwargs: dict[str, Any] = {
        "region": s3.region,
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    }
    options: dict[str, Any] = {"client_kwargs": {"region_name": s3.region}}
    if s3.endpoint:
        scheme, _, host = s3.endpoint.partition("://")
        kwargs["endpoint_override"], kwargs["scheme"] = (
            (host, scheme) if host else (scheme, "https")
        )
        options["client_kwargs"]["endpoint_url"] = s3.endpoint
    if s3.has_keys:
        kwargs.update(access_key=s3.access_key, secret_key=s3.secret_key)
        options.update(key=s3.access_key, secret=s3.secret_key)
        if s3.session_token:
            kwargs["session_token"] = s3.session_token
            options["token"] = s3.session_token
    elif s3.profile and s3.profile != "default":
        options["profile"] = s3.profile
    return Location(spec, "s3", pafs.S3FileSystem(**kwargs), rest, s3, options)


def _fsspec_location(spec: str, scheme: str) -> Location:
    try:
        import fsspec
        from pyarrow.fs import PyFileSystem
    except ImportError as exc:
        raise ConfigError(f"{spec}: {scheme}:// needs fsspec: pip install fsspec") from exc
    try:
        if "::" in spec:  # a chained URL (simplecache::...): fsspec builds the chain
            fs, path = fsspec.core.url_to_fs(spec)
            return Location(spec, scheme, PyFileSystem(FSSpecHandler(fs)), path)
        cls = fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as exc:
        raise ConfigError(
            f"{spec}: no filesystem for {scheme}:// ({exc}); batchgen reads s3://, gs:// and "
            "what an installed fsspec implementation knows"
        ) from exc
    options = cls._get_kwargs_from_urls(spec)
    path = cls._strip_protocol(spec)
    return Location(spec, scheme, PyFileSystem(FSSpecPerThread(cls, options)), path)


# A thread's fsspec filesystem unused for this long is made anew before its next call: servers
# close idle connections (FTP servers typically after minutes), and fsspec's FTP client answers
# a listing on a connection the server closed as "no such folder", which would read as an
# absent lease or an empty prefix.
FSSPEC_IDLE_S = 30.0


class FSSpecPerThread(FSSpecHandler):
    """pyarrow's FSSpecHandler with one fsspec filesystem per thread, made on first use.

    Not every fsspec filesystem may be shared between threads (FTP's is one control
    connection), and an output is used by several (the writer, the committer, the lease's
    heartbeat). Made on first use, so a server that is down answers inside the store's retries
    and the preflight, not at resolve time; made anew after a failure (`reset`) or an idle spell
    (FSSPEC_IDLE_S), outside fsspec's instance cache, which would hand back the dead one.
    Listings are not cached: other processes (ranks, resumes, readers) change the folder."""

    def __init__(self, cls: type, options: dict[str, Any]) -> None:
        self._cls, self._options = cls, options
        self._local = threading.local()

    @property
    def fs(self) -> Any:  # FSSpecHandler's methods all go through `self.fs`
        now = time.monotonic()
        fs = getattr(self._local, "fs", None)
        if fs is None or now - self._local.used > FSSPEC_IDLE_S:
            fs = self._local.fs = self._cls(
                **self._options, use_listings_cache=False, skip_instance_cache=True
            )
        self._local.used = now
        return fs

    def reset(self) -> None:
        """Drop this thread's filesystem after a failure: its connection may be dead (an FTP
        server closes one idle for minutes), and the next call makes a new one."""
        self._local.fs = None

    # pyarrow's handler asks fsspec's `isfile`/`isdir` first, which answer False for any error:
    # a dropped connection would read as "no such object" (an absent lease, an empty prefix).
    # These raise instead, so the store's retries see the failure.

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(self.fs.open(path, mode="rb"), mode="r")

    open_input_file = open_input_stream  # fsspec's files seek: one opening serves both

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        try:
            info = self.fs.info(selector.base_dir)
        except FileNotFoundError:
            if selector.allow_not_found:
                return []
            raise
        if info["type"] != "directory":
            raise NotADirectoryError(selector.base_dir)
        depth = None if selector.recursive else 1
        found = self.fs.find(
            selector.base_dir, maxdepth=depth, withdirs=True, detail=True, on_error="raise"
        )
        base = selector.base_dir.strip("/")
        return [self._create_file_info(p, i) for p, i in found.items() if p.strip("/") != base]


def storage_options(spec: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """fsspec's storage_options for a URL (for `datasets` loaders): the same credentials and
    endpoint as `resolve`; {} for local paths and schemes fsspec configures itself."""
    if url_scheme(spec) in ("s3", "s3a"):
        return _s3_location(spec, spec.split("://", 1)[1] or "x", s3_settings(env)).storage_options
    return {}
