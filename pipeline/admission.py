"""The order rows are admitted to the engine: input order, or prefix-grouped windows.

vLLM's prefix cache serves a prompt whose leading tokens another request computed recently. Rows
that share a long prefix but lie far apart in the input (several questions over one document,
spread through a shuffled dataset) miss it: by the time the second arrives, the first's blocks
are evicted. `grouped` reads `window` rows ahead and admits each window's rows in the order of
their prompt tokens, so rows with the longest common prefixes are adjacent (a trie's order):
the first of a group computes the shared prefix, the rest find it cached.

It changes nothing a row gets (the engine sends each request alone); only which rows share a
step, so greedy texts stay equal in float32 and may differ in bfloat16 as with any batch
change. Resume is unaffected: committed rows are known by position whatever their order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pipeline.records import PromptRow


def grouped(
    batches: Iterable[list[PromptRow]], window: int, chunk: int
) -> Iterator[list[PromptRow]]:
    """The rows of `batches`, each `window` of them (the last may be shorter) in the order of
    their adapter and prompt tokens, yielded in lists of at most `chunk` rows."""
    pending: list[PromptRow] = []
    for rows in batches:
        pending.extend(rows)
        while len(pending) >= window:
            head, pending = pending[:window], pending[window:]
            yield from _chunks(sorted(head, key=_key), chunk)
    if pending:
        yield from _chunks(sorted(pending, key=_key), chunk)


def _key(row: PromptRow) -> tuple[str, list[int]]:
    # A row with no tokens (an error row, or one --reuse answers) sorts first: it costs nothing.
    return (row.adapter or "", row.token_ids or [])


def _chunks(rows: list[PromptRow], size: int) -> Iterator[list[PromptRow]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]
