"""What every input reader shares: the batch it yields, the protocol the runner reads, and how
the rows are split among ranks. The readers import this module, never the package, so the
package's `open_source` can import them without a cycle."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import pyarrow as pa

# One yielded batch: the ids of its rows and the requested columns as Python lists.
Batch = tuple[list[str], dict[str, list[Any]]]


class Source(Protocol):
    """What the runner needs from an input."""

    columns: list[str]
    total_rows: int | None  # rows in this rank's slice, when known up front

    def field(self, name: str) -> pa.Field: ...

    def identity(self) -> dict[str, Any]: ...

    def iter_batches(
        self, columns: list[str], batch_rows: int, start: int = 0, stop: int | None = None
    ) -> Iterator[Batch]:
        """The rows at positions [start, stop) of this rank's slice (all of it by default), in
        order: a resume reads only the rows it has not committed. Readers with random access
        (Parquet, an Arrow-backed dataset) read nothing before `start`; the others skip it."""
        ...

    def for_rank(self, rank: int) -> Source: ...


def rank_range(total: int, num_ranks: int, rank: int) -> tuple[int, int]:
    """The contiguous [start, stop) rows of `total` owned by one rank; sizes differ by at most 1."""
    base, extra = divmod(total, num_ranks)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
