"""Telling a URL from a local path, and refusing an output URL batchgen cannot write.

A URL is never taken for a local path: `--output s3://bucket/out` must not make a folder `s3:`.
"""

from __future__ import annotations

import re

from pipeline.errors import ConfigError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

# Schemes batchgen writes with the store's own conditional writes: S3 and S3-compatible stores
# (If-None-Match / If-Match) and Google Cloud Storage (ifGenerationMatch), which make the rank's
# lease and the job record atomic. Any other scheme an installed fsspec implementation knows
# (ftp://, sftp://, az://, ...) is written too, its lease and job record
# check-then-write (docs/object-stores.md); those below are refused before anything is created.
OUTPUT_SCHEMES: tuple[str, ...] = ("s3", "s3a", "gs")
_REFUSED: dict[str, str] = {
    "hf": "the Hub has no conditional writes and makes every write and delete a commit, so "
    "batchgen cannot hold a rank's lease or write its state there; write locally and publish "
    "the finished folder with `hf upload`",
    "gcs": "spell it gs://, which batchgen writes with GCS's own preconditions",
    "file": "give the local folder itself, without file://",
    "http": "fsspec's HTTP filesystem is read-only; give a local folder or a store URL",
    "https": "fsspec's HTTP filesystem is read-only; give a local folder or a store URL",
    "github": "fsspec's GitHub filesystem is read-only; give a local folder or a store URL",
    "memory": "memory:// lives in one process and is gone when the run ends; give a local folder",
}


def url_scheme(spec: str) -> str | None:
    """The scheme of `spec` ('s3', 'gs', ...) when it is a URL; None for a local path."""
    match = _URL.match(spec)
    return match.group(1).lower() if match else None


def is_url(spec: str) -> bool:
    """Whether `spec` is a URL (`scheme://...`) rather than a local path."""
    return url_scheme(spec) is not None


def require_output_location(spec: str, flag: str = "--output") -> None:
    """Refuse an output URL batchgen cannot write, in one line (ConfigError): a scheme in
    `_REFUSED`, or one no installed fsspec implementation knows (naming what to install)."""
    scheme = url_scheme(spec)
    if scheme is None or scheme in OUTPUT_SCHEMES:
        return
    head = f"{flag} {spec}: {scheme}:// output is not supported"
    if scheme in _REFUSED:
        raise ConfigError(f"{head}: {_REFUSED[scheme]} (docs/object-stores.md)")
    import fsspec  # only for a URL that is neither s3:// nor gs://

    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as exc:
        raise ConfigError(
            f"{flag} {spec}: {scheme}:// needs an fsspec implementation that is not installed; "
            f"pip install {_package(scheme, str(exc))}, or give a local folder "
            "(docs/object-stores.md)"
        ) from exc
    except ValueError as exc:
        raise ConfigError(
            f"{head} (no fsspec implementation knows it; batchgen writes s3://, s3a://, gs:// "
            "and the URLs of installed fsspec filesystems); give a local folder (a mounted "
            "bucket works), or write locally and upload the finished folder "
            "(docs/object-stores.md)"
        ) from exc


def _package(scheme: str, error: str) -> str:
    """The package that brings `scheme`'s fsspec implementation, as fsspec's registry says."""
    from fsspec.registry import known_implementations

    known = known_implementations.get(scheme, {})
    top = known.get("class", "").split(".", 1)[0]
    if top and top != "fsspec":
        return top  # adlfs.AzureBlobFileSystem -> adlfs
    quoted = re.search(r'"([^"]+)"', known.get("err", "") or error)  # 'requires "paramiko"'
    return quoted.group(1) if quoted else f"the fsspec implementation of {scheme}://"
