"""Where batchgen reads and writes: local paths and object stores, behind one small API.

  urls.py       a URL is never a local path; refusing schemes batchgen cannot write yet
  resolve.py    a path or URL -> (pyarrow filesystem, path), credentials by the usual conventions
  retry.py      backoff with jitter on transient errors; StoreDown after a bounded time
  store.py      write-once objects, read, list, delete, conditional writes
  lease.py      one writer per rank: a lease object with holder, heartbeat and expiry
  preflight.py  one-line answers within seconds: endpoint, credentials, bucket, write permission
  s3http.py     the signed S3 requests pyarrow lacks (If-None-Match / If-Match)
  gcshttp.py    gs:// over GCS's JSON API (ifGenerationMatch), and as a pyarrow filesystem

pyarrow is imported by resolve, store, lease and preflight; import those modules where used.
"""

from pipeline.storage.urls import is_url, require_output_location, url_scheme

__all__ = ["is_url", "require_output_location", "url_scheme"]
