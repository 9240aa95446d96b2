"""What a run calls: open --reuse for a rank, count the engine's requests, report the counts."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.reuse.dedup import RequestDedup
from pipeline.reuse.lookup import OUTPUT_COLUMNS, Reuse
from pipeline.sinks import shard_files
from pipeline.storage.outpath import is_store


def open_reuse(
    fingerprint: dict[str, Any],
    folders: tuple[str, ...],
    out_dir: Path,
    rank: int,
    columns: list[str],
) -> Reuse:
    """The rank's request keys and --reuse lookups; the merged index is built under the run's
    state folder (on the output's disk, sized like the folders' keys) and removed at close.

    Called once the rank's resume state is open: the shards then in the rank's folder are the
    ones earlier attempts committed (adopted, or removed by --overwrite), and a resumed run
    serves a row whose request one of them holds from it instead of generating it again."""
    from pipeline.checkpoint import STATE_DIR

    work_dir = out_dir / STATE_DIR / f"reuse-rank-{rank:05d}"
    wanted = tuple(c for c in OUTPUT_COLUMNS if c in columns)
    shared = out_dir / STATE_DIR / "reuse-index"  # the folders' index: one for every rank
    # Shards on an object store carry no key index (pipeline.sinks writes it beside local
    # shards only): there a resume generates again what an earlier attempt's rows would serve.
    committed = [] if is_store(out_dir) else shard_files(out_dir, rank)
    others = partial(_others_finished, out_dir, rank)
    return Reuse(fingerprint, folders, work_dir, wanted, committed, shared, others)


def _others_finished(out_dir: Path, rank: int) -> bool:
    """Whether every other rank of the job has finished (so no rank needs the shared index)."""
    from pipeline.errors import BatchgenError
    from pipeline.rankstate import Manifest

    try:
        own = Manifest.load(out_dir, rank)
        if own is None:
            return True
        for other in range(own.num_ranks):
            if other == rank:
                continue
            manifest = Manifest.load(out_dir, other)
            if manifest is None or manifest.status != "finished":
                return False
    except (OSError, BatchgenError):
        return False
    return True


def engine_requests(engine: Any) -> dict[str, int | None]:
    """The engine's own request counts so far: the requests it accepted, and (vLLM with its
    stats on) the requests vLLM itself counts as finished; None where an engine keeps none."""
    finished = getattr(engine, "finished_requests", None)
    return {
        "accepted": getattr(engine, "requests_accepted", None),
        "vllm_finished": finished() if finished is not None else None,
    }


def requests_since(before: dict[str, int | None], now: dict[str, int | None]) -> dict[str, Any]:
    """The counts of `engine_requests` made between two readings."""
    return {k: None if now[k] is None or before[k] is None else now[k] - before[k] for k in now}


def reuse_report(
    reuse: Reuse, dedup: RequestDedup, prompts: int, requests: dict[str, Any]
) -> dict[str, Any]:
    """The run report's `reuse` entry: prompts generated, reused and deduplicated this run,
    and the requests the engine itself accepted."""
    return {
        "generated_prompts": prompts - dedup.reused - dedup.duplicates,
        "reused_prompts": dedup.reused,
        "duplicate_prompts": dedup.duplicates,
        "engine_requests": requests["accepted"],
        "vllm_finished_requests": requests["vllm_finished"],
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
