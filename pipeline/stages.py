"""The two threads that keep the engine off every I/O path.

Feeder     reads the input ahead of the engine, skips committed rows, builds requests;
Committer  groups results into shards and commits each (write, fsync, rename, manifest).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pipeline.admission import grouped
from pipeline.checkpoint import Checkpoint, manifest_path
from pipeline.engines import StopFlags
from pipeline.idcheck import UniqueIds
from pipeline.positions import Positions
from pipeline.prompts import PromptBuilder
from pipeline.records import PromptRow, ResultRow
from pipeline.sinks import ParquetShardWriter, ShardInfo, shard_name
from pipeline.sources import Source

READ_BATCH_ROWS = 1024
# A resume skips committed rows unread, but reads through a committed run shorter than this
# between rows to do (rows finished out of order at a crash): one read, not one per gap.
SKIP_MIN_ROWS = 1 << 16
FIRST_CHUNK_ROWS = 64
# Logprob entries (tokens and their top-k alternatives) a shard may hold before it is committed
# whatever its row count: ~150 MB of Python objects, so --logprobs 20 on long outputs stays flat.
MAX_SHARD_ENTRIES = 1_000_000

_END = object()


class Stage(threading.Thread):
    """A daemon thread of the pipeline whose end can be waited for through a stop signal.

    `ended` is set when `run` returns. `wait_ended` waits on it where `join` would not do: a
    command whose stop signal raises an exception (tune's and bench's Stopped) may be stopped
    inside the join, and the process would then exit with the thread inside pyarrow's C++ code,
    which aborts it ("terminate called without an active exception"); an interrupted
    `Thread.join` also stops waiting for good on CPython 3.11.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.ended = threading.Event()

    def run(self) -> None:
        try:
            self.work()
        finally:
            self.ended.set()

    def work(self) -> None:
        raise NotImplementedError

    def wait_ended(self) -> None:
        """`join()`, unbounded like it (a committer may be finishing a shard on a slow store),
        that a stop raised meanwhile does not cut short: the stop is raised once `run` returned.
        A thread that never began is not waited for (a feeder then reads nothing)."""
        stop: BaseException | None = None
        while self.ident is not None and not self.ended.is_set():
            try:
                self.ended.wait()
            except BaseException as exc:  # the stop signal's exception: raised once ended
                stop = stop or exc
        if stop is not None:
            raise stop


class Feeder(Stage):
    """Reads the input ahead of the engine: skips committed rows, renders and tokenizes prompts."""

    def __init__(
        self,
        source: Source,
        builder: PromptBuilder,
        done: Positions,
        id_column: str | None,
        flags: StopFlags,
        annotate: Callable[[list[PromptRow]], None] | None = None,
        batch_rows: int = READ_BATCH_ROWS,
        depth: int = 16,
        group_window: int = 0,
    ) -> None:
        super().__init__(name="batchgen-feeder")
        self.source, self.builder = source, builder
        self.done, self.id_column = done, id_column
        self.flags = flags
        self.annotate = annotate
        self.batch_rows = batch_rows
        self.group_window = group_window  # 0: input order; else see pipeline/admission.py
        self.queue: queue.Queue = queue.Queue(maxsize=depth)  # of lists of PromptRow
        self.error: BaseException | None = None
        self.exhausted = False

    def work(self) -> None:
        try:
            self._read()
        except BaseException as exc:  # surfaced by the runner with its own message
            self.error = exc
        finally:
            self._put(_END, force=True)

    def _read(self) -> None:
        if self.flags.stop.is_set():
            return  # stopped before this thread began: `wait_ended` may not have waited for it
        batches = request_batches(
            self.source, self.builder, self.done, self.id_column, self.batch_rows, self.annotate
        )
        if self.group_window:
            batches = grouped(batches, self.group_window, self.batch_rows)
        for rows in batches:
            if not self._put(rows):
                return
        self.exhausted = True

    def _put(self, item: Any, force: bool = False) -> bool:
        while True:
            if self.flags.stop.is_set() and not force:
                return False
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                # The consumer is gone only once the run is stopping: then make room for the end
                # marker (dropped rows are not committed, so a resume redoes them). Before that
                # a full queue means a busy engine, and dropping a batch here would let the run
                # finish without those rows.
                if force and self.flags.stop.is_set():
                    with contextlib.suppress(queue.Empty):
                        self.queue.get_nowait()

    def feed(self) -> Iterator[PromptRow | None]:
        """Rows for the engine; None whenever nothing is ready yet, so the engine keeps stepping."""
        while True:
            try:
                item = self.queue.get(timeout=0.05)
            except queue.Empty:
                yield None
                continue
            if item is _END:
                return
            yield from item


