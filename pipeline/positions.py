"""Which input rows of a rank are committed, as ranges of their positions.

A row's position is its index in the rank's slice of the input (`PromptRow.seq`). The engine
finishes rows nearly in input order, so a shard's positions compress to a few ranges, and the
union over every shard of a rank to one range plus the few rows that were in flight at a
crash: what resume holds in memory grows with shards, not with rows (a set of every id weighed
about 121 bytes a row: 12 GB at 100M rows).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable


class Positions:
    """Sorted, disjoint, half-open ranges [start, stop) of input positions."""

    __slots__ = ("_starts", "_stops")

    def __init__(self, ranges: Iterable[Iterable[int]] = ()) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        self.update(ranges)

    @classmethod
    def of(cls, positions: Iterable[int]) -> Positions:
        """The ranges covering these positions (any order, repeats allowed)."""
        ranges: list[list[int]] = []
        for p in sorted(set(positions)):
            if ranges and ranges[-1][1] == p:
                ranges[-1][1] = p + 1
            else:
                ranges.append([p, p + 1])
        return cls(ranges)

    def update(self, ranges: Iterable[Iterable[int]]) -> None:
        """Add ranges, merging those that touch or overlap."""
        pairs = sorted([*zip(self._starts, self._stops, strict=True), *map(tuple, ranges)])
        starts: list[int] = []
        stops: list[int] = []
        for start, stop in pairs:
            if start >= stop:
                continue
            if stops and start <= stops[-1]:
                stops[-1] = max(stops[-1], stop)
            else:
                starts.append(start)
                stops.append(stop)
        self._starts, self._stops = starts, stops

    def count(self) -> int:
        """How many positions the ranges cover."""
        return sum(stop - start for start, stop in zip(self._starts, self._stops, strict=True))

    def missing(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The parts of [lo, hi) that no range covers, in order."""
        gaps: list[tuple[int, int]] = []
        i = max(bisect.bisect_right(self._starts, lo) - 1, 0)
        at = lo
        while at < hi and i < len(self._starts):
            start, stop = self._starts[i], self._stops[i]
            if stop <= at:
                i += 1
                continue
            if start >= hi:
                break
            if start > at:
                gaps.append((at, start))
            at = max(at, stop)
            i += 1
        if at < hi:
            gaps.append((at, hi))
        return gaps

    def __contains__(self, position: int) -> bool:
        i = bisect.bisect_right(self._starts, position) - 1
        return i >= 0 and position < self._stops[i]

    def __len__(self) -> int:
        """The number of ranges (what the structure weighs), not of positions."""
        return len(self._starts)

    def to_list(self) -> list[list[int]]:
        """[[start, stop], ...], as JSON and Parquet metadata store them."""
        return [[a, b] for a, b in zip(self._starts, self._stops, strict=True)]
