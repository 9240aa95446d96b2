"""`--limit N`: the first N rows of a rank's slice, for a quick try of a job.

Row ids and the source's identity are the full input's, so a later run without --limit (or with
a larger one) resumes: it skips the rows already committed and does the rest."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline.sources import Batch, Source


class LimitedSource:
    """The first `limit` rows of `source`."""

    def __init__(self, source: Source, limit: int) -> None:
        self.inner, self.limit = source, limit
        self.columns = source.columns
        total = source.total_rows
        self.total_rows = limit if total is None else min(total, limit)
        # Whether rows are left out: a run that does all of these has not done the input.
        self.cuts = total is None or total > limit

    def field(self, name: str) -> pa.Field:
        return self.inner.field(name)

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def for_rank(self, rank: int) -> LimitedSource:
        """The first `limit` rows of another rank's slice."""
        return LimitedSource(self.inner.for_rank(rank), self.limit)

    def iter_batches(
        self, columns: list[str], batch_rows: int, start: int = 0, stop: int | None = None
    ) -> Iterator[Batch]:
        stop = self.limit if stop is None else min(stop, self.limit)
        left = stop - start
        if left <= 0:
            return
        for ids, cols in self.inner.iter_batches(columns, min(batch_rows, left), start, stop):
            if len(ids) >= left:
                yield ids[:left], {name: values[:left] for name, values in cols.items()}
                return
            left -= len(ids)
            yield ids, cols