def request_batches(
    source: Source,
    builder: PromptBuilder,
    done: Positions,
    id_column: str | None,
    batch_rows: int = READ_BATCH_ROWS,
    annotate: Callable[[list[PromptRow]], None] | None = None,
) -> Iterator[list[PromptRow]]:
    """The requests of every row not yet committed (`done` holds committed positions), in input
    order, in chunks: what a run sends the engine (the feeder's thread runs this) and what
    `batchgen plan` counts. With `id_column`, its values are checked unique over the whole
    rank's input, committed rows included (see pipeline/idcheck.py). `annotate` sees each chunk
    once its requests are final (pipeline.reuse stamps keys and finds reused rows)."""
    for rows in _built_batches(source, builder, done, id_column, batch_rows):
        if annotate is not None:
            annotate(rows)
        yield rows


def _built_batches(
    source: Source,
    builder: PromptBuilder,
    done: Positions,
    id_column: str | None,
    batch_rows: int,
) -> Iterator[list[PromptRow]]:
    columns = list(builder.columns())
    if id_column is not None and id_column not in columns:
        columns.append(id_column)
    unique = UniqueIds(id_column) if id_column is not None else None
    spans = spans_to_read(done, source.total_rows)
    # Rows go to the engine in chunks that start small and double up to a whole batch: the
    # engine starts on the first 64 rows (~10 ms to tokenize) instead of waiting for a
    # batch of 1,024 (~0.1 s), which is most of batchgen's start on a short run.
    chunk = min(FIRST_CHUNK_ROWS, batch_rows)
    try:
        for lo, hi in spans:
            seq = lo
            for ids, cols in source.iter_batches(columns, batch_rows, lo, hi):
                if unique is not None:
                    ids = unique.add(cols[id_column], seq)
                keep = [i - seq for a, b in done.missing(seq, seq + len(ids)) for i in range(a, b)]
                start = 0
                while start < len(keep):
                    part = keep[start : start + chunk]
                    start += len(part)
                    if len(part) == len(ids):  # the whole batch: no copies
                        yield builder.build(ids, cols, range(seq, seq + len(ids)))
                    else:  # a first small chunk, or a resume's rows not yet committed
                        yield builder.build(
                            [ids[i] for i in part],
                            {c: [v[i] for i in part] for c, v in cols.items()},
                            [seq + i for i in part],
                        )
                    chunk = min(2 * chunk, batch_rows)
                seq += len(ids)
        if unique is not None:
            # Uniqueness is over the whole rank's input: the committed rows skipped above are
            # checked after the last new row (only their ids are read), where the spilled
            # check ends anyway, so a resume's first new shard does not wait on them.
            for lo, hi in skipped_spans(spans, source.total_rows):
                seq = lo
                # In batches of batch_rows: 16,384 ids a batch held ~40 MB more, no faster.
                for ids, cols in source.iter_batches([id_column], batch_rows, lo, hi):
                    unique.add(cols[id_column], seq)
                    seq += len(ids)
            unique.finish()
    finally:
        if unique is not None:
            unique.close()


def spans_to_read(done: Positions, total: int | None) -> list[tuple[int, int | None]]:
    """The [start, stop) position ranges a run reads its rows from: the whole input on a first
    run, else the rows not committed, where committed runs shorter than SKIP_MIN_ROWS between
    two of them are read through (and filtered) rather than skipped by a new read."""
    if total is None or not len(done):
        return [(0, total)]
    spans: list[tuple[int, int | None]] = []
    for lo, hi in done.missing(0, total):
        last = spans[-1] if spans else None
        if last is not None and last[1] is not None and lo - last[1] < SKIP_MIN_ROWS:
            spans[-1] = (last[0], hi)
        else:
            spans.append((lo, hi))
    return spans


