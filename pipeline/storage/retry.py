"""Retries of transient object-store errors with exponential backoff and full jitter, bounded
in time: a store that stays down raises `StoreDown`, so the caller commits what it has and
exits 75 (rerun to resume) instead of spinning forever."""

from __future__ import annotations

import ftplib
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pipeline.errors import BatchgenError

log = logging.getLogger("batchgen")
T = TypeVar("T")

# What pyarrow's S3 filesystem, gcshttp, fsspec and http.client say for faults that pass: server
# errors, throttling, reset or refused connections, timeouts.
_TRANSIENT = re.compile(
    r"HTTP status (429|500|502|503|504)|\b(500|502|503|504)\b.*(error|unavailable)|SlowDown|"
    r"Throttl|RequestTimeout|InternalError|INTERNAL_FAILURE|internal error|ServiceUnavailable|"
    r"NETWORK_CONNECTION|"
    r"curlCode: (6|7|18|28|52|55|56)|Could not connect|Connection (reset|refused|aborted)|"
    r"timed out|Timeout|Broken pipe|Remote end closed|UNAVAILABLE",
    re.IGNORECASE,
)


class StoreDown(BatchgenError):
    """The store kept failing for longer than the retry budget; committed work is safe."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff doubles from `base_s` up to `cap_s`, each sleep drawn uniformly below it (full
    jitter, so a thousand ranks do not retry in step); gives up after `deadline_s`."""

    base_s: float = 0.5
    cap_s: float = 20.0
    deadline_s: float = 300.0
    warn: bool = True  # log each call's first retry (the preflight words its own one line)

    def delays(self, rng: random.Random | None = None):
        """Endless sleeps of this policy (the deadline is the caller's)."""
        rng = rng or random.Random()
        attempt = 0
        while True:
            yield rng.uniform(0, min(self.cap_s, self.base_s * 2**attempt))
            attempt += 1


def is_transient(exc: BaseException) -> bool:
    """Whether an error is worth retrying (the store may answer next time). FTP's 4xx replies
    (e.g. '421 Control connection timed out') and a connection closed under a reply (EOF) are
    the FTP filesystem's resets."""
    if isinstance(exc, (TimeoutError, ConnectionError, ftplib.error_temp, EOFError)):
        return True
    return isinstance(exc, OSError) and bool(_TRANSIENT.search(str(exc)))


def with_retries(
    what: str,
    fn: Callable[[], T],
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`fn()`, retried on transient errors; `StoreDown` once `policy.deadline_s` has passed.
    Other errors (missing object, access denied) are raised at once: retrying cannot fix them."""
    policy = policy or RetryPolicy()
    start = clock()
    for tries, delay in enumerate(policy.delays(), start=1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            elapsed = clock() - start
            if elapsed + delay > policy.deadline_s:
                raise StoreDown(
                    f"{what}: the store kept failing for {elapsed:.0f} s ({tries} tries; last: "
                    f"{_first_line(exc)}); committed work is safe; rerun the same command to "
                    "resume once the store answers"
                ) from exc
            if tries == 1 and policy.warn:
                log.warning("%s: %s; retrying with backoff", what, _first_line(exc))
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - delays() never ends


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
