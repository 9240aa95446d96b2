"""--reuse DIR: find each row's request among an earlier run's committed rows, in batches.

A folder is read only through `pipeline.sinks.shard_files` (its committed shards), each
shard's embedded metadata (`read_shard_metadata`) and the key index beside each shard. A
folder made with other output-changing settings reuses nothing and says which setting
differs; an unreadable or partial one (a shard without its key index, an index that does not
match its shard) is reported and skipped, never trusted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.checkpoint import read_job_record
from pipeline.errors import BatchgenError
from pipeline.records import PromptRow, ResultRow
from pipeline.reuse.index import KEY_DTYPE, MergedIndex, key_index_rows, read_key_index
from pipeline.reuse.keys import RequestKeys, context_difference, folder_settings
from pipeline.sinks import shard_files

log = logging.getLogger("batchgen")

# The columns an engine makes: what a reused row takes from the earlier shard. Everything
# else (id, prompt, kept columns, sampling and adapter notes) comes from the new row.
OUTPUT_COLUMNS = (
    "text",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "logprobs",
    "cumulative_logprob",
    "prompt_logprobs",
    "reasoning",
    "reasoning_tokens",
    "reasoning_ended",
)
CACHED_SHARDS = 4  # shards read back at once: consecutive rows mostly come from one shard


@dataclass(slots=True)
class ReuseCounts:
    """What --reuse found, for the run's report and `batchgen plan`."""

    sources: list[str] = field(default_factory=list)  # folders in use
    skipped: list[str] = field(default_factory=list)  # one line per folder not used, and why
    indexed: int = 0  # prompts findable in the folders in use
    reused: int = 0  # prompts whose outputs were reused
    mismatched: int = 0  # index hits whose shard rows did not match (not reused)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": self.sources,
            "skipped": self.skipped,
            "indexed_prompts": self.indexed,
            "reused_prompts": self.reused,
        }


class EarlierAttempt(list):
    """The results of a row found among the rows this run committed before it was resumed:
    a duplicate of this run's own request, not a reuse of an earlier run's."""


