"""The feeder thread against a consumer slower than the input: every row arrives, exactly once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import write_prompts

from pipeline import stages
from pipeline.config import PromptConfig
from pipeline.engines import StopFlags
from pipeline.errors import BatchgenError
from pipeline.idcheck import UniqueIds
from pipeline.models import ensure_bundled_model
from pipeline.positions import Positions
from pipeline.prompts import PromptBuilder, load_tokenizer
from pipeline.sources.parquet import ParquetSource
from pipeline.stages import Feeder, request_batches


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder(
        PromptConfig(prompt_column="prompt"), load_tokenizer(str(ensure_bundled_model()))
    )


def test_a_busy_engine_at_the_end_of_the_input_loses_no_rows(
    tmp_path: Path, builder: PromptBuilder
) -> None:
    """The input ends while the feeder's queue is full and the engine takes more than the
    feeder's 0.1 s put timeout to make room: the end marker must wait, not evict a batch (which
    once let a run finish "complete" without those rows)."""
    src = tmp_path / "in.parquet"
    write_prompts(src, [f"row {i}" for i in range(24)])
    flags = StopFlags()
    feeder = Feeder(
        ParquetSource(str(src)), builder, Positions(), None, flags, batch_rows=4, depth=2
    )
    feeder.start()
    got = []
    for row in feeder.feed():
        if row is not None:
            got.append(row.id)
            time.sleep(0.05)  # 0.2 s per batch of 4: the queue stays full at the end
    feeder.join(timeout=5)
    assert got == [f"in.parquet:{i}" for i in range(24)]
    assert feeder.exhausted and feeder.error is None


def test_a_stopped_run_ends_the_feeder_even_with_a_full_queue(
    tmp_path: Path, builder: PromptBuilder
) -> None:
    """Once the run stops, nobody reads the queue: the feeder must still end (rows it drops
    were never committed, so a resume redoes them)."""
    src = tmp_path / "in.parquet"
    write_prompts(src, [f"row {i}" for i in range(40)])
    flags = StopFlags()
    feeder = Feeder(
        ParquetSource(str(src)), builder, Positions(), None, flags, batch_rows=4, depth=2
    )
    feeder.start()
    deadline = time.monotonic() + 5
    while not feeder.queue.full() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert feeder.queue.full()
    flags.stop.set()
    feeder.join(timeout=5)
    assert not feeder.is_alive()
    assert not feeder.exhausted


def test_a_stop_raised_while_waiting_for_the_feeder_waits_for_its_end(
    tmp_path: Path, builder: PromptBuilder, monkeypatch
) -> None:
    """tune and bench take a stop signal as an exception: one raised while the main thread waits
    for the feeder must not leave it running (inside pyarrow, at interpreter exit, it aborts the
    process). The stop is raised once the feeder's read in progress has ended."""
    import os
    import signal
    import threading

    from pipeline.cli.common import Stopped, stop_raises

    def slow_batches(*_args):
        yield [object()]
        time.sleep(1.0)  # a read in progress (pyarrow's, in a run)
        yield [object()]

    monkeypatch.setattr(stages, "request_batches", slow_batches)
    src = write_prompts(tmp_path / "in.parquet", ["row"])
    flags = StopFlags()
    feeder = Feeder(ParquetSource(str(src)), builder, Positions(), None, flags, depth=1)
    started = time.monotonic()
    with stop_raises(), pytest.raises(Stopped):
        try:
            feeder.start()
            next(row for row in feeder.feed() if row is not None)
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        finally:
            flags.stop.set()
            feeder.wait_ended()
    assert feeder.ended.is_set() and time.monotonic() - started >= 1.0
    feeder.join(timeout=5)
    assert not feeder.is_alive()


def drain(feeder: Feeder) -> list[list]:
    """The feeder's queue items (lists of PromptRow) up to its end marker."""
    from pipeline.stages import _END

    items = []
    while (item := feeder.queue.get(timeout=10)) is not _END:
        items.append(item)
    return items


@pytest.mark.parametrize(
    "done, sizes",
    [(0, [64, 128, 108]), (100, [64, 128, 8])],
    ids=["fresh", "resume-skips-100"],
)
def test_first_rows_reach_the_engine_in_small_chunks(
    tmp_path: Path, builder: PromptBuilder, done: int, sizes: list[int]
) -> None:
    """64 rows first (the engine starts after ~10 ms of tokenizing, not a whole batch's ~0.1 s),
    then doubling; rows keep their order and positions, and a resume still skips its rows."""
    src = tmp_path / "in.parquet"
    write_prompts(src, [f"row {i}" for i in range(300)])
    feeder = Feeder(ParquetSource(str(src)), builder, Positions([[0, done]]), None, StopFlags())
    feeder.start()
    items = drain(feeder)
    feeder.join(timeout=5)
    assert [len(item) for item in items] == sizes
    rows = [row for item in items for row in item]
    assert [r.seq for r in rows] == list(range(done, 300))
    assert [r.id for r in rows] == [f"in.parquet:{i}" for i in range(done, 300)]
    assert all(r.token_ids for r in rows)


