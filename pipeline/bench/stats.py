"""The spread of a bench's per-round figures: median, min-max and a bootstrap interval.

Runs of the same command on a lent GPU host differed by up to 25%, so a figure without its
spread says little. The interval is a percentile bootstrap of the median over the rounds
(seeded, so a report is reproducible from its rounds); with five rounds it is wide, and it
should be: it says how far a rerun's median may land.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from typing import Any

RESAMPLES = 2000
LEVEL = 0.90  # a 90% interval: with 5-7 rounds a 95% one is close to min-max anyway


def bootstrap_median(
    values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """A percentile-bootstrap interval of the median of `values` (`level`, e.g. 0.9)."""
    if not values:
        raise ValueError("no values")
    if len(values) == 1:
        return values[0], values[0]
    draw = random.Random(seed)
    medians = sorted(
        statistics.median(draw.choices(values, k=len(values))) for _ in range(resamples)
    )
    tail = (1 - level) / 2
    lo = medians[int(tail * (resamples - 1))]
    hi = medians[int((1 - tail) * (resamples - 1) + 0.5)]
    return lo, hi


def spread(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """Median, min, max and the bootstrap interval of `values` (e.g. per-round ratios)."""
    lo, hi = bootstrap_median(values)
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        f"bootstrap_{round(LEVEL * 100)}": [round(lo, digits), round(hi, digits)],
        "rounds": len(values),
        "values": [round(v, digits) for v in values],
    }


# Fewer rounds than this make a probe: the docs quote no ratio measured in fewer.
QUOTABLE_ROUNDS = 5


def caution(rounds_done: int, rounds_asked: int) -> str | None:
    """What a report says when it ran fewer rounds than quoting a ratio needs, or than asked."""
    if rounds_done >= QUOTABLE_ROUNDS:
        return None
    why = (
        "" if rounds_done == rounds_asked else f" of the {rounds_asked} asked (the budget ran out)"
    )
    return (
        f"{rounds_done} round{'s' if rounds_done != 1 else ''}{why}: a probe, not a figure to "
        f"quote; quote ratios of >= {QUOTABLE_ROUNDS} rounds (a larger --budget-seconds, or "
        "fewer sides)"
    )


def spread_text(s: dict[str, Any], fmt: str = ".3f") -> str:
    """`1.071 (min-max 0.84-1.16, 90% bootstrap 0.95-1.12, 5 rounds)`."""
    key = f"bootstrap_{round(LEVEL * 100)}"
    lo, hi = s[key]
    return (
        f"{s['median']:{fmt}} (min-max {s['min']:{fmt}}-{s['max']:{fmt}}, "
        f"{round(LEVEL * 100)}% bootstrap {lo:{fmt}}-{hi:{fmt}}, {s['rounds']} round"
        f"{'s' if s['rounds'] != 1 else ''})"
    )
