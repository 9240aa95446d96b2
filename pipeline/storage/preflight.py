"""Checks of a store location that answer within seconds, before any engine starts, each
failure in one line naming the fix: a wrong endpoint, no credentials, refused credentials, a
missing bucket, no permission to write (a real write and delete of a probe object)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from pipeline.errors import ConfigError
from pipeline.storage import s3http
from pipeline.storage.gcshttp import EMULATOR_ENV, GcsError
from pipeline.storage.resolve import Location, resolve
from pipeline.storage.retry import RetryPolicy, is_transient
from pipeline.storage.store import ObjectStore, unique_name

# Preflight answers fast: a transient error gets two quick retries, then counts as unreachable.
PREFLIGHT_POLICY = RetryPolicy(base_s=0.2, cap_s=1.0, deadline_s=3.0, warn=False)

_BAD_KEYS = re.compile(r"InvalidAccessKeyId|SignatureDoesNotMatch|InvalidToken|ExpiredToken")
_DENIED = re.compile(r"ACCESS_DENIED|AccessDenied|Forbidden|\b403\b|PERMISSION_DENIED")
_NO_BUCKET = re.compile(r"NoSuchBucket|NO_SUCH_BUCKET|bucket does not exist", re.IGNORECASE)
_NO_CREDS = re.compile(r"credentials|NoCredentials|Unable to locate", re.IGNORECASE)


def preflight(spec: str | Location, write: bool = True, flag: str = "--output") -> Location:
    """Check that `spec` can be read (and written with `write`): the resolved location, or a
    ConfigError in one line naming the fix. Local paths are left to the callers' own checks."""
    loc = spec if isinstance(spec, Location) else resolve(spec)
    if loc.scheme == "file":
        return loc
    store = ObjectStore(loc, PREFLIGHT_POLICY)
    try:
        if loc.gcs is not None:
            gcs = loc.gcs
            if not store._retry("checking", lambda: gcs.bucket_exists(loc.bucket)):
                raise ConfigError(_missing_bucket(loc, flag))
        else:
            if store.conditional:
                _signed_probe(store, loc, flag)
            # An fsspec path that starts with '/' (ftp://host/a/b) is a server's folders, made
            # as needed; there is no bucket to look for.
            if loc.bucket:
                bucket = store._retry("checking", lambda: loc.fs.get_file_info(loc.bucket))
                if bucket.type == pafs.FileType.NotFound:
                    raise ConfigError(_missing_bucket(loc, flag))
        # A listing needs the credentials to be accepted (HEAD answers without saying why).
        list(store.iter_objects(_probe_prefix(loc)))
        if write:
            name = unique_name(".batchgen/preflight/probe", ".txt")
            store.write(name, b"batchgen write probe; safe to delete\n")
            store.delete(name)
    except ConfigError:
        raise
    except Exception as exc:  # StoreDown, OSError: worded below
        raise ConfigError(explain(loc, exc, flag, write)) from exc
    return loc


def _probe_prefix(loc: Location) -> str:
    return ".batchgen"


def _signed_probe(store: ObjectStore, loc: Location, flag: str) -> None:
    """A signed GET of an object that is not there: S3 then says in its error code whether the
    bucket is missing or the keys are wrong, where a HEAD only says 403 or 404."""
    resp = store._signed("GET", ".batchgen/preflight-probe-absent")
    code = s3http.error_code(resp) or ""
    if code == "NoSuchBucket":
        raise ConfigError(_missing_bucket(loc, flag))
    if _BAD_KEYS.search(code):
        raise ConfigError(explain(loc, OSError(code), flag, write=False))


def _missing_bucket(loc: Location, flag: str) -> str:
    make = {
        "s3": f"aws s3 mb s3://{loc.bucket}",
        "gs": f"gcloud storage buckets create gs://{loc.bucket}",
    }.get(loc.scheme, f"create the bucket {loc.bucket}")
    return f"{flag} {loc.url}: the bucket {loc.bucket!r} does not exist at {_where(loc)}; create it ({make}) or fix the URL"


def _where(loc: Location) -> str:
    if loc.s3 is not None:
        return loc.s3.endpoint or f"AWS S3 ({loc.s3.region})"
    if loc.gcs is not None:
        return loc.gcs.settings.where()
    host = urlsplit(loc.url).netloc.rpartition("@")[2]  # never the user and password
    return f"{loc.scheme}://{host}"


def explain(loc: Location, exc: BaseException, flag: str, write: bool) -> str:
    """One line for a failed preflight: what failed and the fix."""
    text = str(exc)
    head = f"{flag} {loc.url}"
    creds = loc.s3.source if loc.s3 is not None and loc.s3.has_keys else None
    if _NO_BUCKET.search(text):
        return _missing_bucket(loc, flag)
    if is_transient(exc) or "the store kept failing" in text:
        if loc.scheme == "s3":
            fix = "check AWS_ENDPOINT_URL (or the profile's endpoint_url) and that the store is up"
        elif loc.gcs is not None and loc.gcs.settings.emulator:
            fix = f"check {EMULATOR_ENV} (unset it for Google Cloud Storage itself) and that the emulator is up"
        else:
            fix = "check the network and that the store is up"
        return f"{head}: cannot reach the store at {_where(loc)}; {fix}"
    if loc.gcs is not None and isinstance(exc, GcsError) and exc.status in (401, 403):
        who = loc.gcs.settings.source
        if exc.status == 401:
            return f"{head}: the store refused {who} ({_first(text)}); run `gcloud auth application-default login` again, or fix GOOGLE_APPLICATION_CREDENTIALS"
        action = "write to" if write else "read"
        return f"{head}: permission denied ({_first(text)}); {who} may not {action} it: grant them read, write and delete on gs://{loc.bucket} (roles/storage.objectAdmin)"
    if _BAD_KEYS.search(text):
        return f"{head}: the store refused the credentials from {creds or 'the default chain'}; fix AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile)"
    if _DENIED.search(text) or _NO_CREDS.search(text):
        if loc.scheme == "s3" and creds is None:
            return f"{head}: no credentials found (and the store refused anonymous access); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        if loc.scheme == "gs" and _NO_CREDS.search(text):
            return f"{head}: no Google credentials; run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
        action = "write to" if write else "read"
        return f"{head}: permission denied ({_first(text)}); the credentials from {creds or 'the default chain'} may not {action} it: grant them read, write and delete on {loc.bucket}"
    return f"{head}: {_first(text)}"


def _first(text: str) -> str:
    return (text.strip().splitlines() or ["error"])[0][:200]
