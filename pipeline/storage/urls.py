"""Telling a URL from a local path, and refusing a URL where batchgen cannot use it yet.

A URL is never taken for a local path: `--output s3://bucket/out` must not make a folder `s3:`.
"""

from __future__ import annotations

import re

from pipeline.errors import ConfigError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

# Schemes batchgen can write its --output to: S3 and S3-compatible stores, whose conditional
# writes (If-None-Match / If-Match) make the rank's lease and the job record atomic, and Google
# Cloud Storage, whose preconditions (ifGenerationMatch) do the same (docs/object-stores.md).
# Any other URL is refused before anything is created.
OUTPUT_SCHEMES: tuple[str, ...] = ("s3", "s3a", "gs")


def url_scheme(spec: str) -> str | None:
    """The scheme of `spec` ('s3', 'gs', ...) when it is a URL; None for a local path."""
    match = _URL.match(spec)
    return match.group(1).lower() if match else None


def is_url(spec: str) -> bool:
    """Whether `spec` is a URL (`scheme://...`) rather than a local path."""
    return url_scheme(spec) is not None


def require_output_location(spec: str, flag: str = "--output") -> None:
    """Refuse an output URL whose scheme batchgen cannot write yet, in one line (ConfigError)."""
    scheme = url_scheme(spec)
    if scheme is None or scheme in OUTPUT_SCHEMES:
        return
    supported = ", ".join(f"{s}://" for s in OUTPUT_SCHEMES)
    raise ConfigError(
        f"{flag} {spec}: {scheme}:// output is not supported (URL schemes batchgen can "
        f"write: {supported}); give a local folder (a mounted bucket works), or write locally "
        "and upload the finished folder (docs/object-stores.md)"
    )
