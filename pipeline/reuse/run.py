"""What a run calls: open --reuse for a rank, count the engine's requests, report the counts."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.reuse.dedup import RequestDedup
from pipeline.reuse.lookup import OUTPUT_COLUMNS, Reuse


def open_reuse(
    fingerprint: dict[str, Any],
    folders: tuple[str, ...],
    out_dir: Path,
    rank: int,
    columns: list[str],
) -> Reuse:
    """The rank's request keys and --reuse lookups; the merged index is built under the run's
    state folder (on the output's disk, sized like the folders' keys) and removed at close."""
    from pipeline.checkpoint import STATE_DIR

    work_dir = out_dir / STATE_DIR / f"reuse-rank-{rank:05d}"
    wanted = tuple(c for c in OUTPUT_COLUMNS if c in columns)
    return Reuse(fingerprint, folders, work_dir, wanted)


def engine_requests(engine: Any) -> int | None:
    """Requests the engine accepted so far (its own count; None for engines that keep none)."""
    return getattr(engine, "requests_accepted", None)


def reuse_report(
    reuse: Reuse, dedup: RequestDedup, prompts: int, requests: int | None
) -> dict[str, Any]:
    """The run report's `reuse` entry: prompts generated, reused and deduplicated this run,
    and the requests the engine itself accepted."""
    return {
        "generated_prompts": prompts - dedup.reused - dedup.duplicates,
        "reused_prompts": dedup.reused,
        "duplicate_prompts": dedup.duplicates,
        "engine_requests": requests,
        **{k: v for k, v in reuse.counts.to_dict().items() if k != "reused_prompts"},
    }


@contextmanager
def planned_reuse(
    fingerprint: dict[str, Any], folders: tuple[str, ...], rank: int
) -> Iterator[Reuse]:
    """`batchgen plan`'s view of --reuse: the same lookups as the run, with the merged index in
    a temporary folder (a plan writes nothing in --output)."""
    with tempfile.TemporaryDirectory(prefix="batchgen-plan-reuse-") as tmp:
        reuse = Reuse(fingerprint, folders, Path(tmp) / f"rank-{rank:05d}")
        try:
            yield reuse
        finally:
            reuse.close()