def skipped_spans(spans: list[tuple[int, int | None]], total: int | None) -> list[tuple[int, int]]:
    """The position ranges of [0, total) that `spans` (sorted, disjoint) leave out."""
    if total is None:
        return []
    return Positions([(lo, total if hi is None else hi) for lo, hi in spans]).missing(0, total)


class Committer(Stage):
    """Groups results into shards and commits each: Parquet write, fsync, rename, manifest."""

    def __init__(
        self,
        writer: ParquetShardWriter,
        checkpoint: Checkpoint,
        next_seq: int,
        rows_per_shard: int,
        checkpoint_seconds: float,
    ) -> None:
        super().__init__(name="batchgen-committer")
        self.writer, self.checkpoint = writer, checkpoint
        self.seq = next_seq
        self.rows_per_shard = rows_per_shard
        self.checkpoint_seconds = checkpoint_seconds
        self.queue: queue.Queue = queue.Queue()
        # Results handed over but not yet taken (in rows plus logprob entries, as `weight`):
        # `put` waits while they exceed `max_pending`, so a committer slower than the engine
        # (a fast engine, large logprobs, a slow disk) slows the engine down instead of letting
        # results pile up in memory.
        self.max_pending = max(2 * rows_per_shard, MAX_SHARD_ENTRIES)
        self._pending = 0
        self._room = threading.Condition()
        self.error: BaseException | None = None
        self.step = "committing a shard"  # what it was doing, for the message if it fails
        self.committed: list[ShardInfo] = []
        self.started = time.monotonic()  # made just as the run starts generating

    def put(self, results: list[ResultRow]) -> None:
        weight = sum(r.weight for r in results)
        with self._room:
            while self._pending > self.max_pending and self.is_alive():
                self._room.wait(0.5)
            self._pending += weight
        self.queue.put((results, weight))

    def close(self) -> None:
        self.queue.put(_END)
        self.wait_ended()

    def work(self) -> None:
        buffer: list[ResultRow] = []
        weight = 0  # logprob entries held, besides the rows themselves
        last_commit = time.monotonic()
        while True:
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                item = None
            if item is _END:
                break
            if item is not None:
                item, taken = item
                with self._room:
                    self._pending -= taken
                    self._room.notify_all()
            if self.error is not None:
                continue  # a failed disk: drop results (they are redone on resume), keep draining
            if item:
                buffer.extend(item)
                weight += taken - len(item)
            try:
                while len(buffer) >= self.rows_per_shard:
                    cut = _prompt_boundary(buffer, self.rows_per_shard)
                    self._commit(buffer[:cut])
                    weight -= sum(r.weight - 1 for r in buffer[:cut])
                    del buffer[:cut]
                    last_commit = time.monotonic()
                # Logprobs can make rows large: a shard is cut early rather than let them fill
                # memory (each put holds whole prompts, so the buffer ends on a prompt boundary).
                full = weight >= MAX_SHARD_ENTRIES
                if buffer and (full or time.monotonic() - last_commit >= self.checkpoint_seconds):
                    self._commit(buffer)
                    buffer, weight = [], 0
                    last_commit = time.monotonic()
            except BaseException as exc:
                self.error = exc
        if buffer and self.error is None:
            try:
                self._commit(buffer)
            except BaseException as exc:
                self.error = exc

    def _commit(self, rows: list[ResultRow]) -> None:
        name = shard_name(self.writer.rank, self.seq)
        self.step = f"writing shard {name} in {self.writer.out_dir}"
        info = self.writer.write(rows, self.seq)
        info.committed_at = round(time.time(), 3)
        info.generate_seconds = round(time.monotonic() - self.started, 3)
        # From here the shard is committed on disk: if recording it fails, the next run adopts it.
        self.step = (
            f"recording shard {name} in {manifest_path(self.writer.out_dir, self.writer.rank)}"
        )
        self.checkpoint.commit(info)
        self.committed.append(info)
        self.seq += 1


def _prompt_boundary(rows: list[ResultRow], at: int) -> int:
    """The first index >= `at` that does not split one prompt's samples across two shards."""
    while at < len(rows) and rows[at].id == rows[at - 1].id:
        at += 1
    return at