def test_the_tokenizer_is_loaded_once_per_process_and_model_files(tmp_path: Path) -> None:
    import shutil

    model = ensure_bundled_model()
    assert load_tokenizer(str(model)) is load_tokenizer(str(model))
    copy = tmp_path / "model"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    first = load_tokenizer(str(copy))
    assert first is not load_tokenizer(str(model))
    config = copy / "tokenizer_config.json"
    config.write_text(config.read_text() + " ")  # the folder's files changed: load afresh
    assert load_tokenizer(str(copy)) is not first


class RecordingSource:
    """A Parquet source that records what each read asked for: (columns, start, stop)."""

    def __init__(self, path: Path) -> None:
        self.inner = ParquetSource(str(path))
        self.columns, self.total_rows = self.inner.columns, self.inner.total_rows
        self.reads: list[tuple[list[str], int, int | None]] = []

    def iter_batches(self, columns: list[str], batch_rows: int, start: int = 0, stop=None):
        self.reads.append((sorted(columns), start, stop))
        yield from self.inner.iter_batches(columns, batch_rows, start, stop)


def keyed_input(tmp_path: Path, rows: int, repeat: tuple[int, int] | None = None) -> Path:
    keys = [f"k{i}" for i in range(rows)]
    if repeat is not None:
        keys[repeat[1]] = keys[repeat[0]]
    return write_prompts(tmp_path / "in.parquet", [f"row {i}" for i in range(rows)], key=keys)


@pytest.mark.parametrize(
    "skip_min, reads",
    [
        # committed runs shorter than SKIP_MIN_ROWS between two spans to do are read through
        (1 << 16, [(100, 500)]),
        (5, [(100, 150), (160, 300), (400, 500)]),
    ],
    ids=["read-through-short-runs", "skip-every-run"],
)
def test_a_resume_reads_rows_to_do_first_then_only_the_committed_ids(
    tmp_path: Path,
    builder: PromptBuilder,
    monkeypatch: pytest.MonkeyPatch,
    skip_min: int,
    reads: list[tuple[int, int]],
) -> None:
    """With --id-column, the committed rows' prompt columns are never read, and their ids only
    after the last row to do: a resume's first new shard does not wait on what it committed."""
    monkeypatch.setattr(stages, "SKIP_MIN_ROWS", skip_min)
    source = RecordingSource(keyed_input(tmp_path, 500))
    done = Positions([[0, 100], [150, 160], [300, 400]])
    rows = [r for chunk in request_batches(source, builder, done, "key", 64) for r in chunk]
    assert [r.seq for r in rows] == [p for lo, hi in done.missing(0, 500) for p in range(lo, hi)]
    assert [r.id for r in rows] == [f"k{r.seq}" for r in rows]
    skipped = Positions(reads).missing(0, 500)
    assert source.reads == [
        *((["key", "prompt"], lo, hi) for lo, hi in reads),
        *((["key"], lo, hi) for lo, hi in skipped),
    ]


@pytest.mark.parametrize(
    "in_memory, what",
    [
        (100_000, "the id 'k30' (rows 30 and 250)"),
        (10, "one id in rows 30 and 250 of this rank's input"),
    ],
    ids=["in-memory", "spilled"],
)
def test_an_id_repeated_in_a_committed_and_a_new_row_is_refused_naming_both(
    tmp_path: Path,
    builder: PromptBuilder,
    monkeypatch: pytest.MonkeyPatch,
    in_memory: int,
    what: str,
) -> None:
    """The committed rows' ids are checked after the new rows: a repeat across the two is
    refused there, naming both rows, once every new row has gone to the engine."""
    monkeypatch.setattr(stages, "UniqueIds", lambda column: UniqueIds(column, in_memory))
    source = ParquetSource(str(keyed_input(tmp_path, 300, repeat=(30, 250))))
    sent = []
    with pytest.raises(BatchgenError) as err:
        for chunk in request_batches(source, builder, Positions([[0, 200]]), "key", 64):
            sent += [r.seq for r in chunk]
    assert str(err.value) == (
        f"--id-column 'key' repeats {what}; resume needs unique ids: pick a unique column or "
        "omit --id-column"
    )
    assert sent == list(range(200, 300))
