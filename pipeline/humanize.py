"""Numbers as a person reads them in logs, `status`, `plan` and reports: one spelling each."""

from __future__ import annotations


def fmt_duration(seconds: float, tenths: bool = False) -> str:
    """`1h02m03s`, `2m03s`, `3s`; with `tenths`, under a minute as `3.4s` (short timings)."""
    if tenths and seconds < 60:
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def plural(n: int, word: str) -> str:
    """`1 shard`, `1,200 shards`."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")