class Reuse:
    """Stamps request keys on built rows and, with --reuse folders, attaches reused outputs.

    Made once per rank; `annotate` runs on the feeder's thread, one built batch at a time.
    """

    def __init__(
        self,
        fingerprint: dict[str, Any],
        folders: tuple[str, ...] = (),
        work_dir: Path | None = None,
        columns: tuple[str, ...] = OUTPUT_COLUMNS,
        committed: list[Path] | None = None,
        shared_dir: Path | None = None,
        others_done: Callable[[], bool] | None = None,
    ) -> None:
        """`committed`: the shards this rank committed in earlier attempts of the same run
        (a resume); a row whose request one of them holds is served from it, as an identical
        request of this run would be had the run not stopped. `shared_dir`: where the index of
        the folders is built once for every rank of the job (else under `work_dir`); it stays
        until a rank closes when `others_done()` says every other rank has finished."""
        self.keys = RequestKeys(fingerprint)
        self.counts = ReuseCounts()
        self.columns = columns
        self.work_dir = work_dir
        self.shared_dir = shared_dir
        self.others_done = others_done
        self._indexes: list[tuple[MergedIndex, int]] = []  # each with its first shard's number
        self._shared: Path | None = None  # the shared index this rank opened
        self._shards: list[Path] = []
        self._own = 0  # shards 0.._own-1 are this run's own (committed by earlier attempts)
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self._warned = False
        if folders or committed:
            assert work_dir is not None
            self._choose(folder_settings(fingerprint), folders, committed or [])
            self._open_indexes(work_dir)

    def _choose(
        self, ours: dict[str, Any], folders: tuple[str, ...], committed: list[Path]
    ) -> None:
        """The shards to index: the run's own first, then each usable folder's."""
        problem = check_shards(committed)
        if problem is None:
            self._shards, self._own = list(committed), len(committed)
        else:  # not trusted: its duplicates are generated again
            log.warning("resume: this rank's earlier shards are not reused: %s", problem)
        for folder in folders:
            shards, problem = check_folder(Path(folder), ours)
            if problem is not None:
                self.counts.skipped.append(f"--reuse {folder}: {problem}")
                log.warning("--reuse %s: %s", folder, problem)
                continue
            self._shards += shards
            self.counts.sources.append(folder)

    def _open_indexes(self, work_dir: Path) -> None:
        """Build the index of the rank's own shards under `work_dir`, and open the folders'
        (built by the first rank to need it, the others waiting for it)."""
        shutil.rmtree(work_dir, ignore_errors=True)  # a killed run's leftovers
        try:
            if self._own:
                own = MergedIndex.build(work_dir / "own", self._shard_indexes(0, self._own))
                self._indexes.append((own, 0))
            if len(self._shards) > self._own:
                self._indexes.append((self._folders_index(work_dir), self._own))
        except (OSError, pa.ArrowException, ValueError) as exc:
            self.close()
            what = ", ".join(self.counts.sources) or "this rank's committed shards"
            raise BatchgenError(
                f"--reuse: building the index of {what} in {work_dir.parent} failed ({exc}); "
                "nothing was generated; free space there, or drop --reuse"
            ) from exc
        self.counts.indexed = sum(index.size for index, _ in self._indexes)
        if self.counts.sources:
            log.info(
                "--reuse: %s earlier requests indexed in %s%s",
                f"{self.counts.indexed:,}",
                ", ".join(self.counts.sources),
                " and this rank's committed shards" if self._own else "",
            )

    def _folders_index(self, work_dir: Path) -> MergedIndex:
        """The index of the folders' shards: in `shared_dir`, named by a digest of the shard
        listing, built there once under a lock by the first rank to need it; the last rank to
        finish removes it (a rank keeps its files open once opened)."""
        shards = self._shards[self._own :]
        if self.shared_dir is None:
            return MergedIndex.build(work_dir / "folders", self._shard_indexes(self._own))
        self._shared = self.shared_dir / listing_digest(shards)
        with shared_lock(self._shared):
            size = MergedIndex.complete(self._shared)
            if size is not None:
                log.info("--reuse: using the index another rank built in %s", self._shared)
                return MergedIndex(self._shared, size)
            shutil.rmtree(self._shared, ignore_errors=True)  # a killed build's leftovers
            started = time.monotonic()
            index = MergedIndex.build(self._shared, self._shard_indexes(self._own))
            index.mark_complete()
            log.info(
                "--reuse: built the index of %s shards in %.1f s in %s (for every rank)",
                f"{len(shards):,}",
                time.monotonic() - started,
                self._shared,
            )
            return index

    def _shard_indexes(
        self, start: int, stop: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for shard in self._shards[start:stop]:
            keys, rows, _ = read_key_index(shard)
            yield keys, rows

    def annotate(self, rows: list[PromptRow]) -> None:
        """Stamp every row's request key; attach `reused` outputs to rows found earlier."""
        self.keys.stamp(rows)
        self.lookup(rows)

    def lookup(self, rows: list[PromptRow]) -> None:
        """Attach `reused` outputs to the rows (already stamped) found in the folders."""
        by_shard: dict[int, list[tuple[PromptRow, int]]] = {}
        asking = [r for r in rows if r.request_key is not None]
        for index, first in self._indexes:  # the run's own shards first
            if not asking:
                break
            wanted = np.array([r.request_key for r in asking], dtype=KEY_DTYPE)
            found, locs = index.lookup(wanted)
            hits = [r for r, f in zip(asking, found, strict=True) if f]
            for row, (shard_no, at) in zip(hits, locs.tolist(), strict=True):
                by_shard.setdefault(first + shard_no, []).append((row, at))
            asking = [r for r, f in zip(asking, found, strict=True) if not f]
        for shard_no, wanted_rows in sorted(by_shard.items()):
            try:
                self._read_back(shard_no, wanted_rows)
            except (OSError, pa.ArrowException) as exc:  # gone or damaged since the start
                self.counts.mismatched += len(wanted_rows)
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "--reuse: reading %s failed (%s); its rows are generated instead",
                        self._shards[shard_no],
                        exc,
                    )

    def _read_back(self, shard_no: int, hits: list[tuple[PromptRow, int]]) -> None:
        """Attach to each (row, position) its earlier outputs, read from one shard at once;
        a position whose rows are not the row's request (a stale index) is not reused."""
        table = self._table(shard_no)
        hits = [(row, at) for row, at in hits if at + row.n <= table.num_rows]
        taken = [at + i for row, at in hits for i in range(row.n)]
        part = table.take(taken).to_pydict()
        source = str(self._shards[shard_no])
        own = shard_no < self._own
        offset = 0
        for row, _ in hits:
            n = row.n
            span = range(offset, offset + n)
            offset += n
            if (
                any(part["request_key"][j] != row.request_key for j in span)
                or [part["sample_index"][j] for j in span] != list(range(n))
                or any(part["error"][j] is not None for j in span)
            ):
                self.counts.mismatched += 1
                continue
            results = EarlierAttempt() if own else []
            for i, j in enumerate(span):
                fields = {c: part[c][j] for c in self.columns if c in part}
                for c in ("logprobs", "prompt_logprobs"):
                    if fields.get(c) is not None:
                        fields[c] = _entries(fields[c])
                # A row of this run's own keeps the origin that row had (None: generated).
                origin = part.get("reused_from", [None] * len(taken))[j] if own else source
                results.append(ResultRow.of(row, i, reused_from=origin, **_complete(fields)))
            row.reused = results
            self.counts.reused += not own

    def _table(self, shard_no: int) -> pa.Table:
        table = self._cache.get(shard_no)
        if table is not None:
            self._cache.move_to_end(shard_no)
            return table
        path = self._shards[shard_no]
        present = set(pq.read_schema(path).names)
        wanted = ["request_key", "sample_index", "error", "reused_from", *self.columns]
        table = pq.read_table(path, columns=[c for c in wanted if c in present])
        self._cache[shard_no] = table
        if len(self._cache) > CACHED_SHARDS:
            self._cache.popitem(last=False)
        return table

    def close(self) -> None:
        """Close the indexes and remove their files (a rank still using the shared one keeps
        its files open)."""
        for index, _ in self._indexes:
            index.close()
        self._indexes = []
        self._cache.clear()
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        if self._shared is not None and (self.others_done is None or self.others_done()):
            with contextlib.suppress(OSError), shared_lock(self._shared):
                shutil.rmtree(self._shared, ignore_errors=True)
        self._shared = None


