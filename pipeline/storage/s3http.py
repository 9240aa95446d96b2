"""A few signed S3 requests that pyarrow's filesystem does not offer: conditional writes
(If-None-Match / If-Match) for leases, with AWS Signature Version 4 over the standard library.

Only what the lease needs: PUT with a condition, GET with its ETag, DELETE. Credentials are
passed in by the resolver and never logged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.client
import urllib.parse
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class S3Endpoint:
    """Where and as whom to send requests; `repr` hides the secret."""

    endpoint: str  # scheme://host[:port]
    region: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class S3Response:
    """Status, ETag and body of one request."""

    status: int
    etag: str | None
    body: bytes


def _sign(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def request(
    ep: S3Endpoint,
    method: str,
    bucket: str,
    key: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> S3Response:
    """One path-style request signed with SigV4; raises OSError when the store cannot be reached."""
    url = urllib.parse.urlsplit(ep.endpoint)
    path = "/" + urllib.parse.quote(f"{bucket}/{key}", safe="/-_.~")
    now = dt.datetime.now(dt.UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(body).hexdigest()
    hdrs = {
        "host": url.netloc,
        "x-amz-content-sha256": payload,
        "x-amz-date": amz_date,
        **{k.lower(): v for k, v in (headers or {}).items()},
    }
    if ep.session_token:
        hdrs["x-amz-security-token"] = ep.session_token
    names = sorted(hdrs)
    canonical = "\n".join(
        [
            method,
            path,
            "",
            "".join(f"{n}:{hdrs[n].strip()}\n" for n in names),
            ";".join(names),
            payload,
        ]
    )
    scope = f"{day}/{ep.region}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    k = _sign(("AWS4" + ep.secret_key).encode(), day)
    for part in (ep.region, "s3", "aws4_request"):
        k = _sign(k, part)
    signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    hdrs["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={ep.access_key}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(url.netloc, timeout=ep.timeout)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return S3Response(resp.status, resp.getheader("ETag"), data)
    finally:
        conn.close()


def error_code(resp: S3Response) -> str | None:
    """The <Code> of an S3 error body ('NoSuchBucket', 'AccessDenied', ...), if any."""
    start = resp.body.find(b"<Code>")
    end = resp.body.find(b"</Code>", start)
    return resp.body[start + 6 : end].decode(errors="replace") if start >= 0 and end > 0 else None