def listing_digest(shards: list[Path]) -> str:
    """A name for the index of these shards: their paths, sizes and times."""
    h = hashlib.blake2b(digest_size=12)
    for shard in shards:
        st = shard.stat()
        h.update(f"{shard.resolve()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@contextmanager
def shared_lock(index_dir: Path) -> Iterator[None]:
    """Hold the lock of a shared index folder (a POSIX lock, released when its holder dies)."""
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(index_dir.with_name(index_dir.name + ".lock"), "a") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def check_folder(folder: Path, ours: dict[str, Any]) -> tuple[list[Path], str | None]:
    """The committed shards of a --reuse folder, or why it cannot be used."""
    if not folder.is_dir():
        return [], "no such folder; skipped"
    try:
        shards = shard_files(folder)
    except OSError as exc:
        return [], f"unreadable ({exc.strerror or exc}); skipped"
    if not shards:
        return [], "holds no committed shards; nothing to reuse"
    try:
        record = read_job_record(folder)  # the settings every rank of that run shared
    except BatchgenError as exc:
        return [], f"{exc}; skipped"
    if record is None or "fingerprint" not in record:
        return [], "has no readable job record (.batchgen/job.json); skipped"
    changed = context_difference(ours, folder_settings(record["fingerprint"]))
    if changed is not None:
        return [], f"made with other output-changing settings ({changed}); reuses nothing"
    problem = check_shards(shards)
    return ([], problem) if problem is not None else (shards, None)


def check_shards(shards: list[Path]) -> str | None:
    """Why these committed shards cannot be trusted (a key index missing, unreadable or
    not matching its shard), or None. Reads each file's footer only."""
    for shard in shards:
        try:
            shard_rows = key_index_rows(shard)
            actual = pq.read_metadata(shard).num_rows
        except (OSError, pa.ArrowException, ValueError, KeyError) as exc:
            return (
                f"partial: {shard.name} has no readable key index ({type(exc).__name__}: {exc}; "
                "a batchgen without --reuse wrote it, or the folder was copied without its "
                "hidden files); skipped"
            )
        if shard_rows != actual:
            return (
                f"partial: the key index of {shard.name} lists {shard_rows} rows, the shard "
                f"has {actual}; skipped"
            )
    return None


def _entries(entries: list[dict[str, Any]]) -> list[tuple]:
    """Logprob entries as read from Parquet (dicts) in the tuples that ResultRow holds."""
    return [
        (
            e["token_id"],
            e["token"],
            e["logprob"],
            [(t["token_id"], t["token"], t["logprob"]) for t in e["top"] or []],
        )
        for e in entries
    ]


def _complete(fields: dict[str, Any]) -> dict[str, Any]:
    """ResultRow's required engine fields, present even when the shard lacks a column."""
    for name in ("text", "finish_reason", "prompt_tokens", "completion_tokens"):
        fields.setdefault(name, None)
    return fields
